"""The loader's order: deterministic by (seed, epoch), independent of the data-parallel size,
resumable exactly from the consumed-sample count; and its per-sample rules."""

from pathlib import Path

import numpy as np
import pytest

from tests.support.multirank import run_ranks
from megatron_asvr.config import ASVRConfig
from megatron_asvr.data.llava import TokenizedSample
from megatron_asvr.data.loader import (
    BatchingSettings,
    DataLoaderError,
    GlobalBatchOrder,
    SampleBuilder,
    StageNeeds,
    TrainLoader,
    ZERO_IMAGE,
)
from megatron_asvr.tokenizers.templates import IMAGE_PLACEHOLDER

NUM_SAMPLES, GLOBAL_BATCH, MICRO_BATCH = 57, 8, 2
TEXT_ONLY = ASVRConfig(visual_loss=False)
NOTHING = StageNeeds(pixels=False, input_codes=False, targets=False)


def _write_shards(directory: Path) -> None:
    from megatron_asvr.data.shards import ShardWriter

    writer = ShardWriter(directory, samples_per_shard=20)
    rng = np.random.default_rng(0)
    for i in range(NUM_SAMPLES):
        n = int(rng.integers(4, 30))
        ids = np.concatenate([[1], rng.integers(3, 100, n)]).astype(np.int32)
        writer.add(TokenizedSample(id=f"s{i}", source="synthetic", input_ids=ids, loss_mask=(ids > 50).astype(np.uint8),
                                   images=(), image_sizes=(), num_positions=len(ids)))
    writer.finalize({})


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    directory = tmp_path_factory.mktemp("loader") / "shards"
    run_ranks(_write_shards, 1, directory)
    return directory


def _sample_ids(shards_dir, dp_rank, dp_size, consumed, steps, group_by_length=False, workers=0,
                batching="pad_full"):
    """Sample ids this rank gets for ``steps`` steps after ``consumed`` samples (its own process)."""
    from megatron_asvr.data.shards import ShardDataset

    data = ShardDataset(shards_dir)
    order = GlobalBatchOrder(len(data), GLOBAL_BATCH, seed=5, lengths=data.num_positions if group_by_length else None)
    builder = SampleBuilder(data, Path("."), None, TEXT_ONLY, 64, "resize", NOTHING, patches_per_tile=4)
    settings = BatchingSettings(batching, MICRO_BATCH, seq_length=64)
    loader = TrainLoader(order, builder, dp_rank, dp_size, settings, TEXT_ONLY, NOTHING, workers, consumed)
    ids = [i for _ in range(steps) for micro in loader.next_step() for i in micro.ids]
    return ids, loader.state_dict()


@pytest.mark.parametrize("batching", ["pad_full", "pack"])
def test_resume_at_dp2_gives_the_next_100_samples_of_an_uninterrupted_run(shards, batching):
    steps_for_100 = 100 // GLOBAL_BATCH + 1
    straight = [run_ranks(_sample_ids, 1, shards, r, 2, 0, 5 + steps_for_100, batching=batching)[0][0]
                for r in range(2)]
    first = [run_ranks(_sample_ids, 1, shards, r, 2, 0, 5, batching=batching)[0] for r in range(2)]
    state = first[0][1]
    assert state["consumed_samples"] == 5 * GLOBAL_BATCH == first[1][1]["consumed_samples"]
    resumed = [run_ranks(_sample_ids, 1, shards, r, 2, state["consumed_samples"], steps_for_100, False, 2,
                         batching=batching)[0][0] for r in range(2)]
    per_rank = 5 * GLOBAL_BATCH // 2
    for r in range(2):
        assert resumed[r] == straight[r][per_rank:]
    assert len(resumed[0]) + len(resumed[1]) >= 100


def test_order_does_not_depend_on_dp_size_and_covers_each_epoch(shards):
    one = run_ranks(_sample_ids, 1, shards, 0, 1, 0, 14)[0][0]
    two = [run_ranks(_sample_ids, 1, shards, r, 2, 0, 14)[0][0] for r in range(2)]
    half = GLOBAL_BATCH // 2
    interleaved = [i for s in range(14) for r in range(2) for i in two[r][s * half:(s + 1) * half]]
    assert interleaved == one
    epoch = NUM_SAMPLES // GLOBAL_BATCH * GLOBAL_BATCH  # 56: the tail sample of each epoch is dropped
    assert len(set(one[:epoch])) == epoch and one[:epoch] != one[epoch:2 * epoch]


def test_group_by_length_is_deterministic_and_groups(shards):
    from megatron_asvr.data.shards import ShardDataset

    a = run_ranks(_sample_ids, 1, shards, 0, 1, 0, 7, True)[0][0]
    assert a == run_ranks(_sample_ids, 1, shards, 0, 1, 0, 7, True)[0][0]
    lengths = {f"s{i}": n for i, n in enumerate(ShardDataset(shards).num_positions)}
    spread = [np.ptp([lengths[i] for i in a[s:s + GLOBAL_BATCH]]) for s in range(0, len(a), GLOBAL_BATCH)]
    plain = run_ranks(_sample_ids, 1, shards, 0, 1, 0, 7)[0][0]
    plain_spread = [np.ptp([lengths[i] for i in plain[s:s + GLOBAL_BATCH]]) for s in range(0, len(plain), GLOBAL_BATCH)]
    assert np.mean(spread) < np.mean(plain_spread) / 2


class _Shards(list):
    pass


class _Targets:
    """The two methods the builder reads from a VisualTargets directory."""

    directory = "targets"

    def __contains__(self, key):
        return key == ZERO_IMAGE

    def codes(self, key, branch):
        return np.full((4, 8), 3 if key == ZERO_IMAGE else 7, dtype=np.uint16)


def _sample(ids, images=()):
    ids = np.array(ids, dtype=np.int32)
    return TokenizedSample(id="x", source="s", input_ids=ids, loss_mask=(ids == 9).astype(np.uint8), images=images,
                           image_sizes=tuple((384, 384) for _ in images), num_positions=len(ids))


def test_text_only_samples_get_the_zero_image_only_when_supervised():
    needs = StageNeeds(pixels=False, input_codes=False, targets=True)
    shards = _Shards([_sample([1, 5, 9, 9])])
    masked = SampleBuilder(shards, Path("."), _Targets(), ASVRConfig(), 16, "resize", needs, patches_per_tile=4)(0)
    assert masked["sequence"].image_mask.sum() == 0 and masked["codes"]["semantic"] == []
    supervised = SampleBuilder(shards, Path("."), _Targets(), ASVRConfig(supervise_text_only=True), 16, "resize",
                               needs, patches_per_tile=4)(0)
    assert supervised["sequence"].image_mask.tolist()[:6] == [False, True, True, True, True, False]
    assert supervised["codes"]["semantic"][0].unique().tolist() == [3]  # the zero image's codes


def test_too_long_samples_are_an_error_or_a_counted_masked_drop():
    shards = _Shards([_sample([1, IMAGE_PLACEHOLDER, 9, 9], images=("a.jpg",))])
    strict = SampleBuilder(shards, Path("."), None, TEXT_ONLY, 3, "resize", NOTHING, patches_per_tile=4)
    with pytest.raises(DataLoaderError, match="sample 'x' \\(s\\): .* do not fit seq_length=3"):
        strict(0)
    dropped = SampleBuilder(shards, Path("."), None, TEXT_ONLY, 3, "resize", NOTHING, patches_per_tile=4,
                            drop_too_long=True)(0)
    assert dropped["dropped"] and dropped["sequence"].loss_mask.sum() == 0
