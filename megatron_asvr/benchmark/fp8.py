"""FP8 for the LLM's decoder layers through Transformer Engine, via megatron's TransformerConfig fields.

Only the LLM's TransformerConfig gets ``fp8`` / ``fp8_recipe``: megatron's
TransformerBlock then runs its TE layers under ``fp8_autocast`` (per layer for
the tensorwise and mxfp8 recipes, so the first and last layers can stay bf16;
around the whole block for delayed scaling, which cannot). The vision encoder,
the projector, the LM head and the visual head run outside that block and stay
bf16: their rows (729 image positions per image) are not the multiples of 16
FP8 GEMMs need, and nothing is padded.
"""

import torch

from megatron_asvr.config import BenchRunConfig

FP8_ALIGNMENT = 16  # rows of an FP8 GEMM (TE: 8 forward, 16 for the backward's transposes)
MIN_CAPABILITY = {"delayed": (8, 9), "tensorwise": (8, 9), "mxfp8": (10, 0)}  # Ada/Hopper; MXFP8 is Blackwell


class FP8Unavailable(RuntimeError):
    """FP8 cannot run on this machine or at these shapes; the message is one actionable line."""


def fp8_llm_changes(recipe: str, bf16_edge_layers: int = 0) -> dict:
    """TransformerConfig changes for the LLM: FP8 format and recipe, optionally bf16 first/last layers."""
    # E4M3 forward and E5M2 gradients, except MXFP8, whose block scales make E4M3 usable for both.
    changes = {"fp8": "e4m3" if recipe == "mxfp8" else "hybrid", "fp8_recipe": recipe}
    if recipe == "delayed":
        changes.update(fp8_amax_history_len=1024, fp8_amax_compute_algo="max")  # Megatron-LM's usual setting
    if bf16_edge_layers:
        changes.update(first_last_layers_bf16=True, num_layers_at_start_in_bf16=bf16_edge_layers,
                       num_layers_at_end_in_bf16=bf16_edge_layers)
    return changes


def check_fp8_runnable(config: BenchRunConfig, backend: str) -> None:
    """Raise a one-line FP8Unavailable when FP8 cannot run here or at these shapes."""
    if not torch.cuda.is_available():
        raise FP8Unavailable("FP8 needs an NVIDIA GPU with Transformer Engine and this machine has no GPU: "
                             "set bench.precision=bf16 on a GPU (fp32 on CPU)")
    if backend != "transformer_engine":
        raise FP8Unavailable("FP8 needs the Transformer Engine layers: pip install '.[gpu]' and "
                             "model.transformer_impl=auto or transformer_engine")
    capability = torch.cuda.get_device_capability()
    recipe = config.bench.fp8_recipe
    needed = MIN_CAPABILITY[recipe]
    if capability < needed:
        raise FP8Unavailable(f"the {recipe} FP8 recipe needs compute capability "
                             f"{needed[0]}.{needed[1]} or newer; this GPU has {capability[0]}.{capability[1]}")
    parallel = config.parallel
    split = parallel.tensor_parallel if parallel.sequence_parallel else 1
    rows = config.train.micro_batch * config.data.seq_length // split
    if rows % FP8_ALIGNMENT:
        raise FP8Unavailable(f"FP8 GEMMs need rows in multiples of {FP8_ALIGNMENT}; micro-batch x sequence length "
                             f"{'/ TP ' if split > 1 else ''}= {rows}: change train.micro_batch or data.seq_length")
