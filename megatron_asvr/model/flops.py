"""Whole-model FLOP count of a training step: vision encoder, projector, LLM and visual head(s).

Megatron-LM's logged TFLOP/s counts the LLM only; for a VLM with ASVR the
encoder, the projector and the visual head are real work too. Conventions:

- Matrix multiplications only, 2 FLOPs per multiply-add (norms, activations,
  softmax, the embedding lookup and the optimizer are ignored, as in Megatron-LM).
- Model FLOPs: activation recomputation is not counted (MFU, not HFU).
- A part whose forward costs F costs 3F in a step when its weights train
  (forward, input-gradient and weight-gradient GEMMs), 2F when it is frozen but
  a gradient passes through it to a trained part (the stage-1 LLM: the
  projector below it trains; a frozen head above a trained LLM), and F when no
  gradient passes (the frozen vision encoder, which runs under no_grad).
- Attention scores and the weighted sum of values cost 2 * 2 * k * h per query
  for k attended keys. Causal attention over s positions attends s / 2 keys per
  query (Megatron-LM's convention, so the LLM part equals its
  ``num_floating_point_operations`` when the LLM trains); a sliding window w < s
  attends w - w^2 / (2 s) keys on average. The encoder attends all of its
  tokens; the head is causal over its D depth slots.
"""

from collections import Counter
from dataclasses import dataclass
from typing import Dict, Tuple

from megatron_asvr.config import ModelConfig
from megatron_asvr.model.llm import padded_vocab_size


@dataclass(frozen=True)
class StepShape:
    """What one global batch contains: real positions only (padding is not useful work)."""

    lengths: Tuple[int, ...]  # real positions of each sample (each attends within itself)
    image_tiles: int  # encoder inputs (384 x 384 tiles)
    visual_rows: int  # image positions: the projector's rows and the visual head's rows

    @classmethod
    def uniform(cls, samples: int, seq_length: int, image_tiles: int, visual_rows: int) -> "StepShape":
        """``samples`` samples of ``seq_length`` real positions each."""
        return cls((seq_length,) * samples, image_tiles, visual_rows)


def causal_keys_per_query(seq_length: int, window: int = 0) -> float:
    """Mean attended keys per query of causal attention, optionally within a sliding window."""
    if not window or window >= seq_length:
        return seq_length / 2
    return window - window * window / (2 * seq_length)


def llm_forward_flops_per_token(model: ModelConfig, seq_length: int) -> float:
    """Decoder layers (QKV with GQA, output projection, SwiGLU MLP, causal attention) and the LM head."""
    llm = model.llm
    h, f = llm.hidden_size, llm.ffn_hidden_size
    q, kv = llm.qkv_widths
    keys = causal_keys_per_query(seq_length, llm.sliding_window or 0)
    per_layer = 2 * h * (q + 2 * kv) + 2 * q * h + 2 * 3 * h * f + 2 * 2 * keys * q
    return llm.num_layers * per_layer + 2 * h * padded_vocab_size(llm.vocab_size, 1)


def encoder_forward_flops_per_tile(model: ModelConfig) -> float:
    """The encoder layers that are built (up to ``feature_layer``) and the patch embedding."""
    v = model.vision
    if model.asvr.discrete_input:
        return 0.0
    tokens = v.num_patches + (1 if v.family == "clip" else 0)  # CLIP's class token
    w = v.hidden_size
    per_token_layer = 2 * 4 * w * w + 2 * 2 * w * v.ffn_hidden_size + 2 * 2 * tokens * w  # QKV+out, MLP, attention
    patch_embed = 2 * 3 * v.patch_size**2 * w  # per patch
    return tokens * v.layers_used * per_token_layer + v.num_patches * patch_embed


def projector_forward_flops_per_position(model: ModelConfig) -> float:
    """mlp2x_gelu: Linear(features -> H), Linear(H -> H)."""
    width = model.asvr.semantic.dim if model.asvr.discrete_input else model.vision.hidden_size
    h = model.llm.hidden_size
    return 2 * (width * h + h * h)


def head_forward_flops_per_row(model: ModelConfig, branch: str) -> float:
    """One visual head on one image position: projection, code embedding, depth transformer, classifiers."""
    head, codes, h = model.asvr.head, getattr(model.asvr, branch), model.llm.hidden_size
    e, d = head.hidden_size, codes.depth
    proj = 2 * (h * e + e * e)
    code_embed = 2 * codes.dim * e * (d - 1)  # slots 1..D-1
    per_slot_layer = 2 * 4 * e * e + 2 * 2 * head.mlp_ratio * e * e + 2 * 2 * causal_keys_per_query(d) * e
    classifiers = sum(2 * e * padded_vocab_size(v, 1) for v in codes.sizes)
    return proj + code_embed + head.num_layers * d * per_slot_layer + classifiers


def trained_parts(model: ModelConfig) -> set:
    """The parts whose weights train (a frozen-by-config vision encoder never does)."""
    trains = set(model.trainable)
    if model.vision.frozen:
        trains.discard("vision")
    return trains


def pass_factors(model: ModelConfig) -> Dict[str, int]:
    """Per part: 3 (trains), 2 (frozen, a gradient passes through) or 1 (forward only)."""
    trains = trained_parts(model)
    below = {"vision": set(), "projector": {"vision"}, "llm": {"vision", "projector"},
             "visual_head": {"vision", "projector", "llm"}}
    return {part: 3 if part in trains else 2 if trains & under else 1 for part, under in below.items()}


def step_flops(model: ModelConfig, shape: StepShape) -> Dict[str, float]:
    """FLOPs of one training step by part ("vision", "projector", "llm", "visual_head") and "total"."""
    factor = pass_factors(model)
    parts = {
        "vision": encoder_forward_flops_per_tile(model) * shape.image_tiles * factor["vision"],
        "projector": projector_forward_flops_per_position(model) * shape.visual_rows * factor["projector"],
        "llm": sum(llm_forward_flops_per_token(model, length) * length * count
                   for length, count in Counter(shape.lengths).items()) * factor["llm"],
        "visual_head": sum(head_forward_flops_per_row(model, b) for b in model.asvr.branches)
        * shape.visual_rows * factor["visual_head"],
    }
    parts["total"] = sum(parts.values())
    return parts


def micro_batch_shape(model: ModelConfig, micro_batches) -> StepShape:
    """The real work in ``micro_batches`` (``data.batch.MicroBatch``; padding excluded)."""
    positions = sum(m.num_image_positions for m in micro_batches)
    lengths = tuple(n for m in micro_batches for n in m.sample_lengths)
    return StepShape(lengths, positions // model.vision.num_patches, positions)


def micro_batch_flops(model: ModelConfig, micro_batches) -> float:
    """FLOPs of the real work in ``micro_batches``: what TFLOP/s and MFU count."""
    return step_flops(model, micro_batch_shape(model, micro_batches))["total"]
