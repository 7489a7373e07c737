"""The pieces of the HF converter that need no model: configs, vocabulary rows, tensor rules,
key strictness, safetensors shards and tokenizer files."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from megatron_asvr.config import ConfigError, LLMConfig, ModelConfig, VisionConfig
from megatron_asvr.convert.hf_config import llava_from_hf, llava_to_hf, llm_from_hf
from megatron_asvr.convert.hf_llava import HUB, detect_prefixes, llava_rules, vision_tail_names
from megatron_asvr.convert.hf_llm import llm_rules
from megatron_asvr.convert.hf_tokenizer import write_tokenizer
from megatron_asvr.convert.hf_vocab import HFVocab, appended_vocab, rows_to_hf
from megatron_asvr.convert.safetensors_io import INDEX_NAME, SafetensorsDir, SafetensorsWriter, finalize_shards
from megatron_asvr.convert.visual_head_io import head_rules
from megatron_asvr.model.hf_rules import LazyCanonical, check_hf_keys

GQA = LLMConfig(num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=2, ffn_hidden_size=96,
                vocab_size=300)
VISION = VisionConfig(num_layers=3, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48, image_size=28)
MODEL = ModelConfig(vision=VISION, llm=GQA)


def _llava_config(**changes) -> dict:
    config = llava_to_hf(MODEL, HFVocab(image_token_index=300, pad_token_id=301, rows=320), 3, -2, "float32")
    config["text_config"]["vocab_size"] = 320
    config.update(changes)
    return config


def test_vocabulary_mapping_appends_llava_tokens_as_mean_rows():
    assert appended_vocab(32000) == HFVocab(image_token_index=32000, pad_token_id=32001, rows=32064)
    assert appended_vocab(512) == HFVocab(512, 513, 576)
    weight = torch.randn(640, 16)  # 600 tokens padded to 640 for TP
    hf = rows_to_hf(weight, 600, appended_vocab(600))
    assert hf.shape == (640, 16) and torch.equal(hf[:600], weight[:600])
    assert torch.allclose(hf[600], weight[:600].mean(0)) and torch.equal(hf[600], hf[639])
    # an appended token's logit is the mean of the real ones: never the arg-max
    hidden = torch.randn(50, 16)
    logits = hidden @ hf.T
    assert bool((logits[:, 600:].max(1).values < logits[:, :600].max(1).values).all())
    # imported from llava-hf: every HF row is a token, written back unchanged
    assert torch.equal(rows_to_hf(weight, 600, HFVocab(590, 591, 600)), weight[:600])
    with pytest.raises(ConfigError, match="cfg: pad_token_id=32064 is outside the 32064 embedding rows"):
        HFVocab(32000, 32064, 32064).validate(32000, "cfg")


def test_llm_rules_round_trip_gqa_qkv_and_gated_mlp():
    rules = llm_rules(GQA, appended_vocab(300), tensor_parallel=2)
    g = torch.Generator().manual_seed(0)
    shapes = {"q_proj": (64, 64), "k_proj": (16, 64), "v_proj": (16, 64), "o_proj": (64, 64), "gate_proj": (96, 64),
              "up_proj": (96, 64), "down_proj": (64, 96), "embed_tokens": (300, 64), "lm_head": (300, 64)}
    hf = {}
    for rule in rules:
        for name in rule.hf:
            shape = next((s for key, s in shapes.items() if key in name), (64,))
            hf[name] = torch.randn(*shape, generator=g)
    lazy = LazyCanonical(rules, hf.__getitem__)
    qkv = lazy["language_model.decoder.layers.1.self_attention.linear_qkv.weight"]
    # group 0 of 2: query heads 0-3 (32 rows), then its k head and v head (8 rows each)
    q, k, v = (hf[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv")
    assert torch.equal(qkv[:32], q[:32]) and torch.equal(qkv[32:40], k[:8]) and torch.equal(qkv[40:48], v[:8])
    fc1 = lazy["language_model.decoder.layers.0.mlp.linear_fc1.weight"]
    gate, up = hf["model.layers.0.mlp.gate_proj.weight"], hf["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(fc1, torch.cat([gate, up]))
    embedding = lazy["language_model.embedding.word_embeddings.weight"]
    assert embedding.shape == (384, 64) and not embedding[300:].any()  # padded to 128 rows, zeros
    for rule in rules:  # ours -> HF gives back the same tensors (embedding: plus the appended rows)
        back = rule.to_hf(lazy[rule.ours])
        for name, tensor in zip(rule.hf, back, strict=True):
            assert torch.equal(tensor[: hf[name].shape[0]], hf[name]), name
    assert rules[0].to_hf(embedding)[0].shape == (320, 64)


def test_layouts_are_detected_and_keys_are_strict():
    rules = llava_rules(MODEL, HFVocab(300, 301, 320), 1, HUB)
    hub = {name for rule in rules for name in rule.hf}
    assert detect_prefixes(hub, "hub") == HUB
    renames = {"vision_tower.vision_model.": "model.vision_tower.", "language_model.model.": "model.language_model.",
               "language_model.lm_head.": "lm_head.", "multi_modal_projector.": "model.multi_modal_projector."}
    in_memory = set()
    for key in hub:
        old = next(o for o in renames if key.startswith(o))
        in_memory.add(renames[old] + key[len(old):])
    prefixes = detect_prefixes(in_memory, "v5")
    assert (prefixes.vision, prefixes.llm) == ("model.vision_tower.", "model.language_model.")
    assert (prefixes.projector, prefixes.lm_head) == ("model.multi_modal_projector.", "lm_head.weight")
    tail = vision_tail_names(VISION, HUB.vision)
    assert tail[0] == "vision_tower.vision_model.encoder.layers.2.layer_norm1.weight" and len(tail) == 16 + 2

    def dropped(key):
        return key in tail

    assert check_hf_keys(rules, hub | set(tail), "dir", dropped) == sorted(tail)
    with pytest.raises(KeyError, match="dir: missing tensor language_model.model.layers.1.mlp.up_proj.weight"):
        check_hf_keys(rules, hub - {"language_model.model.layers.1.mlp.up_proj.weight"}, "dir")
    with pytest.raises(KeyError, match="dir: unexpected tensor language_model.model.layers.9.mlp.up_proj.weight"):
        check_hf_keys(rules, hub | {"language_model.model.layers.9.mlp.up_proj.weight"}, "dir")
    lazy = LazyCanonical(rules, lambda name: torch.zeros(1))
    head_norm = "visual_heads.semantic.final_norm.weight"
    assert head_norm not in lazy and lazy.unmatched == {head_norm}


def test_visual_head_export_removes_tp_padding_and_splits_qkv():
    rules = {r.ours: r for r in head_rules(MODEL.asvr, tensor_parallel=2)}
    classifier = rules["visual_heads.semantic.classifiers.0.weight"]
    assert classifier.hf == ("semantic.classifiers.0.weight",)
    padded = torch.randn(16384, 8)
    assert classifier.to_hf(padded)[0].shape == (16384, 8)
    small = dataclasses.replace(MODEL.asvr, semantic=dataclasses.replace(MODEL.asvr.semantic, sizes=[20, 24]))
    rules = {r.ours: r for r in head_rules(small, tensor_parallel=2)}
    weight = torch.randn(128, 8)
    exported = rules["visual_heads.semantic.classifiers.1.weight"].to_hf(weight)[0]
    back = rules["visual_heads.semantic.classifiers.1.weight"].to_ours([exported])
    assert exported.shape == (24, 8) and back.shape == (128, 8) and torch.equal(back[:24], weight[:24])
    qkv = rules["visual_heads.semantic.layers.0.attention.linear_qkv.weight"]
    assert qkv.hf[0] == "semantic.layers.0.attention.q_proj.weight"


def test_llava_config_round_trip_and_transformers_reads_it():
    import transformers

    config = _llava_config()
    model, vocab = llava_from_hf(config, "config.json", MODEL)
    assert model.llm == dataclasses.replace(GQA, vocab_size=320)
    assert model.vision == VISION and vocab == HFVocab(300, 301, 320)
    hf = transformers.LlavaConfig.from_dict(dict(config, text_config=dict(config["text_config"], rope_theta=500.0)))
    assert hf.text_config.rope_parameters["rope_theta"] == 500.0
    assert (hf.vision_feature_layer, hf.vision_feature_select_strategy, hf.image_token_id) == (-2, "full", 300)
    windowed = dataclasses.replace(MODEL, llm=dataclasses.replace(GQA, sliding_window=6))
    mistral = llava_to_hf(windowed, vocab, 2, -1, "float32")
    assert mistral["text_config"]["model_type"] == "mistral"
    assert transformers.LlavaConfig.from_dict(mistral).text_config.sliding_window == 6


@pytest.mark.parametrize("change, message", [
    ({"vision_feature_select_strategy": "default"}, "vision_feature_select_strategy='default' is not supported"),
    ({"projector_hidden_act": "relu"}, "projector_hidden_act='relu' is not supported"),
    ({"vision_feature_layer": [-2, -5]}, "only one feature layer"),
])
def test_unsupported_llava_configs_are_named(change, message):
    with pytest.raises(ConfigError, match=message):
        llava_from_hf(_llava_config(**change), "x/config.json", MODEL)


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "RoPE scaling 'linear' is not supported"),
    ({"attention_bias": True}, "attention_bias=True is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"head_dim": 128}, "head_dim=128 is not hidden_size / num_attention_heads"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings=True is not supported"),
])
def test_unsupported_llm_configs_are_named(change, message):
    text = dict(_llava_config()["text_config"], **change)
    with pytest.raises(ConfigError, match=f"x/config.json: {message}"):
        llm_from_hf(text, "x/config.json")


def test_shards_stream_to_an_index_and_read_back(tmp_path):
    tensors = {f"t{i}": torch.full((100,), float(i)) for i in range(5)}  # 400 bytes each
    writers = [SafetensorsWriter(tmp_path, "a", 900), SafetensorsWriter(tmp_path, "b", 900)]
    for i, (name, tensor) in enumerate(tensors.items()):
        writers[i % 2].add(name, tensor)
    maps = [w.close() for w in writers]
    final = finalize_shards(tmp_path, maps, sum(w.total_bytes for w in writers))
    assert sorted(set(final.values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == 2000 and index["weight_map"]["t4"] == "model-00002-of-00003.safetensors"
    reader = SafetensorsDir(tmp_path)
    assert reader.keys() == sorted(tensors) and all(torch.equal(reader.get(k), v) for k, v in tensors.items())
    with pytest.raises(KeyError, match="tensor t1 written twice"):
        writers[1].add("t1", torch.zeros(1))


def test_pickle_checkpoints_and_broken_indexes_are_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match=r"found pickle files \['pytorch_model.bin'\]"):
        SafetensorsDir(tmp_path)
    save_file({"a": torch.zeros(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    (tmp_path / INDEX_NAME).write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="b is in model-00002-of-00002.safetensors, which does not exist"):
        SafetensorsDir(tmp_path)


def test_tokenizer_gets_llava_tokens_that_transformers_loads(tmp_path):
    from transformers import AutoTokenizer

    from demo.data import DemoConfig, make_demo_data
    from megatron_asvr.tokenizers import (
        IMAGE_PLACEHOLDER,
        load_text_tokenizer,
        tokenize_with_images,
    )

    make_demo_data(tmp_path / "demo", DemoConfig.tiny())
    ours = load_text_tokenizer(tmp_path / "demo")
    size = ours.vocab_size
    written = write_tokenizer(tmp_path / "demo", tmp_path / "hf", appended_vocab(size), 64)
    assert written == ["tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    # transformers 5 reads a llava directory's tokenizer from tokenizer.json alone (TokenizersBackend)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(_llava_config()))
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert type(hf).__name__ == "TokenizersBackend"
    assert hf.convert_tokens_to_ids(["<image>", "<pad>"]) == [size, size + 1] and hf.pad_token_id == size + 1
    prompt = "A chat. USER: <image>\nWhat color is the star? ASSISTANT:"
    expected = [size if i == IMAGE_PLACEHOLDER else i for i in tokenize_with_images(prompt, ours)]
    assert hf(prompt).input_ids == expected and expected.count(size) == 1
    write_tokenizer(tmp_path / "hf", tmp_path / "again", appended_vocab(size), 64)  # already there: unchanged
    for name in written:
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "hf" / name).read_bytes(), name
    with pytest.raises(ConfigError, match=f"the tokenizer has {size} tokens, so <image> cannot get id {size + 5}"):
        write_tokenizer(tmp_path / "demo", tmp_path / "bad", HFVocab(size + 5, None, size + 64), 64)


def test_clip_tower_rules_round_trip():
    """LLaVA-1.5's CLIP: class token [h] <-> ours [1, 1, h], pre-norm, fused QKV with biases."""
    from megatron_asvr.model.hf_vision import vision_rules

    clip = dataclasses.replace(VISION, family="clip", activation="quick_gelu")
    rules = vision_rules(clip, "vision_tower.vision_model.", "vision_encoder.")
    names = {r.ours: r for r in rules}
    assert names["vision_encoder.vit.class_token"].hf == ("vision_tower.vision_model.embeddings.class_embedding",)
    assert "vision_encoder.vit.ln_pre.weight" in names and "vision_encoder.vit.conv1.bias" not in names
    g = torch.Generator().manual_seed(1)
    for rule in rules:
        shape = (32,) if rule.hf[0].endswith(("bias", "weight", "class_embedding")) else (4, 32)
        hf = [torch.randn(*shape, generator=g) for _ in rule.hf]
        ours = rule.to_ours(hf)
        back = rule.to_hf(ours)
        assert all(torch.equal(a, b) for a, b in zip(hf, back, strict=True)), rule.ours
    assert names["vision_encoder.vit.class_token"].to_ours([torch.zeros(32)]).shape == (1, 1, 32)
