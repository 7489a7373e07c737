"""Precomputed visual targets: equal to the tokenizer's codes, resumable, coverage reported by name."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.support.multirank import run_ranks
from tests.support.tools import load_tool
from megatron_asvr.config import VisionConfig
from megatron_asvr.config.tools import TargetsConfig
from megatron_asvr.data.targets import DONE_FILE, REPORT_FILE, ZERO_IMAGE, VisualTargets, codes_file
from megatron_asvr.tokenizers.visual_format import DualTokenConfig, save_dualtoken

SIZES = (16, 12, 8)
# 384-pixel inputs as images.py makes them: 27 x 27 patches of a 2-block, 32-wide SigLIP.
VISION = VisionConfig(family="siglip", num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48,
                      patch_size=14, image_size=384, feature_layer=2)
IMAGES = {  # name -> (width, height); anyres grids of 1 x 1, 2 x 1, 2 x 3, 1 x 1, 2 x 2 tiles
    "coco/a.jpg": (384, 384), "coco/b.jpg": (700, 380), "vg/c.png": (400, 1100), "vg/d.jpg": (96, 150),
    "vg/e.jpg": (500, 500),
}


def _write_random_tokenizer(directory: Path):
    """A random tiny tokenizer written in the DualToken format."""
    import transformers

    torch.manual_seed(0)
    hf = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=384,
        patch_size=14, layer_norm_eps=1e-6))
    config = DualTokenConfig(vision=VISION, semantic_layer=2, appearance_layer=1, codebook_sizes=SIZES,
                             code_width=32, head_width=64)
    g = torch.Generator().manual_seed(1)
    books = {branch: [torch.randn(size, 32, generator=g) * 2.0 ** -d for d, size in enumerate(SIZES)]
             for branch in ("semantic", "appearance")}
    projection = {}
    shapes = (("norm1", (32,)), ("conv1", (32, 32, 1, 1)), ("norm2", (32,)), ("conv2", (32, 32, 3, 3)))
    for module, weight_shape in shapes:
        projection[f"{module}.weight"] = module.startswith("norm") + 0.1 * torch.randn(weight_shape, generator=g)
        projection[f"{module}.bias"] = 0.1 * torch.randn(32, generator=g)
    return save_dualtoken(directory, config, hf.state_dict(), projection, books)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Images (one missing, one corrupt), LLaVA JSON referring to them, and a tokenizer."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for name, (w, h) in IMAGES.items():
        (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / name)
    (root / "images/vg/broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "Noise."}]
    records = [{"id": str(i), "image": name, "conversations": turns} for i, name in enumerate(IMAGES)]
    records += [
        {"id": "dup", "image": "./coco/a.jpg", "conversations": turns},  # the same image twice
        {"id": "gone", "image": "coco/missing.jpg", "conversations": turns},
        {"id": "bad", "image": "vg/broken.jpg", "conversations": turns},
        {"id": "text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
        {"id": "escape", "image": "../outside.jpg", "conversations": turns},
        {"id": "nothing"},
    ]
    (root / "data.json").write_text(json.dumps(records))
    config_path, checkpoint_path = _write_random_tokenizer(root / "tokenizer")
    return TargetsConfig(data=(root / "data.json",), image_root=root / "images", output_dir=root / "unused",
                         tokenizer_config=config_path, tokenizer_checkpoint=checkpoint_path, mode="pad",
                         branches=("semantic", "appearance"), precision="fp32", batch_images=2, workers=0,
                         max_missing_fraction=1.0, progress=False)


def _runs(configs, interrupt_marking=False, reference_mode=None):
    """Run precompute on each config in turn (one process); optionally the tokenizer's own codes."""
    from megatron_asvr import runtime
    from megatron_asvr.config import ParallelConfig
    from megatron_asvr.data import precompute_targets as targets
    from megatron_asvr.data.images import load_rgb, preprocess_image
    from megatron_asvr.tokenizers.visual import load_visual_tokenizer

    runtime.initialize(ParallelConfig())
    outcomes = []
    for config in configs:
        mark_done = targets.TargetStore.mark_done
        if interrupt_marking:  # killed after the rows of the first batch are written, before they are marked
            def crash(self, positions):
                raise KeyboardInterrupt
            targets.TargetStore.mark_done = crash
        try:
            outcomes.append(targets.precompute_targets(config))
        except (targets.TargetsFailed, KeyboardInterrupt) as err:
            outcomes.append(f"{type(err).__name__}: {err}")
        targets.TargetStore.mark_done = mark_done
        interrupt_marking = False
    expected = {}
    if reference_mode:
        config = configs[0]
        tokenizer = load_visual_tokenizer(config.tokenizer_config, config.tokenizer_checkpoint, config.precision)
        tiles = {name: preprocess_image(load_rgb(config.image_root / name), reference_mode) for name in IMAGES}
        tiles[ZERO_IMAGE] = torch.zeros(1, 3, 384, 384)
        for name, pixels in tiles.items():
            codes = tokenizer.codes(pixels.to(runtime.current_device()), config.branches)
            expected[name] = {k: v.reshape(-1, len(SIZES)).cpu() for k, v in codes.items()}
    runtime.destroy()
    return outcomes, expected


