"""One pipeline stage of the ASVR vision-language model.

    first stage:  images -> vision encoder -> projector ─┐
                  tokens -> embedding ── splice features at image positions -> decoder layers
    middle:       decoder layers
    last stage:   decoder layers -> final norm -> LM head (text loss)
                                              └> image positions -> visual head(s) (visual loss)

Image features replace the embeddings at ``image_index``, positions of the
flattened [b * s] batch in row-major order (sample by sample, left to right),
built on the host with the batch: the forward pass never waits for the device
to find them. The model reads no files: frozen
codebook vectors come in through ``build_stage``.
"""

import dataclasses
from typing import Dict, List, Optional, Sequence

import torch
from megatron.core import tensor_parallel
from megatron.core.inference.contexts import BaseInferenceContext
from megatron.core.models.gpt import GPTModel
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_asvr.config import ModelConfig, ParallelConfig
from megatron_asvr.model.containers import ShardedModuleDict
from megatron_asvr.model.head import VisualHead, gelu, head_transformer_config
from megatron_asvr.model.llm import llm_transformer_config, padded_vocab_size
from megatron_asvr.model.specs import block_spec, mlp_submodules
from megatron_asvr.model.vision import VisionEncoder, vision_transformer_config


class LanguageModel(GPTModel):
    """GPTModel whose last stage also returns its final, normed hidden states [s, b, h]."""

    def _postprocess(self, hidden_states, *args, **kwargs):
        output = super()._postprocess(hidden_states, *args, **kwargs)
        return (output, hidden_states) if self.post_process else output


@dataclasses.dataclass
class StageConfigs:
    """The TransformerConfigs of the parts (the LLM's drives megatron's schedules)."""

    llm: TransformerConfig
    vision: Optional[TransformerConfig]
    projector: TransformerConfig
    head: TransformerConfig

    @classmethod
    def build(cls, model: ModelConfig, parallel: ParallelConfig, backend: str, params_dtype: torch.dtype):
        llm = llm_transformer_config(model.llm, parallel, backend, params_dtype)
        vision = None
        if not model.asvr.discrete_input:
            vision = vision_transformer_config(model.vision, parallel, backend, params_dtype)
        # mlp2x_gelu: Linear(in -> H), exact GELU, Linear(H -> H), with biases; never sequence-parallel.
        projector = dataclasses.replace(
            llm, ffn_hidden_size=model.llm.hidden_size, add_bias_linear=True, gated_linear_unit=False,
            activation_func=gelu, bias_activation_fusion=False, sequence_parallel=False,
        )
        head = head_transformer_config(model.asvr.head, parallel, backend, params_dtype)
        return cls(llm, vision, projector, head)

    def replace(self, **changes) -> "StageConfigs":
        """The same configs with ``changes`` applied to each (e.g. initialisation settings)."""
        return StageConfigs(*(
            None if c is None else dataclasses.replace(c, **changes)
            for c in (self.llm, self.vision, self.projector, self.head)
        ))


