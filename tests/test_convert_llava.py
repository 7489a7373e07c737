"""Whole LLaVA models through the HF converter, checked against transformers (issue 8's acceptance).

Tiny LLaMA-shaped (demo tokenizer vocabulary, truncated vision tower) and
Mistral-shaped (GQA, a sliding window shorter than the prompt, the complete
vision tower from the original HF weights) models with perturbed weights
(non-trivial norms and biases), fp32.
"""

import dataclasses
import json
import os
import zlib
from pathlib import Path

import pytest
import torch

from tests.support.multirank import run_ranks
from tests.support.tools import run_tool
from megatron_asvr.config import (
    ASVRConfig, CodebookSpec, HeadConfig, LLMConfig, ModelConfig, ParallelConfig, VisionConfig,
)
from megatron_asvr.convert.hf_vocab import appended_vocab
from megatron_asvr.convert.safetensors_io import INDEX_NAME, SafetensorsDir
from megatron_asvr.convert.verify import hf_logits, random_inputs

HF_TOL = 1e-4  # transformers vs ours, fp32
RESHARD_TOL = 1e-5  # ours -> HF -> ours at another layout
REPO = Path(__file__).resolve().parents[1]
TP2_PP2 = ParallelConfig(tensor_parallel=2, pipeline_parallel=2)

VISION = VisionConfig(num_layers=3, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48, image_size=28)
ASVR = ASVRConfig(head=HeadConfig(hidden_size=32, num_layers=2, num_attention_heads=4),
                  semantic=CodebookSpec(sizes=[20, 24, 17], dim=12))
LLAMA_LLM = LLMConfig(num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96, vocab_size=512,
                      max_sequence_length=64, rotary_base=500.0)
MISTRAL_LLM = LLMConfig(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                        vocab_size=320, max_sequence_length=64, norm_eps=1e-6, sliding_window=6)
PROMPT = ("A chat between a curious user and an artificial intelligence assistant. "
          "USER: <image>\nWhat color is it? ASSISTANT:")


def _model(llm: LLMConfig) -> ModelConfig:
    return ModelConfig(vision=VISION, llm=llm, asvr=ASVR, transformer_impl="local")


def _perturbed(chunks, seed: int) -> None:
    """Add seeded noise to every parameter (the same on every layout: seeded by canonical name)."""
    from megatron_asvr.model.canonical import full_state, load_full_state

    noisy = {}
    for name, value in full_state(chunks).items():
        g = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
        noisy[name] = value + 0.05 * torch.randn(value.shape, generator=g).to(value.device)
    load_full_state(chunks, noisy)


def _merged(results, key):
    from megatron_asvr.model.canonical import merge_ranks

    return merge_ranks([r[key] for r in results])


def _last_stage(results, key):
    return next(r[key] for r in results if r[key] is not None)


# -- rank functions ----------------------------------------------------------------------------------


def _train_like_and_export(model, parallel, checkpoint, out, tail, tokenizer, inputs):
    """A random model at ``parallel`` saved as our checkpoint, exported to HF; our logits on ``inputs``."""
    from megatron_asvr import runtime
    from megatron_asvr.checkpoint.model import build_chunks, save_model
    from megatron_asvr.config.tools import ExportOptions
    from megatron_asvr.convert.hf_export import export_hf
    from megatron_asvr.convert.verify import our_logits
    from megatron_asvr.model.canonical import full_state

    info = runtime.initialize(parallel)
    chunks = build_chunks(model, parallel, torch.float32, info.device)
    _perturbed(chunks, seed=11)
    save_model(chunks, checkpoint, model)
    options = ExportOptions(vision_tower_from=tail, tokenizer=tokenizer, dtype="fp32", max_shard_bytes=150_000,
                            progress=False)
    report = export_hf(checkpoint, out, parallel, options, info.device)
    result = {"report": report, "logits": our_logits(chunks, inputs, model.llm.vocab_size), "state": full_state(chunks)}
    runtime.destroy()
    return result


