"""Shards: write then read back, random access, and identical bytes for 1 and 2 workers."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.fixtures import llama2_tokenizer_model
from megatron_asvr.data.llava import TokenizedSample
from megatron_asvr.config.tools import PreprocessConfig, ValidationConfig
from megatron_asvr.data.preprocess import preprocess
from megatron_asvr.data.shards import SHARD_MANIFEST, ShardDataset, ShardWriter
from megatron_asvr.tokenizers.templates import IMAGE_PLACEHOLDER

MODEL = llama2_tokenizer_model()


def make_sample(i: int) -> TokenizedSample:
    rng = np.random.default_rng(i)
    n = 3 + i % 7
    ids = rng.integers(3, 32000, n).astype(np.int32)
    images = tuple(f"coco/{i}_{k}.jpg" for k in range(i % 3))
    ids[: len(images)] = IMAGE_PLACEHOLDER
    return TokenizedSample(
        id=f"sample-{i}-é",
        source=("coco", "text", "vg")[i % 3],
        input_ids=ids,
        loss_mask=(rng.random(n) < 0.5).astype(np.uint8),
        images=images,
        image_sizes=tuple((10 + i, 20 + k) for k in range(len(images))),
        num_positions=n + 728 * len(images),
    )


def assert_same(a: TokenizedSample, b: TokenizedSample) -> None:
    assert (a.id, a.source, a.images, a.image_sizes, a.num_positions) == (
        b.id, b.source, b.images, b.image_sizes, b.num_positions
    )
    assert a.input_ids.dtype == np.int32 and a.loss_mask.dtype == np.uint8
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    np.testing.assert_array_equal(a.loss_mask, b.loss_mask)


def test_write_then_read_back_with_random_access(tmp_path):
    samples = [make_sample(i) for i in range(11)]
    writer = ShardWriter(tmp_path / "ds", samples_per_shard=4)
    for sample in samples:
        writer.add(sample)
    writer.finalize({"note": "test"})
    dataset = ShardDataset(tmp_path / "ds")
    assert len(dataset) == 11
    assert [s["num_samples"] for s in dataset.manifest["shards"]] == [4, 4, 3]
    assert dataset.manifest["metadata"] == {"note": "test"}
    assert dataset.sources == ["coco", "text", "vg"]
    order = list(range(11))
    random.Random(0).shuffle(order)
    for i in order:
        assert_same(dataset[i], samples[i])
    assert_same(dataset[-1], samples[10])
    np.testing.assert_array_equal(dataset.num_positions, [s.num_positions for s in samples])
    np.testing.assert_array_equal(dataset.num_images, [len(s.images) for s in samples])
    assert [dataset.sources[k] for k in dataset.source_ids] == [s.source for s in samples]
    with pytest.raises(IndexError, match="sample 11 out of range for 11 samples"):
        dataset[11]
    sizes = {p.name: p.stat().st_size for p in (tmp_path / "ds").iterdir()}
    assert sizes["shard_00002.tokens.bin"] == 4 * sum(len(s.input_ids) for s in samples[8:])
    assert sizes["shard_00002.loss_mask.bin"] == sum(len(s.loss_mask) for s in samples[8:])


def test_unfinished_or_aborted_shards_are_not_a_dataset(tmp_path):
    writer = ShardWriter(tmp_path / "ds", samples_per_shard=2)
    for i in range(3):
        writer.add(make_sample(i))
    with pytest.raises(FileNotFoundError, match="no manifest.json; not a finished shard directory"):
        ShardDataset(tmp_path / "ds")
    with pytest.raises(FileExistsError, match="holds shard files of an unfinished run"):
        ShardWriter(tmp_path / "ds")
    writer.abort()
    assert list((tmp_path / "ds").iterdir()) == []
    writer = ShardWriter(tmp_path / "ds")
    writer.finalize({})
    assert len(ShardDataset(tmp_path / "ds")) == 0
    with pytest.raises(FileExistsError, match="already holds a dataset"):
        ShardWriter(tmp_path / "ds")
    manifest = tmp_path / "ds" / SHARD_MANIFEST
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "version": 99}))
    with pytest.raises(ValueError, match="version 99, expected 'megatron_asvr.llava_shards' version 1"):
        ShardDataset(tmp_path / "ds")


def synthetic_corpus(root: Path, count: int) -> Path:
    """``count`` records over a few images, with some bad ones among them."""
    images = root / "images"
    for folder in ("coco", "vg"):
        (images / folder).mkdir(parents=True)
    for k in range(4):
        Image.new("RGB", (40 + k, 30), (k * 50, 20, 90)).save(images / f"coco/{k}.jpg")
        Image.new("L", (30, 40 + k), k * 50).save(images / f"vg/{k}.png")
    records = []
    for i in range(count):
        if i % 5 == 4:
            records.append({"id": str(i), "conversations": [
                {"from": "human", "value": f"Say {i}."}, {"from": "gpt", "value": f"{i} it is."}]})
            continue
        image = f"{('coco', 'vg')[i % 2]}/{i % 4}.{('jpg', 'png')[i % 2]}"
        if i % 17 == 0:
            image = "coco/missing.jpg"
        records.append({"id": str(i), "image": image, "conversations": [
            {"from": "human", "value": f"<image>\nQuestion {i}?"}, {"from": "gpt", "value": f"Answer {i}."},
            {"from": "human", "value": "And more?"}, {"from": "gpt", "value": "More " * (i % 6)},
        ]})
    path = root / "data.json"
    path.write_text(json.dumps(records))
    return path


def run(root: Path, data: Path, workers: int) -> Path:
    out = root / f"out_{workers}"
    preprocess(PreprocessConfig(
        inputs=((None, data),),
        output_dir=out,
        tokenizer=MODEL,
        template="vicuna_v1",
        validation=ValidationConfig(image_root=root / "images", max_seq_length=1024),
        max_skip_fraction=0.5,
        workers=workers,
        samples_per_shard=70,
        progress=False,
    ))
    return out


def test_one_and_two_workers_write_identical_bytes(tmp_path):
    data = synthetic_corpus(tmp_path, 300)
    one, two = run(tmp_path, data, 1), run(tmp_path, data, 2)
    files = sorted(p.name for p in one.iterdir())
    assert files == sorted(p.name for p in two.iterdir())
    assert len([f for f in files if f.endswith(".tokens.bin")]) == 4
    for name in files:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    report = json.loads((one / "report.json").read_text())
    # every 6th answer "More " * 0 is empty; i % 17 == 0 images are missing
    empty = [i for i in range(300) if i % 5 != 4 and i % 6 == 0]
    missing = [i for i in range(300) if i % 5 != 4 and i % 17 == 0 and i % 6 != 0]
    assert report["by_reason"]["empty_turn"]["skipped"] == len(empty)
    assert report["by_reason"]["missing_image"]["skipped"] == len(missing)
    assert report["by_reason"]["converted_mode"]["fixed"] == len(
        [i for i in range(300) if i % 5 != 4 and i % 2 == 1 and i % 6 != 0 and i % 17 != 0]
    )
    dataset = ShardDataset(one)
    assert len(dataset) == report["written"] == 300 - len(empty) - len(missing)
    kept = [i for i in range(300) if i not in empty and i not in missing]
    assert [dataset[k].id for k in range(len(dataset))] == [str(i) for i in kept]
    assert dataset.sources == ["vg", "coco", "text"]  # in order of first appearance
    assert dataset[0].images == ("vg/1.png",) and dataset[0].image_sizes == ((30, 41),)
