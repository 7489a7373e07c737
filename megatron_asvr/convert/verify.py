"""Our model and transformers on the same random image and prompt: the max abs logit difference.

Ours runs at the checkpoint-loading layout through megatron's forward-only
schedule; its logits are freed before one rank (the last stage's writer) loads
the HF model, so the two never share memory. transformers is the reference and
must load the HF directory with no missing, unexpected or mismatched keys.
Logits are compared over our LM's ``vocab_size`` token ids (the rows llava-hf
appends for ``<image>`` and ``<pad>`` are not ours).
"""

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_asvr.checkpoint.directory import resolve
from megatron_asvr.checkpoint.model import load_model, read_model_config
from megatron_asvr.config import ModelConfig, ParallelConfig
from megatron_asvr.convert.hf_vocab import HFVocab, appended_vocab, checkpoint_vocab
from megatron_asvr.convert.ranks import is_writer, raise_if_any
from megatron_asvr.data.batch import MicroBatch, image_index_of
from megatron_asvr.training.schedule import forward_only
from megatron_asvr.training.task import logits_step

BOS = 1
FIRST_TEXT_ID = 3  # after <unk>, <s>, </s>


@dataclass
class VerifyInputs:
    tokens: torch.Tensor  # [1, s]; image positions hold 0
    image_mask: Optional[torch.Tensor]  # [1, s] bool, None without an image
    images: Optional[torch.Tensor]  # [1, 3, H, W]
    hf_input_ids: torch.Tensor  # [1, s]; image positions hold image_token_index


def random_inputs(model: ModelConfig, vocab: HFVocab, with_image: bool, text_tokens: int = 16,
                  seed: int = 0) -> VerifyInputs:
    """BOS, the image's positions (``with_image``), then random text ids below the special tokens."""
    g = torch.Generator().manual_seed(seed)
    specials = [vocab.image_token_index] + ([] if vocab.pad_token_id is None else [vocab.pad_token_id])
    top = min(model.llm.vocab_size, *specials)
    text = torch.randint(FIRST_TEXT_ID, top, (text_tokens,), generator=g)
    patches = model.vision.num_patches if with_image else 0
    tokens = torch.cat([torch.tensor([BOS]), torch.zeros(patches, dtype=torch.long), text])[None]  # [1, s]
    image_mask = torch.zeros_like(tokens, dtype=torch.bool)
    image_mask[0, 1:1 + patches] = True
    images = None
    if with_image:
        size = model.vision.image_size
        images = torch.randn(1, 3, size, size, generator=g)
    hf_ids = tokens.masked_fill(image_mask, vocab.image_token_index)
    return VerifyInputs(tokens, image_mask if with_image else None, images, hf_ids)


def our_logits(chunks, inputs: VerifyInputs, vocab_size: int) -> Optional[torch.Tensor]:
    """Logits [1, s, vocab_size] (fp32) on the last pipeline stage's ranks; None on the others."""
    s = inputs.tokens.shape[1]
    batch = MicroBatch(
        tokens=inputs.tokens, position_ids=torch.arange(s)[None], labels=None, loss_mask=None,
        image_index=None if inputs.image_mask is None else image_index_of(inputs.image_mask), images=inputs.images,
    )
    gathered = logits_step(lambda logits, _: gather_from_tensor_model_parallel_region(logits))  # [1, s, V_pad]
    outputs = forward_only(gathered, chunks, [batch])
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return outputs[0][..., :vocab_size].float().cpu()


def hf_logits(directory, inputs: VerifyInputs, dtype: torch.dtype, llava: bool) -> torch.Tensor:
    """transformers' logits [1, s, V_hf] (fp32); a load with any key problem is an error."""
    import transformers

    cls = transformers.LlavaForConditionalGeneration if llava else transformers.AutoModelForCausalLM
    model, info = cls.from_pretrained(str(directory), dtype=dtype, output_loading_info=True)
    problems = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if problems or info.get("error_msgs"):
        raise KeyError(f"{directory}: transformers reports {problems or info['error_msgs']}")
    with torch.no_grad():
        kwargs = {"pixel_values": inputs.images.to(dtype)} if llava else {}
        return model.eval()(input_ids=inputs.hf_input_ids, **kwargs).logits.float()


ROUNDING_EPSILONS = 8  # allowed difference: this many of the dtype's epsilon at the logits' scale


@dataclass(frozen=True)
class LogitAgreement:
    """Our logits against transformers' on the same inputs, and what the dtype's rounding allows."""

    max_abs_diff: float
    logit_scale: float  # max |logit| of ours
    dtype: torch.dtype

    @property
    def limit(self) -> float:
        return ROUNDING_EPSILONS * torch.finfo(self.dtype).eps * max(1.0, self.logit_scale)

    @property
    def within(self) -> bool:
        return self.max_abs_diff <= self.limit

    def describe(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        return (f"max abs logit difference {self.max_abs_diff:.3e} in {dtype} (logits up to {self.logit_scale:.3g}; "
                f"{dtype} rounding allows {self.limit:.3e}): {'within' if self.within else 'OUTSIDE'} what "
                f"{dtype} allows")


def verify_checkpoint(checkpoint, hf_dir, parallel: ParallelConfig, dtype: torch.dtype, device,
                      llava: bool = True, seed: int = 0) -> Optional[LogitAgreement]:
    """Our logits from ``checkpoint`` (a checkpoint or a save directory: its newest; loaded at
    ``parallel``) against the HF model in ``hf_dir`` (a LLaVA, or with ``llava=False`` a causal LM
    on a text-only prompt), on the last stage's writer rank; None on the other ranks (collective)."""
    checkpoint = resolve(Path(checkpoint))
    model = read_model_config(checkpoint)
    vocab = checkpoint_vocab(checkpoint) or appended_vocab(model.llm.vocab_size)
    inputs = random_inputs(model, vocab, with_image=llava, seed=seed)
    chunks = load_model(checkpoint, model, parallel, dtype, device)
    ours = our_logits(chunks, inputs, model.llm.vocab_size)
    del chunks
    gc.collect()
    dist.barrier()
    agreement, error = None, None
    if ours is not None and is_writer():
        try:
            theirs = hf_logits(Path(hf_dir), inputs, dtype, llava)[..., : model.llm.vocab_size]
            agreement = LogitAgreement((ours - theirs).abs().max().item(), ours.abs().max().item(), dtype)
        except (KeyError, OSError, ValueError) as err:
            error = f"rank {dist.get_rank()}: {err}"
    raise_if_any(error)
    return agreement