def _import(parallel, sources, out, verify_against=None, llava=True):
    from megatron_asvr import runtime
    from megatron_asvr.convert.hf_import import import_hf
    from megatron_asvr.convert.verify import verify_checkpoint

    info = runtime.initialize(parallel)
    report = import_hf(sources, out, parallel, ModelConfig(asvr=ASVR, transformer_impl="local"), torch.float32,
                       info.device, progress=False)
    diff = None
    if verify_against is not None:
        agreement = verify_checkpoint(out, verify_against, parallel, torch.float32, info.device, llava=llava)
        assert agreement is None or agreement.within, agreement.describe()
        diff = agreement.max_abs_diff if agreement is not None else None
    runtime.destroy()
    return {"report": report, "diff": diff}


def _export(parallel, checkpoint, out, tail, llm_only=False):
    from megatron_asvr import runtime
    from megatron_asvr.config.tools import ExportOptions
    from megatron_asvr.convert.hf_export import export_hf

    info = runtime.initialize(parallel)
    options = ExportOptions(vision_tower_from=tail, dtype="fp32", progress=False, llm_only=llm_only)
    report = export_hf(checkpoint, out, parallel, options, info.device)
    runtime.destroy()
    return report


def _reimport_and_generate(parallel, export_dir, new_checkpoint, original_checkpoint, inputs, prompt, steps):
    """Import our export at ``parallel``: its canonical state and logits; greedy tokens of the original."""
    from megatron_asvr import runtime
    from megatron_asvr.checkpoint.model import load_model, read_model_config
    from megatron_asvr.config.tools import ImportSources
    from megatron_asvr.convert.hf_import import import_hf
    from megatron_asvr.convert.verify import our_logits
    from megatron_asvr.model.canonical import full_state

    info = runtime.initialize(parallel)
    sources = ImportSources(llava=Path(export_dir), visual_head=Path(export_dir) / "visual_head")
    import_hf(sources, new_checkpoint, parallel, ModelConfig(transformer_impl="local"), torch.float32, info.device,
              progress=False)
    model = read_model_config(new_checkpoint)
    chunks = load_model(new_checkpoint, model, parallel, torch.float32, info.device)
    # our 512 tokens come back with llava-hf's two appended ones (576 rows): compare the 512
    result = {"state": full_state(chunks), "logits": our_logits(chunks, inputs, LLAMA_LLM.vocab_size)}

    original = read_model_config(original_checkpoint)
    chunks = load_model(original_checkpoint, original, parallel, torch.float32, info.device)
    tokens, image_mask, images = prompt
    result["step_logits"] = []
    for _ in range(steps):  # greedy: the arg-max of a full forward over the prompt so far
        step_inputs = dataclasses.replace(inputs, tokens=tokens, image_mask=image_mask, images=images)
        logits = our_logits(chunks, step_inputs, original.llm.vocab_size)  # None before the last stage
        next_token = torch.zeros(1, 1, dtype=torch.long, device=info.device)
        if logits is not None:
            result["step_logits"].append(logits[0, -1])
            next_token = logits[0, -1].argmax().view(1, 1).to(info.device)
        torch.distributed.broadcast(next_token, src=torch.distributed.get_world_size() - 1)  # the last stage's
        tokens = torch.cat([tokens, next_token.cpu()], dim=1)
        image_mask = torch.cat([image_mask, torch.zeros(1, 1, dtype=torch.bool)], dim=1)
    result["generated"] = tokens[0, prompt[0].shape[1]:].tolist()
    result["model"] = model
    runtime.destroy()
    return result


# -- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from demo.data import DemoConfig, make_demo_data

    directory = tmp_path_factory.mktemp("demo")
    summary = make_demo_data(directory, DemoConfig.tiny())
    assert summary.vocab_size == LLAMA_LLM.vocab_size
    return directory


