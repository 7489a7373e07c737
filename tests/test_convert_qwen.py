"""Qwen2 / Qwen2.5 / Qwen3 through the HF converter, checked against transformers (issue 25's acceptance).

Tiny random HF ``Qwen2ForCausalLM`` (q/k/v biases; a ``sliding_window`` value that
``use_sliding_window: false`` switches off) and ``Qwen3ForCausalLM`` (q/k norms, head_dim 24
while hidden / heads is 16), each tied and untied, with perturbed weights (non-trivial norms
and biases), fp32: imported at TP=1, TP=2 and PP=2 their logits equal transformers', and the
LLM-only export gives every tensor back bit for bit. A LLaVA whose text model is a tied Qwen3
goes HF -> ours (TP=2) -> HF bit-identical, and transformers loads it with no key problems.
One launch per layout.
"""

import json
from pathlib import Path

import pytest
import torch

from tests.support.multirank import run_ranks
from megatron_asvr.config import ASVRConfig, CodebookSpec, HeadConfig, ModelConfig, ParallelConfig, VisionConfig
from megatron_asvr.convert.safetensors_io import INDEX_NAME, SafetensorsDir

HF_TOL = 1e-5  # max abs logit difference, transformers vs ours, fp32
VISION = VisionConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48, image_size=28)
ASVR = ASVRConfig(head=HeadConfig(hidden_size=32, num_layers=1, num_attention_heads=4),
                  semantic=CodebookSpec(sizes=[20, 24], dim=12))
TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=320, max_position_embeddings=64, rope_theta=1e6, rms_norm_eps=1e-6)
# name -> (model type, tied, head_dim)
CASES = {
    "qwen2_untied": ("qwen2", False, None),
    "qwen2_tied": ("qwen2", True, None),
    "qwen3_untied": ("qwen3", False, 24),
    "qwen3_tied": ("qwen3", True, 24),
}
LAYOUTS = {"tp1": (1, ParallelConfig()), "tp2": (2, ParallelConfig(tensor_parallel=2)),
           "pp2": (2, ParallelConfig(pipeline_parallel=2))}


def _text_config(model_type: str, tied: bool, head_dim):
    import transformers

    if model_type == "qwen2":
        return transformers.Qwen2Config(**TEXT, tie_word_embeddings=tied, use_sliding_window=False,
                                        sliding_window=4)  # the trap: no window, whatever this says
    return transformers.Qwen3Config(**TEXT, tie_word_embeddings=tied, head_dim=head_dim)


def _perturb(model, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))


# -- the rank function: every job of one layout in one launch -----------------------------------------


def _convert(parallel, root, jobs):
    """For each (name, sources, export llm_only): import at ``parallel``, our logits against
    transformers', export back. Returns {name: max abs logit difference} (on the writer rank)."""
    from megatron_asvr import runtime
    from megatron_asvr.config.tools import ExportOptions
    from megatron_asvr.convert.hf_export import export_hf
    from megatron_asvr.convert.hf_import import import_hf
    from megatron_asvr.convert.verify import verify_checkpoint

    info = runtime.initialize(parallel)
    root, diffs = Path(root), {}
    for name, sources, llm_only in jobs:
        ours = root / f"{name}_ours"
        import_hf(sources, ours, parallel, ModelConfig(asvr=ASVR, transformer_impl="local"), torch.float32,
                  info.device, progress=False)
        reference = sources.llm if llm_only else sources.llava
        agreement = verify_checkpoint(ours, reference, parallel, torch.float32, info.device, llava=not llm_only)
        diffs[name] = None if agreement is None else agreement.max_abs_diff
        options = ExportOptions(dtype="fp32", progress=False, llm_only=llm_only, max_shard_bytes=60_000,
                                vision_tower_from=None if llm_only else sources.llava)
        export_hf(ours, root / f"{name}_back", parallel, options, info.device)
    runtime.destroy()
    return diffs


