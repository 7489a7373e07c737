"""Parameters one GPU holds in each pipeline stage, by part, from the model's shapes.

The counts follow the modules the model builds (``model.vlm.ASVRModel``) at a
tensor-parallel size ``tp``: column- and row-parallel weights, column-parallel
biases, vocabulary-parallel embeddings and classifiers are split over the TP
ranks; norms, row-parallel biases, the patch and position embeddings and the
head's code embedding are replicated. tests/test_memory_plan.py checks them
against the model built on the meta device at TP = 2 x PP = 2 and TP = 4.

Parts: ``vision`` (encoder, first stage), ``projector`` (first stage),
``embedding`` (first stage), ``llm_layers``, ``output`` (final norm and LM
head, last stage), ``visual_head`` (all heads, last stage).
"""

from typing import Dict, List

from megatron_asvr.config import CodebookSpec, HeadConfig, LLMConfig, ModelConfig, VisionConfig
from megatron_asvr.model.llm import padded_vocab_size

# The model component (ModelConfig.trainable) each part belongs to.
COMPONENT_OF = {
    "vision": "vision",
    "projector": "projector",
    "embedding": "llm",
    "llm_layers": "llm",
    "output": "llm",
    "visual_head": "visual_head",
}


def layers_per_stage(llm: LLMConfig, pipeline_parallel: int) -> List[int]:
    """Decoder layers of each pipeline stage (even, or the configured first / last counts)."""
    pp = pipeline_parallel
    if pp == 1:
        return [llm.num_layers]
    first, last = llm.layers_in_first_stage, llm.layers_in_last_stage
    middle = pp - (first is not None) - (last is not None)
    rest = llm.num_layers - (first or 0) - (last or 0)
    even = rest // middle if middle else 0
    return [first if first is not None else even] + [even] * (pp - 2) + [last if last is not None else even]


def llm_layer_params(llm: LLMConfig, tp: int) -> int:
    """Two RMSNorms; QKV (GQA; with its bias, Qwen2), output projection, gate/up and down projections
    split over TP; the per-head q / k norms (Qwen3) replicated."""
    h, f = llm.hidden_size, llm.ffn_hidden_size
    q, kv = llm.qkv_widths
    qkv_bias = q + 2 * kv if llm.qkv_bias else 0
    qk_norm = 2 * llm.kv_channels if llm.qk_norm else 0
    return 2 * h + (h * (q + 2 * kv) + qkv_bias + q * h + 3 * h * f) // tp + qk_norm


def vision_params(vision: VisionConfig, tp: int) -> int:
    """Patch and position embeddings (CLIP: class token and pre-norm), then the built layers."""
    w, f, clip = vision.hidden_size, vision.ffn_hidden_size, vision.family == "clip"
    tokens = vision.num_patches + clip
    # patch convolution, position embedding; CLIP: class token and pre-norm, SigLIP: the convolution's bias
    embeddings = 3 * vision.patch_size**2 * w + tokens * w + (3 * w if clip else w)
    layer = (
        4 * w  # two LayerNorms (weight and bias)
        + (3 * w * w + 3 * w) // tp + w * w // tp + w  # QKV with bias, output projection (bias replicated)
        + (w * f + f) // tp + f * w // tp + w  # FC1 with bias, FC2 (bias replicated)
    )
    return embeddings + vision.layers_used * layer


def projector_params(in_width: int, hidden: int, tp: int) -> int:
    """mlp2x_gelu: column-parallel Linear(in -> H) with bias, row-parallel Linear(H -> H) with bias."""
    return (in_width * hidden + hidden) // tp + hidden * hidden // tp + hidden


def visual_head_params(head: HeadConfig, codes: CodebookSpec, llm_hidden: int, tp: int) -> int:
    """One ASVR head: projection, code embedding, depth layers (per-depth MLPs), final norm, classifiers."""
    e, d = head.hidden_size, codes.depth
    proj = (llm_hidden * e + e) // tp + e * e // tp + e
    code_embed = codes.dim * e + e
    layer = 2 * e + (3 * e * e + 3 * e) // tp + e * e // tp + e + d * (2 * head.mlp_ratio * e * e) // tp
    classifiers = sum((padded_vocab_size(v, tp) * (e + 1)) // tp for v in codes.sizes)
    return proj + code_embed + head.num_layers * layer + e + classifiers


def stage_parameters(model: ModelConfig, tensor_parallel: int, pipeline_parallel: int) -> List[Dict[str, int]]:
    """Per pipeline stage: part -> parameters on one GPU (one TP shard) of that stage."""
    llm, tp, pp = model.llm, tensor_parallel, pipeline_parallel
    h = llm.hidden_size
    vocab_shard = padded_vocab_size(llm.vocab_size, tp) * h // tp
    stages = [{"llm_layers": n * llm_layer_params(llm, tp)} for n in layers_per_stage(llm, pp)]
    first, last = stages[0], stages[-1]
    if model.asvr.discrete_input:
        first["projector"] = projector_params(model.asvr.semantic.dim, h, tp)
    else:
        first["vision"] = vision_params(model.vision, tp)
        first["projector"] = projector_params(model.vision.hidden_size, h, tp)
    first["embedding"] = vocab_shard
    # Tied embeddings share the embedding's weight on a single stage; with PP the last stage keeps a copy.
    last["output"] = h + (vocab_shard if llm.untie_embeddings or pp > 1 else 0)
    if model.asvr.branches:
        last["visual_head"] = sum(
            visual_head_params(model.asvr.head, getattr(model.asvr, b), h, tp) for b in model.asvr.branches
        )
    return stages