@pytest.fixture(scope="module")
def hf_vision_dir(tmp_path_factory):
    """An HF SigLIP vision model of our encoder's shape: the 'original' weights of the tower."""
    import transformers

    directory = tmp_path_factory.mktemp("siglip")
    config = transformers.SiglipVisionConfig(
        hidden_size=VISION.hidden_size, intermediate_size=VISION.ffn_hidden_size, num_hidden_layers=VISION.num_layers,
        num_attention_heads=VISION.num_attention_heads, image_size=VISION.image_size, patch_size=VISION.patch_size,
    )
    torch.manual_seed(3)
    transformers.SiglipVisionModel(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def exported(tmp_path_factory, demo, hf_vision_dir):
    """Both models exported from TP=2 x PP=2, with our logits on the same random image and prompt."""
    root = tmp_path_factory.mktemp("exported")
    cases = {"llama": (_model(LLAMA_LLM), None, demo), "mistral": (_model(MISTRAL_LLM), hf_vision_dir, None)}
    out = {}
    for llm, (model, tail, tokenizer) in cases.items():
        inputs = random_inputs(model, appended_vocab(model.llm.vocab_size), with_image=True, seed=5)
        results = run_ranks(_train_like_and_export, 4, model, TP2_PP2, str(root / f"{llm}_ours"),
                            str(root / f"{llm}_hf"), tail, tokenizer, inputs)
        out[llm] = {
            "model": model, "inputs": inputs, "checkpoint": root / f"{llm}_ours", "hf": root / f"{llm}_hf",
            "logits": _last_stage(results, "logits"), "state": _merged(results, "state"),
            "report": results[0]["report"],
        }
    return out


# -- tests ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("llm", ["llama", "mistral"])
def test_export_from_tp2_pp2_matches_transformers(exported, llm):
    case = exported[llm]
    theirs = hf_logits(case["hf"], case["inputs"], torch.float32, llava=True)  # strict: no key problems
    vocab = case["model"].llm.vocab_size
    assert theirs.shape == (1, case["inputs"].tokens.shape[1], appended_vocab(vocab).rows)
    diff = (theirs[..., :vocab] - case["logits"]).abs().max().item()
    print(f"{llm}: max abs logit difference transformers vs ours (TP=2 x PP=2 export) = {diff:.3e} "
          f"(logits std {theirs.std().item():.3f}, max {theirs.abs().max().item():.3f})")
    assert diff <= HF_TOL
    config = json.loads((case["hf"] / "config.json").read_text())
    vision, text = config["vision_config"], config["text_config"]
    if llm == "llama":  # truncated tower: the layers we keep, features from the last one
        assert (vision["num_hidden_layers"], config["vision_feature_layer"]) == (2, -1)
        assert (text["model_type"], text["num_key_value_heads"], text["rope_theta"]) == ("llama", 4, 500.0)
        assert "truncated to the 2 layers" in case["report"]["vision_tower"]
    else:  # complete tower from the original SigLIP weights: LLaVA's standard layout
        assert (vision["num_hidden_layers"], config["vision_feature_layer"]) == (3, -2)
        assert (text["model_type"], text["num_key_value_heads"], text["sliding_window"]) == ("mistral", 2, 6)
    assert config["vision_feature_select_strategy"] == "full" and vision["model_type"] == "siglip_vision_model"
    assert (config["image_token_index"], text["vocab_size"]) == (vocab, appended_vocab(vocab).rows)
    shards = json.loads((case["hf"] / INDEX_NAME).read_text())["weight_map"]
    assert len(set(shards.values())) > 4  # streamed into many small shards
    head = SafetensorsDir(case["hf"] / "visual_head")
    assert head.get("semantic.classifiers.1.weight").shape == (24, 32)
    assert torch.equal(head.get("semantic.code_embed.weight"), case["state"]["visual_heads.semantic.code_embed.weight"])


def test_mistral_sliding_window_changes_the_logits(exported):
    """The Mistral case's prompt is longer than its window, so the window is really exercised."""
    import transformers

    case = exported["mistral"]
    config = transformers.AutoConfig.from_pretrained(str(case["hf"]))
    config.text_config.sliding_window = None
    model = transformers.LlavaForConditionalGeneration.from_pretrained(
        str(case["hf"]), config=config, dtype=torch.float32)
    with torch.no_grad():
        full = model(input_ids=case["inputs"].hf_input_ids, pixel_values=case["inputs"].images).logits
    late = (full[0, 10:, :320] - case["logits"][0, 10:]).abs().max().item()
    assert late > 1e-3  # without the window, positions past it differ


@pytest.fixture(scope="module")
def reimported(exported, tmp_path_factory):
    """The LLaMA export imported at TP=1 x PP=2 (and the original's greedy tokens there)."""
    import transformers
    from PIL import Image

    case = exported["llama"]
    processor = transformers.AutoProcessor.from_pretrained(str(case["hf"]))
    pixels = (torch.rand(28, 28, 3, generator=torch.Generator().manual_seed(2)) * 255).to(torch.uint8).numpy()
    hf_inputs = processor(images=Image.fromarray(pixels), text=PROMPT, return_tensors="pt")
    image_mask = hf_inputs.input_ids == processor.image_token_id
    prompt = (hf_inputs.input_ids.masked_fill(image_mask, 0), image_mask, hf_inputs.pixel_values)
    root = tmp_path_factory.mktemp("reimported")
    results = run_ranks(
        _reimport_and_generate, 2, ParallelConfig(pipeline_parallel=2), str(case["hf"]), str(root / "ours"),
        str(case["checkpoint"]), case["inputs"], prompt, 6,
    )
    return {"results": results, "hf_inputs": hf_inputs, "processor": processor, "checkpoint": root / "ours"}


def _real_rows(name: str, value: torch.Tensor) -> torch.Tensor:
    """The rows that are tokens / codes of the original model (not TP padding, not appended tokens)."""
    if ".classifiers." in name:
        return value[: ASVR.semantic.sizes[int(name.split(".classifiers.")[1].split(".")[0])]]
    if name.endswith(("word_embeddings.weight", "output_layer.weight")):
        return value[: LLAMA_LLM.vocab_size]
    return value


def test_ours_to_hf_to_ours_at_another_layout(exported, reimported):
    case, results = exported["llama"], reimported["results"]
    logits = _last_stage(results, "logits")
    diff = (logits - case["logits"]).abs().max().item()
    print(f"llama: max abs logit difference ours (TP=2 x PP=2) vs re-imported (TP=1 x PP=2) = {diff:.3e}")
    assert diff <= RESHARD_TOL
    state = _merged(results, "state")
    assert sorted(state) == sorted(case["state"])
    for name, value in case["state"].items():  # every tensor, the visual head included, comes back bit for bit
        assert torch.equal(_real_rows(name, state[name]), _real_rows(name, value)), name
    embedding = state["language_model.embedding.word_embeddings.weight"]  # 576 llava-hf rows padded to 640
    assert embedding.shape == (640, 64) and not embedding[576:].any()
    assert torch.allclose(embedding[512:576], embedding[:512].mean(0).expand(64, -1))  # <image>, <pad>, ...
    model = results[0]["model"]
    assert model.asvr == ASVR and model.llm == dataclasses.replace(LLAMA_LLM, vocab_size=576)


def test_greedy_generate_matches_our_arg_max(exported, reimported, demo):
    import transformers

    from megatron_asvr.tokenizers import (
        IMAGE_PLACEHOLDER,
        load_text_tokenizer,
        tokenize_with_images,
    )

    case, hf_inputs = exported["llama"], reimported["hf_inputs"]
    # the exported tokenizer and processor tokenize exactly as ours, the image expanded to its 4 patches
    ours = tokenize_with_images(PROMPT, load_text_tokenizer(demo))
    expanded = [t for i in ours for t in ([512] * VISION.num_patches if i == IMAGE_PLACEHOLDER else [i])]
    assert hf_inputs.input_ids[0].tolist() == expanded
    model = transformers.LlavaForConditionalGeneration.from_pretrained(str(case["hf"]), dtype=torch.float32)
    generated = model.generate(**hf_inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                               output_logits=True, return_dict_in_generate=True)
    theirs = generated.sequences[0, hf_inputs.input_ids.shape[1]:].tolist()
    ours = reimported["results"][-1]
    print(f"greedy tokens: transformers {theirs}, ours {ours['generated']}")
    assert theirs == ours["generated"] and len(theirs) == 6
    # each step's logits too: transformers decodes with its KV cache, ours re-runs the whole prompt
    diffs = [(hf[0, :512] - mine).abs().max().item()
             for hf, mine in zip(generated.logits, ours["step_logits"], strict=True)]
    print(f"greedy steps: max abs logit difference per step {[f'{d:.1e}' for d in diffs]}")
    assert len(diffs) == 6 and max(diffs) <= HF_TOL


@pytest.fixture(scope="module")
def hf_llava_dir(tmp_path_factory, demo):
    """A random llava-hf model in the hub key layout, two shards with an index, with the demo tokenizer
    plus <image> / <pad> and llava-hf's padded vocabulary (512 tokens + 2, 576 rows)."""
    import transformers
    from safetensors.torch import save_file

    from megatron_asvr.convert.hf_config import llava_to_hf
    from megatron_asvr.convert.hf_tokenizer import write_tokenizer

    directory = tmp_path_factory.mktemp("llava_hf")
    vocab = appended_vocab(512)
    config = llava_to_hf(_model(dataclasses.replace(MISTRAL_LLM, vocab_size=512)), vocab, 3, -2, "float32")
    torch.manual_seed(4)
    model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig.from_dict(config))
    hub = {
        "model.vision_tower.": "vision_tower.vision_model.", "model.multi_modal_projector.": "multi_modal_projector.",
        "model.language_model.": "language_model.model.", "lm_head.": "language_model.lm_head.",
    }
    state = {}
    for name, value in model.state_dict().items():
        prefix = next(p for p in hub if name.startswith(p))
        state[hub[prefix] + name[len(prefix):]] = value + 0.05 * torch.randn_like(value)
    names = sorted(state)
    files = {name: f"model-0000{1 + (i >= len(names) // 2)}-of-00002.safetensors" for i, name in enumerate(names)}
    for file in sorted(set(files.values())):
        save_file({n: state[n].contiguous() for n in names if files[n] == file}, str(directory / file),
                  metadata={"format": "pt"})
    (directory / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": files}))
    (directory / "config.json").write_text(json.dumps(config))
    write_tokenizer(demo, directory, vocab, 64)
    return directory


def test_hf_to_ours_to_hf_is_bit_identical(hf_llava_dir, tmp_path):
    """Import at TP=2, export at PP=2 with the original tower: every tensor and the tokenizer unchanged."""
    from megatron_asvr.config.tools import ImportSources

    imported = run_ranks(_import, 2, ParallelConfig(tensor_parallel=2), ImportSources(llava=hf_llava_dir),
                         str(tmp_path / "ours"), hf_llava_dir)
    diff = _last_stage(imported, "diff")
    print(f"llava-hf source vs imported (TP=2): max abs logit difference = {diff:.3e}")
    assert diff <= HF_TOL
    report = imported[0]["report"]
    assert report["hf_vocab"] == appended_vocab(512) and report["model"].llm.vocab_size == 576
    assert len(report["skipped"]) == 18  # the last vision layer (16) and the post-layernorm (2)
    assert report["initialised"] and all(n.startswith("visual_heads.") for n in report["initialised"])
    run_ranks(_export, 2, ParallelConfig(pipeline_parallel=2), str(tmp_path / "ours"), str(tmp_path / "hf"),
              str(hf_llava_dir))
    source, back = SafetensorsDir(hf_llava_dir), SafetensorsDir(tmp_path / "hf")
    assert back.keys() == source.keys()
    for name in source.keys():  # noqa: SIM118 (a SafetensorsDir, not a dict)
        assert back.get(name).dtype == source.get(name).dtype and torch.equal(back.get(name), source.get(name)), name
    for file in ("tokenizer_config.json", "tokenizer.model"):
        assert (tmp_path / "hf" / file).read_bytes() == (hf_llava_dir / file).read_bytes()
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config == json.loads((hf_llava_dir / "config.json").read_text())


def test_import_of_separate_llm_and_vision_models(tmp_path, hf_vision_dir):
    """Stage 1's start: a LLaMA causal LM and a SigLIP tower; the projector and head are new. The
    LLM-only export (TP=2) gives the LLaMA back bit for bit, with its config."""
    import transformers

    from megatron_asvr.config.tools import ImportSources

    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=300, max_position_embeddings=64,
                                      rms_norm_eps=1e-5)
    torch.manual_seed(6)
    llm = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for param in llm.parameters():
            param.add_(0.05 * torch.randn_like(param))
    llm.save_pretrained(tmp_path / "llm")
    results = run_ranks(_import, 2, ParallelConfig(tensor_parallel=2),
                        ImportSources(llm=tmp_path / "llm", vision=hf_vision_dir), str(tmp_path / "ours"),
                        tmp_path / "llm", False)
    diff = _last_stage(results, "diff")
    print(f"LlamaForCausalLM vs imported (TP=2), text only: max abs logit difference = {diff:.3e}")
    assert diff <= HF_TOL
    report = results[0]["report"]
    assert report["hf_vocab"] is None and report["model"].llm.num_query_groups == 2
    fresh = {n.split(".")[0] for n in report["initialised"]}
    assert fresh == {"projector", "visual_heads"}
    assert "encoder.layers.2.mlp.fc1.weight" in " ".join(report["skipped"])

    run_ranks(_export, 2, ParallelConfig(tensor_parallel=2), str(tmp_path / "ours"), str(tmp_path / "back"), None,
              True)
    original, back = SafetensorsDir(tmp_path / "llm"), SafetensorsDir(tmp_path / "back")
    assert set(back.keys()) == set(original.keys()) - {k for k in original.keys() if "rotary" in k}
    for key in back.keys():
        assert torch.equal(back.get(key), original.get(key)), key
    exported = json.loads((tmp_path / "back" / "config.json").read_text())
    assert exported["architectures"] == ["LlamaForCausalLM"] and exported["vocab_size"] == 300
    assert exported["num_key_value_heads"] == 2 and not (tmp_path / "back" / "visual_head").exists()