class ASVRModel(MegatronModule):
    """This rank's stage (or virtual stage) of the VLM."""

    def __init__(
        self,
        model: ModelConfig,
        configs: StageConfigs,
        backend: str,
        pre_process: bool,
        post_process: bool,
        codebooks: Dict[str, Sequence[torch.Tensor]],
        vp_stage: Optional[int] = None,
    ):
        super().__init__(config=configs.llm)
        self.model_cfg, self.asvr = model, model.asvr
        self.pre_process, self.post_process = pre_process, post_process
        self.model_type = ModelType.encoder_or_decoder
        self.vision_encoder = self.projector = None
        if pre_process:
            if self.asvr.discrete_input:
                # The codebook vectors of the image's codes replace the encoder's features.
                for d, vectors in enumerate(codebooks["semantic"]):
                    self.register_buffer(f"input_codebook_{d}", vectors.to(configs.llm.params_dtype), persistent=False)
                feature_size = self.asvr.semantic.dim
            else:
                self.vision_encoder = VisionEncoder(model.vision, configs.vision, backend)
                feature_size = model.vision.hidden_size
            self.projector = MultimodalProjector(configs.projector, mlp_submodules(backend), "mlp", feature_size)
        self.language_model = LanguageModel(
            config=configs.llm,
            transformer_layer_spec=block_spec(configs.llm, backend, vp_stage=vp_stage),
            vocab_size=padded_vocab_size(model.llm.vocab_size, configs.llm.tensor_model_parallel_size),
            max_sequence_length=model.llm.max_sequence_length,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=not model.llm.untie_embeddings,
            position_embedding_type="rope",
            rotary_base=int(model.llm.rotary_base),
            scatter_embedding_sequence_parallel=False,  # image features are spliced in first
            vp_stage=vp_stage,
        )
        self.visual_heads = None
        if post_process and self.asvr.branches:
            self.visual_heads = ShardedModuleDict({
                branch: VisualHead(
                    self.asvr.head, getattr(self.asvr, branch), configs.head, model.llm.hidden_size,
                    codebooks[branch], backend,
                )
                for branch in self.asvr.branches
            })
        self._apply_trainable(set(model.trainable))

    def _apply_trainable(self, trainable: set) -> None:
        parts = {
            "vision": self.vision_encoder,
            "projector": self.projector,
            "llm": self.language_model,
            "visual_head": self.visual_heads,
        }
        for name, part in parts.items():
            if part is not None:
                for param in part.parameters():
                    param.requires_grad_(name in trainable and not (name == "vision" and self.model_cfg.vision.frozen))

    @property
    def share_embeddings_and_output_weights(self) -> bool:
        """Read by megatron's finalize_model_grads (tied embeddings across pipeline stages)."""
        return self.language_model.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self) -> torch.Tensor:
        return self.language_model.shared_embedding_or_output_weight()

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline input from the previous stage (called by megatron's schedules)."""
        self.language_model.set_input_tensor(input_tensor)

    def image_features(self, images: Optional[torch.Tensor], input_codes: Optional[torch.Tensor]) -> torch.Tensor:
        """images [n, 3, H, W] (or codes [n, P, D] in discrete-input mode) -> [n, P, h_llm]."""
        if self.asvr.discrete_input:
            books = [getattr(self, f"input_codebook_{d}") for d in range(self.asvr.semantic.depth)]
            features = sum(book[input_codes[..., d]] for d, book in enumerate(books))  # [n, P, C]
        else:
            features = self.vision_encoder(images)  # [n, P, h_vision]
        return self.projector(features)

    def input_embeddings(self, tokens, position_ids, image_index, images, input_codes,
                         features: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The decoder's input on the first stage: token embeddings with the image features spliced
        in at ``image_index`` [s(/tp), b, h]; ``features`` [n, P, h]: ``image_features`` already made
        (generation runs the encoder once per distinct image), in place of images / codes."""
        embeddings = self.language_model.embedding(input_ids=tokens, position_ids=position_ids)  # [s, b, h]
        if features is None and (images is not None or input_codes is not None):
            features = self.image_features(images, input_codes)  # [n, P, h]
        if features is not None:
            s, b, h = embeddings.shape
            flat = embeddings.transpose(0, 1).reshape(b * s, h)  # [b * s, h]
            flat = flat.index_copy(0, image_index, features.reshape(-1, h).to(flat.dtype))
            embeddings = flat.view(b, s, h).transpose(0, 1).contiguous()  # [s, b, h]
        if self.config.sequence_parallel:
            embeddings = tensor_parallel.scatter_to_sequence_parallel_region(embeddings)
        return embeddings

    def forward(
        self,
        tokens: torch.Tensor,  # [b, s]
        position_ids: torch.Tensor,  # [b, s]
        image_index: Optional[torch.Tensor] = None,  # [sum P] image positions in the flattened [b * s]
        images: Optional[torch.Tensor] = None,  # [n, 3, H, W] (first stage)
        input_codes: Optional[torch.Tensor] = None,  # [n, P, D] (first stage, discrete input)
        labels: Optional[torch.Tensor] = None,  # [b, s] (last stage)
        visual_targets: Optional[Dict[str, torch.Tensor]] = None,  # branch -> [sum P, D] codes
        visual_rows: Optional[torch.Tensor] = None,  # [n_sup] supervised rows of visual_targets
        visual_grad_scale: Optional[Dict[str, torch.Tensor]] = None,  # branch -> [D] (model/loss.py)
        packed_seq_params: Optional[PackedSeqParams] = None,  # packed samples in one row [1, t] (THD)
        decoder_input: Optional[torch.Tensor] = None,  # [s, b, h] first stage's input_embeddings, given
        inference_context: Optional[BaseInferenceContext] = None,  # megatron's KV cache (generation)
    ):
        if self.pre_process and decoder_input is None:
            decoder_input = self.input_embeddings(tokens, position_ids, image_index, images, input_codes)
        output = self.language_model(
            tokens, position_ids, None, decoder_input=decoder_input, labels=labels if self.post_process else None,
            packed_seq_params=packed_seq_params, inference_context=inference_context,
            # megatron's inference path gathers the logits over TP ranks
            runtime_gather_output=True if inference_context is not None else None,
        )
        if not self.post_process:
            return output  # [s, b, h] to the next stage
        # per-token CE [b, s] (logits [b, s, V/tp] without labels; [b, 1, V] with an inference context,
        # the last position's); [s(/tp), b, h]
        text, hidden = output
        if labels is None:
            return {"logits": text, "hidden": hidden}
        visual = {}
        if self.visual_heads is not None:
            if self.config.sequence_parallel:
                # The head's rows are replicated over TP ranks and so are their gradients:
                # the backward of this gather keeps each rank's slice (no reduce-scatter).
                hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
            s, b, h = hidden.shape
            rows = hidden.transpose(0, 1).reshape(b * s, h).index_select(0, image_index)  # [sum P, h]
            for branch, head in self.visual_heads.items():
                scale = None if visual_grad_scale is None else visual_grad_scale[branch]
                visual[branch] = head(rows, visual_targets[branch], visual_rows, scale)
        return {"text": text, "visual": visual}


def stage_configs(
    model: ModelConfig, parallel: ParallelConfig, backend: str, params_dtype: torch.dtype = torch.float32,
    llm_changes: Optional[dict] = None, **config_changes,
) -> StageConfigs:
    """The parts' configs with ``config_changes`` on every part (recompute, initialisation) and
    ``llm_changes`` on the LLM's alone (FP8 runs only the decoder layers in FP8)."""
    configs = StageConfigs.build(model, parallel, backend, params_dtype).replace(**config_changes)
    return dataclasses.replace(configs, llm=dataclasses.replace(configs.llm, **(llm_changes or {})))


def stage_builder(
    model: ModelConfig, parallel: ParallelConfig, backend: str, codebooks: Dict[str, List[torch.Tensor]],
    params_dtype: torch.dtype = torch.float32, llm_changes: Optional[dict] = None,
    **config_changes,
):
    """A ``ChunkBuilder`` for ``model.chunks.build_model_chunks``.

    ``config_changes`` apply to every part's TransformerConfig (e.g.
    ``use_cpu_initialization=True, perform_initialization=False`` to build under
    ``torch.device("meta")`` for parameter counts); ``llm_changes`` to the LLM's only.
    """
    model.validate(parallel)
    configs = stage_configs(model, parallel, backend, params_dtype, llm_changes, **config_changes)

    def build(pre_process: bool, post_process: bool, vp_stage: Optional[int]) -> ASVRModel:
        return ASVRModel(model, configs, backend, pre_process, post_process, codebooks, vp_stage)

    return build
