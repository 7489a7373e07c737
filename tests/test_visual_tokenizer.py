"""DualToken visual tokenizer: strict loading of the released format, RQ against brute force, both branches."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.support.multirank import run_ranks
from megatron_asvr.tokenizers.visual_format import (
    TokenizerFileError,
    VisualCodesMeta,
    read_config,
    split_checkpoint,
)
from megatron_asvr.tokenizers.visual_rq import ResidualQuantizer, code_counts, perplexity, relative_errors

# A tiny SigLIP (3 blocks, 3 x 3 patches of width 32) with DualToken's taps at blocks 1 and 2.
TINY_SIGLIP = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                   image_size=42, patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")
SEMANTIC_LAYER, APPEARANCE_LAYER = 2, 1
SIZES = [24, 20, 16, 12]  # V_d per depth


def tiny_hf_siglip(seed: int = 0):
    """A random transformers SiglipVisionModel with non-trivial norms and biases."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**TINY_SIGLIP))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def released_config(sizes=SIZES, width=32, grid=3) -> dict:
    """config.json as DualToken ships it (ASVR's RQVAESiglipConfig fields), at tiny size."""
    depth = len(sizes)
    return {
        "architectures": ["RQVAESIGLIPTransformer"],
        "model_type": "rqvaesigliptransformer_model",
        "hidden_size": width,
        "rqvaesiglip": {
            "architectures": ["RQVAESiglip"], "bottleneck_type": "rq", "checkpointing": True,
            "code_shape": [grid, grid, depth], "latent_shape": [grid, grid, width], "embed_dim": width,
            "hidden_size": width, "n_embed": list(sizes), "shared_codebook": False, "restart_unused_codes": True,
            "decay": 0.99, "model_type": "rqvaesiglip_model", "pretrained_model": "/models/tiny-siglip",
            "ddconfig": {"ch": 128, "ch_mult": [1, 1, 4], "decoder_in_channels": 64, "resolution": 42},
            "layer_sem": SEMANTIC_LAYER, "layer_recon": APPEARANCE_LAYER, "vision_config": TINY_SIGLIP,
        },
        "rqtransformer": {
            "architectures": ["RQTransformer"], "block_size": [grid, grid, depth], "embed_dim": 64,
            "input_embed_dim_1": width, "vocab_size": list(sizes), "head": {"block": {"n_head": 4}, "n_layer": 3},
        },
    }


def released_state(hf_model, sizes=SIZES, seed: int = 1) -> dict:
    """A state_dict with the released key names: SigLIP, both RQs, the projection, and weights we skip."""
    g = torch.Generator().manual_seed(seed)
    width = TINY_SIGLIP["hidden_size"]
    state = {f"siglip_model.vision_model.{k}": v.clone() for k, v in hf_model.state_dict().items()}
    for quantizer in ("quantizer_semantic", "quantizer"):
        for d, size in enumerate(sizes):
            scale = 2.0 ** -d  # residuals shrink with depth
            state[f"{quantizer}.codebooks.{d}.weight"] = torch.randn(size + 1, width, generator=g) * scale
            state[f"{quantizer}.codebooks.{d}.cluster_size_ema"] = torch.ones(size)
    for name in ("norm1", "norm2"):
        state[f"prequant_visual.{name}.weight"] = 1 + 0.1 * torch.randn(width, generator=g)
        state[f"prequant_visual.{name}.bias"] = 0.1 * torch.randn(width, generator=g)
    state["prequant_visual.conv1.weight"] = 0.2 * torch.randn(width, width, 1, 1, generator=g)
    state["prequant_visual.conv1.bias"] = 0.1 * torch.randn(width, generator=g)
    state["prequant_visual.conv2.weight"] = 0.05 * torch.randn(width, width, 3, 3, generator=g)
    state["prequant_visual.conv2.bias"] = 0.1 * torch.randn(width, generator=g)
    state.update({  # parts of DualToken that ASVR never runs
        "siglip_model.text_model.embeddings.token_embedding.weight": torch.zeros(10, width),
        "siglip_model.logit_scale": torch.zeros(1),
        "siglip_model.logit_bias": torch.zeros(1),
        "postquant_visual.conv1.weight": torch.zeros(width, width, 1, 1),
        "post_quant_conv.conv1.weight": torch.zeros(64, width, 1, 1),
        "decoder.conv_in.weight": torch.zeros(128, 64, 3, 3),
    })
    return state


