"""Our megatron SigLIP / CLIP encoder, loaded from HF weights, matches transformers' hidden_states[-2]."""

import pytest
import torch

from tests.support.multirank import run_ranks
from megatron_asvr.config import ConfigError, ParallelConfig, VisionConfig
from megatron_asvr.model.hf_vision import hf_vision_to_canonical
from megatron_asvr.model.qkv import fuse_qkv, split_qkv

TOL = 1e-5  # fp32, max abs difference of features

SIGLIP = VisionConfig(family="siglip", num_layers=3, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48,
                      patch_size=14, image_size=34, activation="gelu_tanh", norm_eps=1e-6)
CLIP = VisionConfig(family="clip", num_layers=3, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48,
                    patch_size=14, image_size=28, activation="quick_gelu", norm_eps=1e-5)


def _hf_model(vision: VisionConfig):
    """A random HF vision model with the same shape (transformers is the reference)."""
    import transformers

    common = dict(hidden_size=vision.hidden_size, intermediate_size=vision.ffn_hidden_size,
                  num_hidden_layers=vision.num_layers, num_attention_heads=vision.num_attention_heads,
                  image_size=vision.image_size, patch_size=vision.patch_size, layer_norm_eps=vision.norm_eps)
    torch.manual_seed(0)
    if vision.family == "siglip":
        config = transformers.SiglipVisionConfig(**common, hidden_act="gelu_pytorch_tanh")
        model = transformers.SiglipVisionModel(config)
    else:
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**common, hidden_act="quick_gelu"))
    with torch.no_grad():  # non-trivial norms and biases
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _our_features(vision, tp, hf_state, images):
    from megatron_asvr import runtime
    from megatron_asvr.model.canonical import full_state, load_full_state
    from megatron_asvr.model.vision import VisionEncoder, vision_transformer_config

    runtime.initialize(ParallelConfig(tensor_parallel=tp))
    config = vision_transformer_config(vision, ParallelConfig(tensor_parallel=tp), "local")
    encoder = VisionEncoder(vision, config, "local")
    canonical, skipped = hf_vision_to_canonical(hf_state, vision)
    load_full_state([encoder], canonical)
    assert sorted(full_state([encoder])) == sorted(canonical)
    features = encoder(images)
    frozen = not any(p.requires_grad for p in encoder.parameters())
    runtime.destroy()
    return features, skipped, frozen


@pytest.mark.parametrize("vision", [SIGLIP, CLIP], ids=["siglip", "clip"])
def test_encoder_matches_transformers_hidden_states_minus_2(vision):
    hf = _hf_model(vision)
    images = torch.randn(2, 3, vision.image_size, vision.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(pixel_values=images, output_hidden_states=True).hidden_states[-2]
    if vision.family == "clip":
        expected = expected[:, 1:]  # LLaVA's "patch" selection drops the class token
    assert expected.shape == (2, vision.num_patches, vision.hidden_size)
    state = hf.state_dict()
    for tp in (1, 2):
        results = run_ranks(_our_features, tp, vision, tp, state, images)
        for features, skipped, frozen in results:
            assert (features - expected).abs().max().item() <= TOL
            assert frozen
            # the last layer and post-norm are never built: exactly those weights are skipped
            assert all(k.startswith(("encoder.layers.2.", "post_layernorm.", "head.")) for k in skipped)
            assert any(k.startswith("encoder.layers.2.") for k in skipped)


def test_siglip_384_gives_729_patches():
    from megatron_asvr.config import VISION_PRESETS

    siglip = VISION_PRESETS["siglip_so400m_384"]
    assert (siglip.grid, siglip.num_patches, siglip.layers_used) == (27, 729, 26)
    assert VISION_PRESETS["clip_vit_l_336"].num_patches == 576


def test_import_is_strict():
    state = _hf_model(SIGLIP).state_dict()
    renamed = dict(state)
    renamed["encoder.layers.0.mlp.fc1.wieght"] = renamed.pop("encoder.layers.0.mlp.fc1.weight")
    with pytest.raises(KeyError, match="lack encoder.layers.0.mlp.fc1.weight"):
        hf_vision_to_canonical(renamed, SIGLIP)
    extra = dict(state, **{"embeddings.extra": torch.zeros(1)})
    with pytest.raises(KeyError, match="unexpected HF vision weight embeddings.extra"):
        hf_vision_to_canonical(extra, SIGLIP)


def test_fused_qkv_layout_round_trips_with_gqa():
    q, k, v = torch.randn(8 * 3, 5), torch.randn(2 * 3, 5), torch.randn(2 * 3, 5)
    fused = fuse_qkv(q, k, v, num_heads=8, num_groups=2)
    # group 0 holds heads 0-3 then its k and v head
    assert torch.equal(fused[:12], q[:12]) and torch.equal(fused[12:15], k[:3]) and torch.equal(fused[15:18], v[:3])
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, 8, 2), (q, k, v)))


def test_vision_config_validation():
    with pytest.raises(ConfigError, match="vision.num_attention_heads=4 is not divisible"):
        SIGLIP.validate(ParallelConfig(tensor_parallel=8))
    with pytest.raises(ConfigError, match="feature_layer=-5 selects no encoder layer"):
        VisionConfig(num_layers=3, feature_layer=-5).validate(ParallelConfig())


@pytest.mark.parametrize("height, width, patch, bias", [(384, 384, 128, True), (34, 30, 14, True), (28, 28, 14, False)])
def test_patch_embedding_matmul_equals_the_strided_convolution(height, width, patch, bias):
    """PatchEmbedding (megatron's conv1, computed as one matmul) against torch's convolution,
    remainders that do not fill a patch included."""
    from megatron_asvr.model.vision import PatchEmbedding

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 24, patch, stride=patch, bias=bias)
    images = torch.randn(2, 3, height, width)
    expected = conv(images)  # [b, h, rows, cols]
    conv.__class__ = PatchEmbedding
    got = conv(images)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), (got - expected).abs().max()
