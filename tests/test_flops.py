"""The whole-model FLOP formula against numbers worked out by hand.

Shapes: Vicuna-7B (h 4096, FFN 11008, 32 layers) and Vicuna-13B (h 5120, FFN
13824, 40 layers), vocabulary 32000, sequence 2048; SigLIP-SO400M/14@384 (26 of
27 layers built, 729 patches); the ASVR head at E 2048, D 8, 16384 codes, code
width 1152. Every GEMM is 2 x rows x inner x outer FLOPs.
"""

import dataclasses

from megatron_asvr.config import LLM_PRESETS, VISION_PRESETS, ASVRConfig, ModelConfig
from megatron_asvr.model.flops import StepShape, causal_keys_per_query, step_flops

SEQ, PATCHES = 2048, 729

# --- Vicuna-7B, forward FLOPs per token ---------------------------------------
QKV_7B = 2 * 4096 * (4096 + 4096 + 4096)  # 100_663_296
OUT_7B = 2 * 4096 * 4096  # 33_554_432
MLP_7B = 2 * 4096 * (2 * 11008) + 2 * 11008 * 4096  # gate+up, down: 270_532_608
ATTN_7B = 2 * 2 * (SEQ // 2) * 4096  # scores and values over s/2 causal keys: 16_777_216
LLM_TOKEN_7B = 32 * (QKV_7B + OUT_7B + MLP_7B + ATTN_7B) + 2 * 4096 * 32000  # + LM head

# --- Vicuna-13B -----------------------------------------------------------------
QKV_13B = 2 * 5120 * (3 * 5120)
OUT_13B = 2 * 5120 * 5120
MLP_13B = 2 * 5120 * (2 * 13824) + 2 * 13824 * 5120
ATTN_13B = 2 * 2 * (SEQ // 2) * 5120
LLM_TOKEN_13B = 40 * (QKV_13B + OUT_13B + MLP_13B + ATTN_13B) + 2 * 5120 * 32000

# --- SigLIP-SO400M, forward FLOPs per 384 x 384 tile ------------------------------
ENC_TOKEN_LAYER = 2 * 1152 * (3 * 1152) + 2 * 1152 * 1152 + 2 * 1152 * 4304 * 2 + 2 * 2 * PATCHES * 1152
PATCH_EMBED = 2 * (3 * 14 * 14) * 1152  # the 14 x 14 x 3 convolution per patch
ENC_TILE = PATCHES * (26 * ENC_TOKEN_LAYER + PATCH_EMBED)


# --- projector and head, per image position ------------------------------------
def projector_row(h):
    return 2 * 1152 * h + 2 * h * h


def head_row(h):
    proj = 2 * h * 2048 + 2 * 2048 * 2048
    code_embed = 7 * (2 * 1152 * 2048)  # slots 1..7 embed the prefix sums of the codes
    slot_layer = (2 * 2048 * 3 * 2048 + 2 * 2048 * 2048  # QKV, output projection
                  + 2 * 2048 * 4096 + 2 * 4096 * 2048  # the slot's E -> 2E -> E MLP
                  + 2 * 2 * (8 / 2) * 2048)  # causal attention over the 8 depth slots
    classifiers = 8 * (2 * 2048 * 16384)
    return proj + code_embed + 3 * 8 * slot_layer + classifiers


def _model(llm: str, trainable, visual_loss=True) -> ModelConfig:
    return ModelConfig(vision=VISION_PRESETS["siglip_so400m_384"], llm=LLM_PRESETS[llm],
                       asvr=ASVRConfig(visual_loss=visual_loss), trainable=list(trainable))


STAGE1, STAGE2 = ["projector", "visual_head"], ["projector", "llm", "visual_head"]
ONE_SAMPLE = StepShape.uniform(samples=1, seq_length=SEQ, image_tiles=1, visual_rows=PATCHES)


def test_hand_numbers_are_the_known_magnitudes():
    assert LLM_TOKEN_7B == 13_751_025_664  # ~2 x 6.74B parameters, plus attention
    assert LLM_TOKEN_13B == 26_542_080_000
    assert ENC_TILE == 641_801_428_992
    assert projector_row(4096) == 42_991_616
    assert head_row(4096) == 2_206_466_048 and head_row(5120) == 2_210_660_352


def test_llm_part_equals_megatron_lm_formula():
    """Megatron-LM's num_floating_point_operations (causal halving, SwiGLU 3/2) for one sample."""
    for name, (h, f, layers), token in (("vicuna_7b", (4096, 11008, 32), LLM_TOKEN_7B),
                                        ("vicuna_13b", (5120, 13824, 40), LLM_TOKEN_13B)):
        megatron = 12 * SEQ * layers * h * h * ((1 + 1 + SEQ / h / 2) + f / h * 3 / 2 + 32000 / (2 * layers * h))
        got = step_flops(_model(name, STAGE2), ONE_SAMPLE)["llm"]
        assert got == 3 * SEQ * token
        assert abs(got - megatron) / megatron < 1e-12


def test_vicuna_7b_stage2_with_and_without_the_visual_head():
    asvr = step_flops(_model("vicuna_7b", STAGE2), ONE_SAMPLE)
    assert asvr == {
        "vision": ENC_TILE,  # frozen, under no_grad: forward only
        "projector": 3 * PATCHES * projector_row(4096),
        "llm": 3 * SEQ * LLM_TOKEN_7B,
        "visual_head": 3 * PATCHES * head_row(4096),
        "total": ENC_TILE + 3 * PATCHES * projector_row(4096) + 3 * SEQ * LLM_TOKEN_7B + 3 * PATCHES * head_row(4096),
    }
    assert asvr["total"] == 90_047_667_019_776  # 90.0 TFLOP per sample
    baseline = step_flops(_model("vicuna_7b", STAGE2, visual_loss=False), ONE_SAMPLE)
    assert baseline["visual_head"] == 0
    assert asvr["total"] - baseline["total"] == 3 * PATCHES * 2_206_466_048
    assert round(asvr["visual_head"] / asvr["total"], 4) == 0.0536  # the head: 5.4% of a stage-2 step


def test_vicuna_13b_stage1_frozen_llm_passes_gradients_to_the_projector():
    got = step_flops(_model("vicuna_13b", STAGE1), ONE_SAMPLE)
    assert got["llm"] == 2 * SEQ * LLM_TOKEN_13B  # forward + input gradients, no weight gradients
    assert got["visual_head"] == 3 * PATCHES * head_row(5120)
    assert got["projector"] == 3 * PATCHES * projector_row(5120)
    assert got["total"] == ENC_TILE + 3 * PATCHES * (projector_row(5120) + head_row(5120)) + 2 * SEQ * LLM_TOKEN_13B
    baseline = step_flops(_model("vicuna_13b", STAGE1, visual_loss=False), ONE_SAMPLE)
    assert got["total"] - baseline["total"] == 3 * PATCHES * head_row(5120)


def test_vicuna_13b_stage2_scales_with_the_batch():
    batch = StepShape.uniform(samples=128, seq_length=SEQ, image_tiles=128, visual_rows=128 * PATCHES)
    got = step_flops(_model("vicuna_13b", STAGE2), batch)
    per_sample = ENC_TILE + 3 * PATCHES * (projector_row(5120) + head_row(5120)) + 3 * SEQ * LLM_TOKEN_13B
    assert got["total"] == 128 * per_sample
    baseline = step_flops(_model("vicuna_13b", STAGE2, visual_loss=False), batch)
    assert baseline["total"] == 128 * (ENC_TILE + 3 * PATCHES * projector_row(5120) + 3 * SEQ * LLM_TOKEN_13B)


def test_gradient_paths_decide_the_pass_factor():
    only_head = step_flops(_model("vicuna_7b", ["visual_head"]), ONE_SAMPLE)
    assert only_head["llm"] == SEQ * LLM_TOKEN_7B and only_head["projector"] == PATCHES * projector_row(4096)
    frozen_head = step_flops(_model("vicuna_7b", ["llm"]), ONE_SAMPLE)
    assert frozen_head["visual_head"] == 2 * PATCHES * head_row(4096)  # the visual loss still reaches the LLM
    model = _model("vicuna_7b", ["vision", "projector"])
    assert step_flops(model, ONE_SAMPLE)["vision"] == ENC_TILE  # vision.frozen wins over trainable
    unfrozen = dataclasses.replace(model, vision=dataclasses.replace(model.vision, frozen=False))
    assert step_flops(unfrozen, ONE_SAMPLE)["vision"] == 3 * ENC_TILE


def test_sliding_window_attends_fewer_keys():
    assert causal_keys_per_query(2048, 4096) == 1024  # within the window: Megatron's s / 2
    # 8192 positions, window 4096: sum_i min(i + 1, w) / s ~= (w^2 / 2 + (s - w) w) / s = 3072
    assert causal_keys_per_query(8192, 4096) == 3072
    mistral = ModelConfig(vision=VISION_PRESETS["siglip_so400m_384"], llm=LLM_PRESETS["mistral_7b"], trainable=STAGE2)
    short = step_flops(mistral, StepShape.uniform(1, 8192, 0, 0))["llm"]
    full = step_flops(dataclasses.replace(mistral, llm=dataclasses.replace(mistral.llm, sliding_window=None)),
                      StepShape.uniform(1, 8192, 0, 0))["llm"]
    assert full - short == 3 * 8192 * 32 * (2 * 2 * (4096 - 3072) * 4096)