def write_released(tmp_path, state):
    """config.json + a ``{"state_dict": state}`` checkpoint in tmp_path; returns both paths."""
    config_path, checkpoint_path = tmp_path / "config.json", tmp_path / "dualtoken.ckpt"
    config_path.write_text(json.dumps(released_config()))
    torch.save({"state_dict": state}, checkpoint_path)
    return config_path, checkpoint_path


def read_config_from(data: dict, directory):
    path = directory / "config.json"
    path.write_text(json.dumps(data))
    return read_config(path)


def numpy_rq(features: np.ndarray, codebooks) -> np.ndarray:
    """Brute force: every squared distance in float64, residuals in float32 as the quantizer keeps them."""
    residual, codes = features.astype(np.float32).copy(), []
    for book in codebooks:
        distances = ((residual[:, None, :].astype(np.float64) - book[None].astype(np.float64)) ** 2).sum(-1)
        chosen = distances.argmin(axis=1)
        residual -= book[chosen]
        codes.append(chosen)
    return np.stack(codes, axis=-1)


def sampled_codebooks(features: np.ndarray, sizes, seed: int = 0):
    """Codebooks drawn from the residuals the brute-force RQ itself produces at each depth."""
    rng = np.random.default_rng(seed)
    residual, books = features.astype(np.float32).copy(), []
    for size in sizes:
        book = residual[rng.choice(len(residual), size, replace=False)].copy()
        books.append(book)
        residual -= book[numpy_rq(residual, [book])[:, 0]]
    return books


def test_rq_codes_equal_numpy_brute_force_and_error_falls_with_depth():
    rng = np.random.default_rng(0)
    features = rng.standard_normal((600, 8)).astype(np.float32) * rng.uniform(0.5, 3.0, 8).astype(np.float32)
    books = sampled_codebooks(features, [64, 48, 32, 32, 16])
    quantizer = ResidualQuantizer([torch.from_numpy(b) for b in books])
    codes = quantizer.codes(torch.from_numpy(features).reshape(20, 30, 8))
    assert codes.shape == (20, 30, 5) and codes.dtype == torch.int64
    expected = numpy_rq(features, books)
    np.testing.assert_array_equal(codes.reshape(-1, 5).numpy(), expected)

    errors = relative_errors(quantizer.squared_errors(torch.from_numpy(features), codes))
    residual, expected_errors = features.astype(np.float64), []
    for d, book in enumerate(books):
        residual = residual - book[expected[:, d]]
        expected_errors.append((residual ** 2).sum() / (features.astype(np.float64) ** 2).sum())
    np.testing.assert_allclose(errors, expected_errors, rtol=1e-6)
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[0] < 0.5 and errors[-1] < 0.2 * errors[0]


def test_bf16_mode_is_the_released_computation():
    """bf16 codes equal ASVR's VQEmbedding/RQBottleneck code path (transcribed) with bf16 weights."""
    g = torch.Generator().manual_seed(3)
    features = torch.randn(300, 32, generator=g) * 20  # SigLIP block-26 features are large
    books = [torch.randn(65, 32, generator=g) * s for s in (20.0, 8.0, 3.0)]  # with padding rows

    residual, expected = features.to(torch.bfloat16).clone(), []
    for weight in books:  # released: distances against weight[:-1], then embedding lookup, in bf16
        codebook_t = weight.to(torch.bfloat16)[:-1, :].t()
        norms = residual.pow(2.0).sum(dim=1, keepdim=True) + codebook_t.pow(2.0).sum(dim=0, keepdim=True)
        distances = torch.addmm(norms, residual, codebook_t, alpha=-2.0)
        chosen = distances.argmin(dim=-1)
        residual.sub_(F.embedding(chosen, weight.to(torch.bfloat16), padding_idx=64))
        expected.append(chosen)
    quantizer = ResidualQuantizer([b[:-1] for b in books])
    bf16 = quantizer.codes(features, "bf16")
    assert torch.equal(bf16, torch.stack(expected, dim=-1))
    fp32 = quantizer.codes(features, "fp32")
    assert torch.equal(fp32, torch.from_numpy(numpy_rq(features.numpy(), [b[:-1].numpy() for b in books])))
    assert (bf16 != fp32).any(dim=-1).float().mean() < 0.5  # the two modes mostly agree
    with pytest.raises(ValueError, match="precision must be one of"):
        quantizer.codes(features, "fp16")