def test_targets_equal_the_tokenizer_codes_and_coverage_names_problems(corpus, tmp_path):
    config = replace(corpus, output_dir=tmp_path / "targets")
    (report,), expected = run_ranks(_runs, 1, [config], reference_mode="pad")[0]
    assert report["records"] == 11 and report["referenced_images"] == 7
    assert (report["complete_images"], report["pending_images"], report["written_this_run"]) == (5, 0, 6)
    assert report["zero_image_complete"]
    assert report["missing"] == ["coco/missing.jpg"]
    assert [item["image"] for item in report["undecodable"]] == ["vg/broken.jpg"]
    assert "vg/broken.jpg: cannot load image" in report["undecodable"][0]["error"]
    assert [(item["record"], item["reason"].split(":")[0]) for item in report["unreadable"]] == [
        ("[9]", "path_escapes_root"), ("[10]", "malformed_record")]
    assert json.loads((config.output_dir / REPORT_FILE).read_text()) == report

    targets = VisualTargets(config.output_dir)
    assert len(targets) == 6 and "coco/missing.jpg" not in targets and "./coco/a.jpg" in targets
    assert targets.meta["semantic"].codebook_sizes == SIZES and targets.meta["appearance"].feature_layer == 1
    for name in [*IMAGES, ZERO_IMAGE]:  # the blank tile of supervised text-only samples too
        for branch in ("semantic", "appearance"):
            codes = targets.codes(name, branch)
            assert codes.dtype == np.uint16 and codes.shape == (729, 3)
            np.testing.assert_array_equal(codes, expected[name][branch].numpy())
    assert not np.array_equal(targets.codes("coco/a.jpg", "semantic"), targets.codes("coco/b.jpg", "semantic"))
    with pytest.raises(KeyError, match="image 'vg/broken.jpg' is not computed yet"):
        targets.codes("vg/broken.jpg")
    with pytest.raises(KeyError, match="image 'coco/missing.jpg' is not in the index"):
        targets.codes("coco/missing.jpg")


def test_anyres_targets_hold_every_tile(corpus, tmp_path):
    config = replace(corpus, output_dir=tmp_path / "anyres", mode="anyres", branches=("semantic",))
    (report,), expected = run_ranks(_runs, 1, [config], reference_mode="anyres")[0]
    assert report["complete_images"] == 5
    targets = VisualTargets(config.output_dir)
    tiles = {name: targets.codes(name).shape[0] // 729 for name in IMAGES}
    assert tiles == {"coco/a.jpg": 2, "coco/b.jpg": 3, "vg/c.png": 7, "vg/d.jpg": 2, "vg/e.jpg": 5}  # 1 + grid
    for name in [*IMAGES, ZERO_IMAGE]:  # the blank tile is one tile in every mode
        np.testing.assert_array_equal(targets.codes(name), expected[name]["semantic"].numpy())


def _files(directory: Path) -> dict:
    return {name: (directory / name).read_bytes() for name in (codes_file("semantic"), codes_file("appearance"),
                                                             DONE_FILE, "targets.json")}


def test_interrupted_runs_resume_to_the_uninterrupted_files(corpus, tmp_path):
    whole, stopped, killed = (replace(corpus, output_dir=tmp_path / name) for name in ("whole", "stopped", "killed"))
    outcomes, _ = run_ranks(_runs, 1, [whole, replace(stopped, max_images=2), stopped])[0]
    first, second = outcomes[1], outcomes[2]
    assert (first["complete_images"], first["pending_images"], first["written_this_run"]) == (2, 4, 2)
    assert (second["complete_images"], second["written_this_run"], second["undecodable_images"]) == (5, 4, 1)
    assert _files(stopped.output_dir) == _files(whole.output_dir)

    (outcome,), _ = run_ranks(_runs, 1, [killed], interrupt_marking=True)[0]
    assert outcome == "KeyboardInterrupt: "
    # the first batch's rows were written but never marked: nothing counts as done
    assert np.fromfile(killed.output_dir / codes_file("semantic"), np.uint16)[: 2 * 729 * 3].any()
    assert not np.fromfile(killed.output_dir / DONE_FILE, np.uint8).any()
    (resumed,), _ = run_ranks(_runs, 1, [killed])[0]
    assert resumed["written_this_run"] == 6  # the resume redoes them
    assert _files(killed.output_dir) == _files(whole.output_dir)


def test_a_different_run_on_the_same_directory_is_refused(corpus, tmp_path):
    config = replace(corpus, output_dir=tmp_path / "targets", max_images=1)
    outcomes, _ = run_ranks(_runs, 1, [config, replace(config, mode="resize"),
                                       replace(config, max_missing_fraction=0.1)])[0]
    assert outcomes[0]["complete_images"] == 1
    assert outcomes[1] == (f"TargetsFailed: {config.output_dir} holds targets of a different run: "
                           "mode ('pad', now 'resize') differs; use a new --output directory")
    assert outcomes[2] == ("TargetsFailed: 1 of 7 images missing or undecodable (14.29%), above "
                           f"--max-missing-fraction 10.00%; see {config.output_dir / REPORT_FILE}")
    assert json.loads((config.output_dir / REPORT_FILE).read_text())["complete_images"] == 2


def _tool(argv):
    return load_tool("precompute_targets").main(argv)


def test_the_tool_writes_bf16_dual_targets_and_fails_in_one_line(corpus, tmp_path):
    argv = ["--data", str(corpus.data[0]), "--image-root", str(corpus.image_root),
            "--tokenizer-config", str(corpus.tokenizer_config),
            "--tokenizer-checkpoint", str(corpus.tokenizer_checkpoint),
            "--output", str(tmp_path / "cli"), "--supervision", "dual", "--workers", "0", "--no-progress",
            "--max-missing-fraction", "0.5"]
    assert run_ranks(_tool, 1, argv)[0] == 0
    targets = VisualTargets(tmp_path / "cli")
    assert len(targets) == 6 and sorted(targets.meta) == ["appearance", "semantic"]
    for branch in ("semantic", "appearance"):
        codes = targets.codes("vg/e.jpg", branch)
        assert codes.shape == (729, 3) and (codes.max(axis=0) < np.array(SIZES)).all()
    assert run_ranks(_tool, 1, argv[:-1] + ["0.1"])[0] == 1  # 2 of 7 images missing or broken