# -- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """The four tiny Qwen causal LMs, a SigLIP vision model, and a LLaVA with a tied Qwen3 (hub layout)."""
    import transformers
    from safetensors.torch import save_file

    from megatron_asvr.convert.hf_config import llava_to_hf, llm_from_hf
    from megatron_asvr.convert.hf_vocab import appended_vocab
    from megatron_asvr.model.hf_vision import vision_to_hf

    root = tmp_path_factory.mktemp("qwen_hf")
    for seed, (name, (model_type, tied, head_dim)) in enumerate(CASES.items()):
        model = transformers.AutoModelForCausalLM.from_config(_text_config(model_type, tied, head_dim))
        _perturb(model, seed)
        model.save_pretrained(root / name)
    vision = transformers.SiglipVisionConfig(**{
        k: v for k, v in vision_to_hf(VISION, VISION.num_layers, "float32").items()
        if k not in ("model_type", "torch_dtype", "architectures")})
    torch.manual_seed(7)
    transformers.SiglipVisionModel(vision).save_pretrained(root / "siglip")

    llm = llm_from_hf(_text_config("qwen3", True, 24).to_dict(), "qwen3")
    config = llava_to_hf(ModelConfig(vision=VISION, llm=llm), appended_vocab(320), VISION.num_layers, -2, "float32")
    llava = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig.from_dict(config))
    _perturb(llava, 9)
    hub = {"model.vision_tower.": "vision_tower.vision_model.",
           "model.multi_modal_projector.": "multi_modal_projector.", "model.language_model.": "language_model.model."}
    state = {}
    for name, value in llava.state_dict().items():
        prefix = next((p for p in hub if name.startswith(p)), None)
        if prefix is not None:  # lm_head.weight is the embedding (tied): not stored, as transformers saves it
            state[hub[prefix] + name[len(prefix):]] = value.contiguous()
    (root / "llava").mkdir()
    save_file(state, str(root / "llava" / "model.safetensors"), metadata={"format": "pt"})
    (root / "llava" / "config.json").write_text(json.dumps(config))
    return root


@pytest.fixture(scope="module")
def converted(hf_dirs, tmp_path_factory):
    from megatron_asvr.config.tools import ImportSources

    out = {}
    for layout, (world_size, parallel) in LAYOUTS.items():
        root = tmp_path_factory.mktemp(layout)
        jobs = [(name, ImportSources(llm=hf_dirs / name, vision=hf_dirs / "siglip"), True) for name in CASES]
        if layout == "tp2":
            jobs.append(("llava", ImportSources(llava=hf_dirs / "llava"), False))
        results = run_ranks(_convert, world_size, parallel, str(root), jobs)
        out[layout] = {"root": root, "diffs": next(r for r in results if any(v is not None for v in r.values()))}
    return out


# -- tests ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_imported_qwen_logits_equal_transformers(converted, layout):
    diffs = converted[layout]["diffs"]
    print(f"{layout}: max abs logit difference transformers vs ours: "
          + ", ".join(f"{name} {diff:.2e}" for name, diff in diffs.items()))
    assert sorted(diffs) == sorted(list(CASES) + (["llava"] if layout == "tp2" else []))
    assert all(diff <= HF_TOL for diff in diffs.values()), diffs


def _same_files(original: Path, back: Path) -> None:
    source, exported = SafetensorsDir(original), SafetensorsDir(back)
    assert exported.keys() == source.keys()
    for key in source.keys():  # noqa: SIM118 (a SafetensorsDir, not a dict)
        assert torch.equal(exported.get(key), source.get(key)), key


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_llm_only_export_is_bit_identical(hf_dirs, converted, layout):
    for name, (model_type, tied, head_dim) in CASES.items():
        back = converted[layout]["root"] / f"{name}_back"
        _same_files(hf_dirs / name, back)
        assert ("lm_head.weight" in SafetensorsDir(back).keys()) == (not tied)
        config = json.loads((back / "config.json").read_text())
        assert (config["model_type"], config["tie_word_embeddings"]) == (model_type, tied)
        assert config["head_dim"] == (head_dim or 16) and config["use_sliding_window"] is False


def test_qwen_llava_round_trip_loads_in_transformers(hf_dirs, converted):
    """HF -> ours (TP=2) -> HF: every tensor unchanged; transformers loads the export strictly (no
    missing, unexpected or mismatched keys) and ties its LM head to the embedding."""
    import transformers

    back = converted["tp2"]["root"] / "llava_back"
    _same_files(hf_dirs / "llava", back)
    assert len(json.loads((back / INDEX_NAME).read_text())["weight_map"]) == len(SafetensorsDir(back).keys())
    config = json.loads((back / "config.json").read_text())
    text = config["text_config"]
    assert (text["model_type"], text["head_dim"], text["tie_word_embeddings"]) == ("qwen3", 24, True)
    model, info = transformers.LlavaForConditionalGeneration.from_pretrained(
        str(back), dtype=torch.float32, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