def test_padding_row_is_never_selected(tmp_path):
    hf = tiny_hf_siglip()
    config = read_config_from(released_config(), tmp_path)
    state = released_state(hf)
    features = torch.randn(50, 32, generator=torch.Generator().manual_seed(5))
    # The padding row of depth 0 sits exactly on a feature: the closest row of all, yet never a code.
    state["quantizer_semantic.codebooks.0.weight"][-1] = features[7]
    weights = split_checkpoint(state, config, "dualtoken.ckpt")
    books = weights.codebooks["semantic"]
    assert [tuple(b.shape) for b in books] == [(size, 32) for size in SIZES]
    codes = ResidualQuantizer(books).codes(features)
    for d, size in enumerate(SIZES):
        assert codes[:, d].max().item() < size


def test_split_checkpoint_sorts_and_skips_the_released_keys(tmp_path):
    hf = tiny_hf_siglip()
    state = released_state(hf)
    weights = split_checkpoint(state, read_config_from(released_config(), tmp_path), "dualtoken.ckpt")
    assert sorted(weights.projection) == sorted(
        f"{m}.{p}" for m in ("norm1", "conv1", "norm2", "conv2") for p in ("weight", "bias"))
    assert torch.equal(weights.codebooks["appearance"][2], state["quantizer.codebooks.2.weight"][:-1])
    skipped = set(weights.skipped)
    assert {"siglip_model.logit_scale", "decoder.conv_in.weight", "postquant_visual.conv1.weight",
            "quantizer.codebooks.0.cluster_size_ema", "siglip_model.vision_model.post_layernorm.weight"} <= skipped
    # Blocks after the semantic one (index 2 of 0..2) are never built.
    assert "siglip_model.vision_model.encoder.layers.2.mlp.fc1.weight" in skipped
    assert "siglip_model.vision_model.encoder.layers.1.mlp.fc1.weight" not in skipped
    assert "vit.decoder.layers.1.mlp.linear_fc1.weight" in weights.vision
    assert len(weights.vision) == 3 + 2 * 12  # patch conv w/b, positions; 12 per built block


@pytest.mark.parametrize("old, new", [
    ("quantizer_semantic.codebooks.3.weight", "quantizer_semantic.codebook.3.weight"),
    ("prequant_visual.conv2.bias", "prequant_visual.conv_2.bias"),
    ("quantizer.codebooks.0.weight", "quantizer.codebooks.9.weight"),
])
def test_renamed_key_is_named_missing_and_unexpected(tmp_path, old, new):
    state = released_state(tiny_hf_siglip())
    state[new] = state.pop(old)
    with pytest.raises(TokenizerFileError) as err:
        split_checkpoint(state, read_config_from(released_config(), tmp_path), "dualtoken.ckpt")
    message = str(err.value)
    assert message.startswith("dualtoken.ckpt: checkpoint does not match the tokenizer config")
    assert f"missing keys 1 ({old})" in message and f"unexpected keys 1 ({new})" in message


def test_renamed_siglip_key_is_named(tmp_path):
    state = released_state(tiny_hf_siglip())
    key = "siglip_model.vision_model.encoder.layers.1.self_attn.k_proj.weight"
    state[key.replace("k_proj", "key_proj")] = state.pop(key)
    with pytest.raises(TokenizerFileError, match=f"lack {key}"):
        split_checkpoint(state, read_config_from(released_config(), tmp_path), "dualtoken.ckpt")
    # the old encoder's semantic projection changes what the codes mean: refused, not skipped
    state = released_state(tiny_hf_siglip())
    state["prequant_semantic.conv1.weight"] = torch.zeros(32, 32, 1, 1)
    with pytest.raises(TokenizerFileError, match=r"unexpected keys 1 \(prequant_semantic.conv1.weight\)"):
        split_checkpoint(state, read_config_from(released_config(), tmp_path), "dualtoken.ckpt")


