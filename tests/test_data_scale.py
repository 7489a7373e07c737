"""The data path at scale, small: sample lengths from the shards' arrays equal the built ones, the
synthetic corpus preprocesses cleanly, and a resume near the end of an epoch of the bunny2m recipes
gives the same samples in the same packed micro-batches as the run from step 0
(tools/bench_scale.py runs the same check at 2M records)."""

from pathlib import Path

import numpy as np
import pytest

from tests.support.fixtures import llama2_tokenizer_model
from megatron_asvr.benchmark.data_scale import built_steps, planned_steps, recipe_loader, resume_check
from megatron_asvr.benchmark.scale_corpus import write_scale_corpus
from megatron_asvr.config import ASVRConfig
from megatron_asvr.config.loading import load_run_config
from megatron_asvr.config.tools import PreprocessConfig, ValidationConfig
from megatron_asvr.data.llava import TokenizedSample
from megatron_asvr.data.loader import SampleBuilder, StageNeeds, ZERO_IMAGE
from megatron_asvr.data.preprocess import preprocess
from megatron_asvr.data.shards import ShardDataset, ShardWriter
from megatron_asvr.tokenizers.templates import IMAGE_PLACEHOLDER as IMG

REPO = Path(__file__).resolve().parents[1]
RECORDS = 1500
NOTHING = StageNeeds(pixels=False, input_codes=False, targets=False)
# The samples whose length is not all their positions but one: an image last, one token only (once a
# zero image follows it), too long for seq_length 24 (dropped), and anyres images (counted by size).
EDGES = {"image_last": [1, 5, IMG], "bos_only": [1], "too_long": [1, IMG] + [9] * 30}


def _edge_shards(directory: Path) -> ShardDataset:
    rng = np.random.default_rng(0)
    writer = ShardWriter(directory, samples_per_shard=7)
    samples = [(f"text{i}", [1] + rng.integers(3, 99, int(rng.integers(1, 20))).tolist()) for i in range(12)]
    samples += [(f"image{i}", [1, 7, IMG] + [9] * int(rng.integers(1, 12)) + [IMG] * (i % 2) + [8]) for i in range(12)]
    samples += list(EDGES.items())
    for name, ids in samples:
        ids = np.array(ids, dtype=np.int32)
        images = tuple(f"{name}_{k}.jpg" for k in range(int((ids == IMG).sum())))
        sizes = tuple((int(rng.integers(300, 1500)), int(rng.integers(300, 1500))) for _ in images)
        writer.add(TokenizedSample(name, "s", ids, (ids == 9).astype(np.uint8), images, sizes, len(ids)))
    writer.finalize({})
    return ShardDataset(directory)


class _Targets:
    directory = "targets"

    def __contains__(self, key):
        return key == ZERO_IMAGE


@pytest.mark.parametrize("mode,supervise_text_only", [("pad", False), ("resize", True), ("anyres", False)])
def test_lengths_from_the_shard_arrays_equal_the_built_lengths(tmp_path, mode, supervise_text_only):
    shards = _edge_shards(tmp_path / "shards")
    asvr = ASVRConfig(supervise_text_only=supervise_text_only)
    builder = SampleBuilder(shards, tmp_path, _Targets(), asvr, 24, mode, NOTHING, patches_per_tile=4,
                            drop_too_long=True)
    built = []
    builder.length = lambda i: built.append(shards[int(i)].id) or SampleBuilder.length(builder, i)
    everything = np.random.default_rng(1).permutation(len(shards))
    expected = [SampleBuilder.length(builder, i) for i in everything]
    assert builder.lengths(everything).tolist() == expected
    edges = {"image_last", "too_long"} | ({"bos_only"} if supervise_text_only else set())
    anyres = {f"image{i}" for i in range(12)} if mode == "anyres" else set()
    assert set(built) == edges | anyres  # the rest came from the arrays


@pytest.fixture(scope="module")
def corpus_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    counts = write_scale_corpus(root / "corpus", RECORDS, seed=3, pool_images=24)
    report = preprocess(PreprocessConfig(
        inputs=((None, root / "corpus" / "corpus.jsonl"),), output_dir=root / "shards",
        tokenizer=llama2_tokenizer_model(), template="vicuna_v1",
        validation=ValidationConfig(image_root=root / "corpus" / "images"), workers=1, progress=False))
    return root / "shards", counts, report


def test_the_synthetic_corpus_preprocesses_cleanly_in_its_mixture(corpus_shards):
    directory, counts, report = corpus_shards
    assert sum(counts.values()) == report["total_records"] == report["written"] == RECORDS
    assert report["skipped"] == report["errors"] == 0
    assert counts["llava_558k_blip_captions"] > RECORDS * 0.4 and 0 < counts["sharegpt_40k"] < RECORDS * 0.06
    shards = ShardDataset(directory)
    assert "text" in shards.sources and "coco" in shards.sources
    assert (shards.num_images <= 1).all() and 0 < (shards.num_images == 0).sum() < RECORDS * 0.06
    assert shards.num_positions.max() <= 2048


@pytest.mark.parametrize("recipe", ["bunny2m_stage1", "bunny2m_stage2"])
def test_a_resume_at_90_percent_of_an_epoch_gives_the_next_100_samples_of_the_run_from_0(corpus_shards, recipe):
    directory = corpus_shards[0]
    config = load_run_config(REPO / "configs" / f"{recipe}.yaml",
                             [f"data.shards={directory}", "train.global_batch=32"])
    shards = ShardDataset(directory)
    step = int(0.9 * (RECORDS // 32))
    check = resume_check(config, shards, step, samples=100)
    assert check.exact and check.samples >= 100 and check.step == step == 41
    packed = [micro for s in check.resumed for micro in s]
    assert sum(len(ids) for ids, _, _ in packed) > len(packed) >= 2  # samples share micro-batches
    assert planned_steps(recipe_loader(config, shards), step + 1, len(check.resumed)) != check.resumed
    if recipe == "bunny2m_stage1":  # the run from 0, built step by step as training builds it, as planned
        straight = built_steps(recipe_loader(config, shards), step + len(check.resumed))
        assert straight[step:] == check.uninterrupted
