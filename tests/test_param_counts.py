"""Parameter counts at the real sizes, built on the meta device, against numbers derived by hand.

Vicuna-7B (LLaMA-2 shapes), SigLIP-SO400M/14@384 (26 of 27 layers built: features
of block 26, no post-norm), mlp2x_gelu projector, the ASVR head at E=2048, D=8, V=16384.
"""

import torch

from tests.support.multirank import run_ranks
from megatron_asvr.config import LLM_PRESETS, VISION_PRESETS, ModelConfig, ParallelConfig

H, E, C, V, D, FFN, L = 4096, 2048, 1152, 16384, 8, 11008, 32
VOCAB = 32000
SIGLIP_W, SIGLIP_FFN, SIGLIP_LAYERS_BUILT = 1152, 4304, 26

HEAD_PROJ = (H * E + E) + (E * E + E)  # head_proj: Linear(H -> E), GELU, Linear(E -> E)
HEAD_LAYER = (
    2 * E  # RMSNorm1, RMSNorm2
    + (3 * E * E + 3 * E) + (E * E + E)  # attention with biases
    + D * (E * 2 * E + 2 * E * E)  # one bias-free E -> 2E -> E MLP per depth
)
HEAD = (C * E + E) + 3 * HEAD_LAYER + E + D * (E * V + V)  # code embed, layers, final norm, classifiers
LLM_LAYER = 2 * H + 4 * H * H + 3 * H * FFN  # norms, q k v o, gate/up/down
LLM = 2 * VOCAB * H + L * LLM_LAYER + H  # untied embeddings and LM head, final norm
ENCODER_LAYER = (4 * SIGLIP_W + 4 * SIGLIP_W * SIGLIP_W + 4 * SIGLIP_W + 2 * SIGLIP_W * SIGLIP_FFN + SIGLIP_FFN
                 + SIGLIP_W)
ENCODER = (3 * 14 * 14 * SIGLIP_W + SIGLIP_W) + 729 * SIGLIP_W + SIGLIP_LAYERS_BUILT * ENCODER_LAYER
PROJECTOR = (SIGLIP_W * H + H) + (H * H + H)


def _count_on_meta():
    from megatron_asvr import runtime
    from megatron_asvr.model.vlm import stage_builder

    runtime.initialize(ParallelConfig())
    model = ModelConfig(vision=VISION_PRESETS["siglip_so400m_384"], llm=LLM_PRESETS["vicuna_7b"])
    codebooks = {"semantic": [torch.empty(V, C, device="meta") for _ in range(D)]}
    with torch.device("meta"):
        build = stage_builder(model, ParallelConfig(), "local", codebooks,
                              use_cpu_initialization=True, perform_initialization=False)
        stage = build(True, True, None)
    counts = {}
    for name, param in stage.named_parameters():
        assert param.device.type == "meta"
        part = name.split(".")[0]
        if name.startswith("visual_heads.semantic.proj."):
            part = "head_proj"
        counts[part] = counts.get(part, 0) + param.numel()
    runtime.destroy()
    return counts


def test_parameter_counts_at_reference_sizes():
    counts = run_ranks(_count_on_meta, 1)[0]
    assert HEAD_LAYER * 3 == 453_021_696  # "3 layers ~453M"
    assert 3 * D * 4 * E * E == 402_653_184  # "per-depth MLPs ~403M"
    assert D * (E * V + V) == 268_566_528  # "8 classifiers ~269M"
    assert HEAD == 723_951_616 and HEAD_PROJ == 12_587_008  # "about 724M plus the 12.6M projector"
    assert LLM == 6_738_415_616  # LLaMA-2-7B
    assert counts == {
        "visual_heads": HEAD,
        "head_proj": HEAD_PROJ,
        "language_model": LLM,
        "vision_encoder": ENCODER,
        "projector": PROJECTOR,
    }
    assert sum(counts.values()) == 7_894_203_680