def test_codebook_shape_mismatch_is_named(tmp_path):
    state = released_state(tiny_hf_siglip())
    state["quantizer.codebooks.1.weight"] = state["quantizer.codebooks.1.weight"][:-1]  # no padding row
    message = r"quantizer.codebooks.1.weight has shape \(20, 32\), the config says \(20 \+ 1 padding, 32\)"
    with pytest.raises(TokenizerFileError, match=message):
        split_checkpoint(state, read_config_from(released_config(), tmp_path), "dualtoken.ckpt")


def test_released_config_defaults_to_so400m_blocks_26_and_6(tmp_path):
    """The released layout carries no SigLIP shape and no layer numbers: ASVR's fixed taps apply."""
    data = released_config(sizes=[16384] * 8, width=1152, grid=27)
    for key in ("vision_config", "layer_sem", "layer_recon"):
        del data["rqvaesiglip"][key]
    data["rqvaesiglip"]["n_embed"] = 16384
    data["rqvaesiglip"]["pretrained_model"] = "/your/path/to/siglip-so400m-patch14-384"
    config = read_config_from(data, tmp_path)
    assert (config.semantic_layer, config.appearance_layer, config.vision.layers_used) == (26, 6, 26)
    assert config.codebook_sizes == (16384,) * 8 and config.code_width == 1152
    meta = config.metadata("semantic")
    assert meta == VisualCodesMeta("semantic", 8, (16384,) * 8, 1152, 26, 384, 729)
    assert config.metadata("appearance").feature_layer == 6
    assert VisualCodesMeta.from_json(json.loads(json.dumps(meta.to_json()))) == meta


@pytest.mark.parametrize("section, field, value, message", [
    ("rqtransformer", "vocab_size", [24, 20, 16, 13],
     r"rqtransformer.vocab_size=\(24, 20, 16, 13\) does not match rqvaesiglip.n_embed"),
    ("rqtransformer", "input_embed_dim_1", 64,
     r"input_embed_dim_1=64 does not match rqvaesiglip.latent_shape\[2\] \(32\)"),
    ("rqvaesiglip", "code_shape", [1, 1, 4], "differ in the grid"),
    ("rqvaesiglip", "n_embed", [24, 20], "n_embed must have 4 entries"),
    ("rqvaesiglip", "layer_recon", 3, r"need 1 <= layer_recon \(3\) <= layer_sem \(2\)"),
    ("rqvaesiglip", "vision_config", None, "pretrained_model names 'tiny-siglip', not a known SigLIP"),
])
def test_config_errors_name_file_and_field(tmp_path, section, field, value, message):
    data = released_config()
    if value is None:
        del data[section][field]
    else:
        data[section][field] = value
    with pytest.raises(TokenizerFileError, match=message) as err:
        read_config_from(data, tmp_path)
    assert str(err.value).startswith(str(tmp_path / "config.json"))


def test_missing_state_dict_entry_is_named(tmp_path):
    from megatron_asvr.tokenizers.visual_format import read_state_dict

    torch.save({"model": {}}, tmp_path / "bad.ckpt")
    message = r"bad.ckpt: expected a dict with a 'state_dict' entry, found \['model'\]"
    with pytest.raises(TokenizerFileError, match=message):
        read_state_dict(tmp_path / "bad.ckpt")


def test_codebooks_load_without_the_encoder(tmp_path):
    from megatron_asvr.tokenizers.visual import load_codebooks

    state = released_state(tiny_hf_siglip())
    config_path, checkpoint_path = write_released(tmp_path, state)
    meta, vectors = load_codebooks(config_path, checkpoint_path, "appearance")
    assert meta == VisualCodesMeta("appearance", 4, tuple(SIZES), 32, APPEARANCE_LAYER, 42, 9)
    assert len(vectors) == 4
    for d, book in enumerate(vectors):
        assert torch.equal(book, state[f"quantizer.codebooks.{d}.weight"][:-1])


def test_code_usage_perplexity():
    codes = torch.tensor([[0, 1], [1, 1], [2, 1], [3, 1]])
    counts = code_counts(codes, [4, 3])
    assert counts[0].tolist() == [1, 1, 1, 1] and counts[1].tolist() == [0, 4, 0]
    assert perplexity(counts[0]) == pytest.approx(4.0) and perplexity(counts[1]) == pytest.approx(1.0)


