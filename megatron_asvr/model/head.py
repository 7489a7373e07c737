"""The ASVR visual head, exactly as released (docs/method.md#3-the-visual-head).

Input: the LLM's final, normed hidden states at supervised image positions
[N, H]. Output: per-depth cross entropy against the frozen tokenizer's
ground-truth codes [N, D].

    x_0 = head_proj(h)                                   # H -> E -> E, GELU
    x_d = code_embed(sum_{k<d} codebook_k[code_k])       # teacher forcing, d >= 1
    for each layer (causal over the D depth slots, no positional embedding):
        a = x + Attn(RMSNorm1(x)); r = RMSNorm2(a); x = r + MLP_d(r)   # MLP per depth
    logits_d = classifier_d(RMSNorm(x)_d)

The D per-depth MLPs run one after another or as batched GEMMs
(model/depth_mlps.py, ``train.fast_paths.batched_head_mlp``).

Tensor parallelism: heads of the depth attention, the per-depth MLPs (column
then row parallel), the projection and the classifiers (vocab-parallel, each
padded to a TP-independent multiple; padded ids are never predicted) are
split over TP ranks; the small code embedding is replicated.
"""

import dataclasses
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel import ColumnParallelLinear, gather_from_tensor_model_parallel_region
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_asvr.config import CodebookSpec, HeadConfig, ParallelConfig
from megatron_asvr.kernels import default_mode, multi_depth_cross_entropy
from megatron_asvr.model.containers import ShardedModuleList
from megatron_asvr.model.depth_mlps import BatchedDepthMLPs, DepthMLPs
from megatron_asvr.model.llm import padded_vocab_size
from megatron_asvr.model.norms import RMSNorm
from megatron_asvr.model.specs import attention_spec, mlp_submodules
from megatron_asvr.model.transformer_defaults import fusion_kwargs, model_parallel_kwargs
from megatron_asvr.runtime.fast_paths import kernel_choice


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU."""
    return F.gelu(x)


def head_transformer_config(
    head: HeadConfig, parallel: ParallelConfig, backend: str, params_dtype: torch.dtype = torch.float32
) -> TransformerConfig:
    """The depth transformer's config: attention with biases, exact GELU, no dropout.

    Never pipelined (the head sits on the last stage) or sequence-parallel (its
    rows are gathered image positions, replicated over TP ranks).
    """
    unpipelined = dataclasses.replace(parallel, pipeline_parallel=1, virtual_pipeline=None, sequence_parallel=False)
    kwargs = dict(
        num_layers=head.num_layers,
        hidden_size=head.hidden_size,
        num_attention_heads=head.num_attention_heads,
        kv_channels=head.hidden_size // head.num_attention_heads,
        ffn_hidden_size=head.mlp_ratio * head.hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=head.norm_eps,
        add_bias_linear=True,
        add_qkv_bias=True,
        gated_linear_unit=False,
        activation_func=gelu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        **model_parallel_kwargs(unpipelined, params_dtype),
        **fusion_kwargs(backend),
    )
    kwargs["bias_activation_fusion"] = False  # megatron's fused bias-GELU is the tanh approximation
    return TransformerConfig(**kwargs)


class DepthLayer(MegatronModule):
    """One depth-transformer layer with the released wiring (the residual stream is re-normed)."""

    def __init__(self, config: TransformerConfig, depth: int, layer_number: int, backend: str):
        super().__init__(config=config)
        hidden, eps = config.hidden_size, config.layernorm_epsilon
        self.norm1 = RMSNorm(config, hidden, eps)
        self.attention = build_module(
            attention_spec(backend, AttnMaskType.causal), config=config, layer_number=layer_number
        )
        self.norm2 = RMSNorm(config, hidden, eps)
        mlp_config = dataclasses.replace(config, add_bias_linear=False)  # bias-free per-depth MLPs
        mlps = [MLP(config=mlp_config, submodules=mlp_submodules(backend)) for _ in range(depth)]
        self.mlps = BatchedDepthMLPs(mlps) if kernel_choice().batched_head_mlp else DepthMLPs(mlps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [D, N, E] (depth is the sequence)
        attn, attn_bias = self.attention(self.norm1(x), attention_mask=None)
        a = x + attn + attn_bias
        r = self.norm2(a)
        return r + self.mlps(r)  # MLP_d on depth slot d


class VisualHead(MegatronModule):
    """Predicts the D residual codes of each supervised image position from the LLM's hidden state."""

    def __init__(
        self,
        head: HeadConfig,
        codebook: CodebookSpec,
        config: TransformerConfig,
        llm_hidden_size: int,
        codebook_vectors: Sequence[torch.Tensor],
        backend: str,
    ):
        super().__init__(config=config)
        depth, hidden = codebook.depth, head.hidden_size
        if len(codebook_vectors) < depth - 1:
            raise ValueError(f"teacher forcing needs the codebooks of depths 0..{depth - 2}, "
                             f"got {len(codebook_vectors)}")
        for d, vectors in enumerate(codebook_vectors[: depth - 1]):
            if tuple(vectors.shape) != (codebook.sizes[d], codebook.dim):
                raise ValueError(f"codebook {d} has shape {tuple(vectors.shape)}, "
                                 f"expected ({codebook.sizes[d]}, {codebook.dim})")
        self.vocab_sizes = list(codebook.sizes)
        proj_config = dataclasses.replace(config, ffn_hidden_size=hidden)  # H -> E -> E
        self.proj = MLP(config=proj_config, submodules=mlp_submodules(backend), input_size=llm_hidden_size)
        self.code_embed = torch.nn.Linear(codebook.dim, hidden, dtype=config.params_dtype)
        self.layers = ShardedModuleList(
            DepthLayer(config, depth, layer_number=i + 1, backend=backend) for i in range(head.num_layers)
        )
        self.final_norm = RMSNorm(config, hidden, head.norm_eps)
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.classifiers = ShardedModuleList(
            ColumnParallelLinear(
                hidden, padded_vocab_size(v, tp), config=config, init_method=config.init_method,
                bias=True, gather_output=False,
            )
            for v in self.vocab_sizes
        )
        # Frozen tokenizer codebooks (depths 0..D-2), passed in by the builder: not trained, not saved.
        for d, vectors in enumerate(codebook_vectors[: depth - 1]):
            self.register_buffer(f"codebook_{d}", vectors.to(config.params_dtype), persistent=False)

    def _codebooks(self) -> List[torch.Tensor]:
        return [getattr(self, f"codebook_{d}") for d in range(len(self.vocab_sizes) - 1)]

    def hidden(self, llm_hidden: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """llm_hidden [N, H], ground-truth codes [N, D] -> final normed depth states [D, N, E]."""
        x0, bias = self.proj(llm_hidden)
        slots = [x0 + bias if bias is not None else x0]  # [N, E]
        vectors = [book[codes[:, d]] for d, book in enumerate(self._codebooks())]  # D-1 x [N, C]
        if vectors:
            prefix_sums = torch.stack(vectors).cumsum(dim=0)  # [D-1, N, C]: codes 0..d-1 for slot d
            slots.extend(self.code_embed(prefix_sums).unbind(0))
        x = torch.stack(slots)  # [D, N, E]
        recompute = self.config.recompute_granularity == "full" and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            # Full recompute keeps only each layer's input (the per-depth MLPs' 2E activations are
            # the largest); megatron's checkpoint restores the RNG tracker state on recompute.
            x = tensor_parallel.checkpoint(layer, False, x) if recompute else layer(x)
        return self.final_norm(x)  # [D, N, E]

    def forward(self, llm_hidden: torch.Tensor, codes: torch.Tensor, rows: Optional[torch.Tensor] = None,
                grad_scale: Optional[torch.Tensor] = None):
        """Per-depth (loss_sum [D], count [D], correct [D]), summed over the supervised ``rows``
        (int64 indices into llm_hidden [N, H] and codes [N, D]; None: all).

        ``grad_scale`` [D]: the gradient the loss will give loss_sum (model/loss.py's
        visual_grad_scale), known in training. Under megatron's DDP (parameters with ``main_grad``)
        the classifiers' gradients then accumulate straight into main_grad.
        """
        if codes.shape[0] == 0:  # no image in this micro-batch
            depth = len(self.vocab_sizes)
            zeros = torch.zeros(depth, dtype=torch.long, device=llm_hidden.device)
            return torch.zeros(depth, device=llm_hidden.device), zeros, zeros.clone()
        states = self.hidden(llm_hidden, codes)
        group = parallel_state.get_tensor_model_parallel_group()
        mode = default_mode(states.device)
        # megatron's DDP gives trained parameters an fp32 main_grad; grads_in_forward accumulates there
        # in the forward, so only when the loss's gradient is known
        trained = [p for c in self.classifiers for p in (c.weight, c.bias) if p.requires_grad]
        main_grad = all(hasattr(p, "main_grad") for p in trained) and (grad_scale is not None or mode == "recompute")
        return multi_depth_cross_entropy(
            states,
            [c.weight for c in self.classifiers],
            [c.bias for c in self.classifiers],
            codes,
            self.vocab_sizes,
            row_index=rows,
            group=group if group.size() > 1 else None,
            mode=mode,
            grad_scale=grad_scale,
            main_grad=main_grad,
        )

    def logits(self, llm_hidden: torch.Tensor, codes: torch.Tensor) -> List[torch.Tensor]:
        """Per-depth logits [N, V_d] (gathered over TP, padding removed): for tests and analysis."""
        states = self.hidden(llm_hidden, codes)
        out = []
        for d, classifier in enumerate(self.classifiers):
            local = F.linear(states[d], classifier.weight, classifier.bias)  # [N, V_pad / tp]
            out.append(gather_from_tensor_model_parallel_region(local)[:, : self.vocab_sizes[d]])
        return out
