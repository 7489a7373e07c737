"""Activation memory a pipeline stage keeps for backward, per micro-batch, on one GPU.

An estimate from the tensors each module saves, in elements per token (LLM,
encoder) or per image position (projector, visual head), at the training
precision (2 bytes in bf16), assuming flash attention (TE / SDPA on GPU: no
s x s score tensors) and no dropout (the recipes use none):

- LLM layer: the two RMSNorm inputs and outputs (4h, replicated over TP unless
  sequence-parallel), Q, K, V and the attention output (2h + 2kv), the gate/up
  output and the SwiGLU output (3f), split over TP. Megatron's linear layers
  save their input even when the weight is frozen, so a frozen LLM that passes
  gradients to the projector (stage 1) keeps the same. Selective recompute
  recomputes core attention, which flash attention does not store: no change.
  Full recompute keeps each layer's input (h) and re-materialises one layer at a
  time in backward.
- Last stage: the final norm's input and output (2h) and the LM head's fp32
  softmax (4 bytes x vocabulary / TP per token, saved by megatron's
  vocab-parallel cross entropy).
- Visual head, per image position: its input (h), the code prefix sums
  ((D - 1) C), the projection's hidden (2E, split), per layer and depth slot the
  residual stream, norm outputs and attention sum (4E) plus Q, K, V, attention
  output and the 2E MLP's hidden and activation (4E + 4E, split), and the final
  norm (2 D E). Under full recompute each layer keeps its input (D E).
- Projector, per image position: its input and the hidden before and after GELU.
- A frozen encoder runs under no_grad and keeps nothing.
"""

from dataclasses import dataclass

from megatron_asvr.config import ModelConfig
from megatron_asvr.model.llm import padded_vocab_size
from megatron_asvr.model.flops import pass_factors

FP32_BYTES = 4


@dataclass(frozen=True)
class MicroBatchShape:
    """One micro-batch on one GPU and how the stage runs it."""

    micro_batch: int
    seq_length: int
    visual_positions: int  # image positions per sample (729 per 384 x 384 tile)
    bytes_per_element: int  # 2 (bf16) or 4 (fp32)
    tensor_parallel: int
    sequence_parallel: bool
    full_recompute: bool


def llm_layer_elements(model: ModelConfig, shape: MicroBatchShape) -> float:
    """Elements one decoder layer saves per token."""
    llm, tp = model.llm, shape.tensor_parallel
    h, f = llm.hidden_size, llm.ffn_hidden_size
    q, kv = llm.qkv_widths
    # q, k, v and the attention's output; the q / k norms' inputs (Qwen3); the gated MLP's
    replicated, split = 4 * h, 2 * q + 2 * kv + (q + kv if llm.qk_norm else 0) + 3 * f
    return (replicated + split) / tp if shape.sequence_parallel else replicated + split / tp


def head_row_elements(model: ModelConfig, shape: MicroBatchShape, full_layers: bool = False) -> float:
    """Elements all visual heads save per image position (``full_layers``: one layer's, re-materialised)."""
    head, tp, total = model.asvr.head, shape.tensor_parallel, 0.0
    e, r = head.hidden_size, head.mlp_ratio
    for branch in model.asvr.branches:
        d = getattr(model.asvr, branch).depth
        layer_full = d * (4 * e + (4 * e + 2 * r * e) / tp)
        if full_layers:
            total += layer_full
            continue
        layers = head.num_layers * (d * e if shape.full_recompute else layer_full)
        total += model.llm.hidden_size + (d - 1) * getattr(model.asvr, branch).dim + 2 * e / tp + layers + 2 * d * e
    return total


def stage_activation_bytes(model: ModelConfig, shape: MicroBatchShape, layers: int, first: bool, last: bool):
    """(bytes kept per in-flight micro-batch, bytes re-materialised once under full recompute) of a stage."""
    factor = pass_factors(model)
    tokens = shape.micro_batch * shape.seq_length
    rows = shape.micro_batch * shape.visual_positions
    tp, h = shape.tensor_parallel, model.llm.hidden_size
    per_layer = llm_layer_elements(model, shape)
    kept = transient = 0.0
    if factor["llm"] > 1:
        if shape.full_recompute:
            kept += layers * tokens * (h / tp if shape.sequence_parallel else h)
            transient += tokens * per_layer
        else:
            kept += layers * tokens * per_layer
    if first and factor["projector"] > 1:
        width = model.asvr.semantic.dim if model.asvr.discrete_input else model.vision.hidden_size
        kept += rows * (width + 2 * h / tp)
    if first and factor["vision"] > 1:
        v = model.vision
        encoder_layer = 4 * v.hidden_size + (4 * v.hidden_size + 2 * v.ffn_hidden_size) / tp
        kept += rows * v.layers_used * encoder_layer  # a trained encoder: per patch, as the LLM's layers
    kept_bytes, transient_bytes = kept * shape.bytes_per_element, transient * shape.bytes_per_element
    if last and factor["llm"] > 1:
        kept_bytes += tokens * (2 * h / (tp if shape.sequence_parallel else 1) * shape.bytes_per_element
                                + FP32_BYTES * padded_vocab_size(model.llm.vocab_size, tp) / tp)
    if last and factor["visual_head"] > 1:
        kept_bytes += rows * head_row_elements(model, shape) * shape.bytes_per_element
        if shape.full_recompute:
            one_layer = rows * head_row_elements(model, shape, full_layers=True) * shape.bytes_per_element
            transient_bytes = max(transient_bytes, one_layer)
    return kept_bytes, transient_bytes