def reference_codes(hf_model, state, images, branches):
    """HF's hidden states, the released projection written out with torch.nn.functional, numpy RQ."""
    with torch.no_grad():
        hidden = hf_model(pixel_values=images, output_hidden_states=True).hidden_states
        out = {}
        for branch in branches:
            if branch == "semantic":
                features, quantizer = hidden[SEMANTIC_LAYER], "quantizer_semantic"
            else:
                b, p, c = hidden[APPEARANCE_LAYER].shape
                x = hidden[APPEARANCE_LAYER].reshape(b, 3, 3, c).permute(0, 3, 1, 2)  # [b, C, 3, 3]
                w = {k[len("prequant_visual."):]: v for k, v in state.items() if k.startswith("prequant_visual.")}
                h = F.silu(F.group_norm(x, 32, w["norm1.weight"], w["norm1.bias"], 1e-6))
                h = F.conv2d(h, w["conv1.weight"], w["conv1.bias"])
                h = F.silu(F.group_norm(h, 32, w["norm2.weight"], w["norm2.bias"], 1e-6))
                h = F.conv2d(h, w["conv2.weight"], w["conv2.bias"], padding=1)
                features, quantizer = (x + h).permute(0, 2, 3, 1).reshape(b, p, c), "quantizer"
            books = [state[f"{quantizer}.codebooks.{d}.weight"][:-1].numpy() for d in range(len(SIZES))]
            flat = numpy_rq(features.reshape(-1, features.shape[-1]).numpy(), books)
            out[branch] = torch.from_numpy(flat).reshape(*features.shape[:2], len(SIZES))
    return out


def _tokenizer_codes(config_path, checkpoint_path, images, tp):
    from megatron_asvr import runtime
    from megatron_asvr.config import ParallelConfig
    from megatron_asvr.tokenizers.visual import load_visual_tokenizer

    runtime.initialize(ParallelConfig(tensor_parallel=tp))
    tokenizer = load_visual_tokenizer(config_path, checkpoint_path, parallel=ParallelConfig(tensor_parallel=tp))
    semantic, appearance = tokenizer.dual_codes(images)
    result = {
        "semantic": semantic,
        "appearance": appearance,
        "semantic_only": tokenizer.semantic_codes(images),
        "appearance_only": tokenizer.appearance_codes(images),
        "bf16": load_visual_tokenizer(config_path, checkpoint_path, "bf16").semantic_codes(images),
        "vectors": tokenizer.codebook_vectors("semantic"),
        "meta": tokenizer.metadata("appearance"),
        "trainable": sum(p.requires_grad for p in tokenizer.parameters()),
    }
    runtime.destroy()
    return result


@pytest.mark.parametrize("tp", [1, 2])
def test_dualtoken_checkpoint_loads_and_gives_reference_codes(tmp_path, tp):
    hf = tiny_hf_siglip()
    state = released_state(hf)
    config_path, checkpoint_path = write_released(tmp_path, state)
    images = torch.randn(3, 3, 42, 42, generator=torch.Generator().manual_seed(2))
    expected = reference_codes(hf, state, images, ("semantic", "appearance"))
    for result in run_ranks(_tokenizer_codes, tp, config_path, checkpoint_path, images, tp):
        assert result["semantic"].shape == (3, 9, 4)
        assert torch.equal(result["semantic"], expected["semantic"])
        assert torch.equal(result["appearance"], expected["appearance"])
        assert torch.equal(result["semantic_only"], expected["semantic"])
        assert torch.equal(result["appearance_only"], expected["appearance"])
        assert not torch.equal(expected["semantic"], expected["appearance"])
        # bf16 runs the whole tokenizer in bf16: most codes agree with fp32 at depth 0
        assert (result["bf16"][..., 0] == expected["semantic"][..., 0]).float().mean() >= 0.5
        for d, vectors in enumerate(result["vectors"]):
            assert torch.equal(vectors, state[f"quantizer_semantic.codebooks.{d}.weight"][:-1])
        assert result["meta"] == VisualCodesMeta("appearance", 4, tuple(SIZES), 32, APPEARANCE_LAYER, 42, 9)
        assert result["trainable"] == 0