def test_import_names_a_missing_tensor(hf_llava_dir, tmp_path):
    from megatron_asvr.config.tools import ImportSources
    from megatron_asvr.convert.hf_import import plan_import

    broken = tmp_path / "broken"
    broken.mkdir()
    for file in hf_llava_dir.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    index = json.loads((broken / INDEX_NAME).read_text())
    del index["weight_map"]["language_model.model.layers.3.self_attn.k_proj.weight"]
    (broken / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(KeyError, match="missing tensor language_model.model.layers.3.self_attn.k_proj.weight"):
        plan_import(ImportSources(llava=broken), ModelConfig(), tensor_parallel=1)


def _cli(*args):
    return run_tool("convert", args)


def test_cli_export_verify_and_import_error(exported, hf_llava_dir, tmp_path):
    """Export takes a training save directory (its newest checkpoint) as tools/evaluate.py does."""
    case = exported["mistral"]
    save_dir = tmp_path / "run"
    save_dir.mkdir()
    os.symlink(case["checkpoint"], save_dir / "iter_0000007")
    (save_dir / "latest").write_text("iter_0000007")
    done = _cli("export", "--checkpoint", save_dir, "--out", tmp_path / "hf", "--dtype", "fp32",
                "--vision-tower-from", case["hf"], "--verify", "--no-progress")
    assert done.returncode == 0, done.stderr
    line = next(out for out in done.stdout.splitlines() if out.startswith("verify against transformers"))
    diff = float(line.split("max abs logit difference ")[1].split(" ")[0])
    assert diff <= HF_TOL and " in float32 (logits up to " in line and line.endswith("within what float32 allows")
    assert "vision tower: complete (3 layers, vision_feature_layer=-2)" in done.stdout
    failed = _cli("import", "--llava", hf_llava_dir, "--out", tmp_path / "hf", "--no-progress")
    assert failed.returncode != 0 and "Traceback" not in failed.stderr
    assert f"convert import: error: {tmp_path / 'hf'} is not empty" in failed.stderr
