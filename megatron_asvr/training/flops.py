"""Whole-model FLOP count of a training step: encoder, projector, LLM and visual head(s).

Counted: matrix multiplications at 2 FLOPs per multiply-add (norms, activations,
softmax and the optimizer are ignored, as in Megatron-LM). A part's forward
FLOPs F cost

- 3F when its weights train (forward, input-gradient, weight-gradient GEMMs);
- 2F when it is frozen but gradients flow through it (the stage-1 LLM: the
  projector below it trains);
- 1F when it is frozen with nothing trainable below (the vision encoder).

Attention scores and values cost 2 * 2 * s * h per token for full attention
and half of that for causal attention (the LLM over the sequence; the head
over its D depth slots). The LLM part equals Megatron-LM's formula with the
causal halving when the LLM trains.
"""

from dataclasses import dataclass
from typing import Dict

from megatron_asvr.config import ModelConfig
from megatron_asvr.model.llm import padded_vocab_size


@dataclass(frozen=True)
class StepShape:
    """What one global batch contains."""

    samples: int
    seq_length: int  # positions per sample (padding included: it is computed)
    image_tiles: int  # encoder inputs (384 x 384 tiles)
    visual_rows: int  # image positions (the projector's rows; the head(s) process the supervised ones)


def llm_forward_flops_per_token(model: ModelConfig, seq_length: int) -> float:
    llm = model.llm
    h, f, layers = llm.hidden_size, llm.ffn_hidden_size, llm.num_layers
    kv = llm.kv_heads * h // llm.num_attention_heads
    span = min(seq_length, llm.sliding_window or seq_length)
    per_layer = 2 * h * (h + 2 * kv) + 2 * h * h + 2 * 3 * h * f + 2 * 2 * span * h / 2
    return layers * per_layer + 2 * h * padded_vocab_size(llm.vocab_size, 1)


def encoder_forward_flops_per_tile(model: ModelConfig) -> float:
    v = model.vision
    if model.asvr.discrete_input:
        return 0.0
    tokens = v.num_patches + (1 if v.kind == "clip" else 0)
    per_token_layer = 2 * 4 * v.hidden_size**2 + 2 * 2 * v.hidden_size * v.ffn_hidden_size + 2 * 2 * tokens * v.hidden_size
    patch_embed = 2 * 3 * v.patch_size**2 * v.hidden_size
    return tokens * (v.layers_used * per_token_layer + patch_embed)


def projector_forward_flops_per_position(model: ModelConfig) -> float:
    width = model.asvr.semantic.dim if model.asvr.discrete_input else model.vision.hidden_size
    h = model.llm.hidden_size
    return 2 * (width * h + h * h)


def head_forward_flops_per_row(model: ModelConfig, branch: str) -> float:
    head, codes, h = model.asvr.head, getattr(model.asvr, branch), model.llm.hidden_size
    e, d = head.hidden_size, codes.depth
    proj = 2 * (h * e + e * e)
    code_embed = 2 * codes.dim * e * (d - 1)
    per_slot_layer = 2 * 4 * e * e + 2 * 2 * head.mlp_ratio * e * e + 2 * 2 * d * e / 2
    classifiers = sum(2 * e * v for v in codes.sizes)
    return proj + code_embed + head.num_layers * d * per_slot_layer + classifiers


def step_flops(model: ModelConfig, shape: StepShape) -> Dict[str, float]:
    """FLOPs of one training step by part (and ``total``)."""
    trains = set(model.trainable)

    def factor(part: str, below: set) -> int:
        return 3 if part in trains else 2 if trains & below else 1

    llm_factor = factor("llm", {"projector", "vision"})
    parts = {
        "vision": encoder_forward_flops_per_tile(model) * shape.image_tiles * factor("vision", set()),
        "projector": projector_forward_flops_per_position(model) * shape.visual_rows * factor("projector", {"vision"}),
        "llm": llm_forward_flops_per_token(model, shape.seq_length) * shape.samples * shape.seq_length * llm_factor,
        "visual_head": sum(
            head_forward_flops_per_row(model, b) * shape.visual_rows * (3 if "visual_head" in trains else 1)
            for b in model.asvr.branches
        ),
    }
    parts["total"] = sum(parts.values())
    return parts
