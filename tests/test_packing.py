"""Packing and padding-to-longest: the plans, the packed layout, and whole-model equivalence with
every sample padded to the full length (TP=PP=DP=1 and parallel layouts)."""

import dataclasses

import pytest
import torch

from tests.support.harness import train_case
from tests.support.multirank import run_ranks
from tests.support.tiny_vlm import TINY_MODEL, VLMCase, losses
from megatron_asvr.config import ParallelConfig
from megatron_asvr.data.packing import MicroPlan, layout_tokens, packing_report, plan_step
from megatron_asvr.data.sequence import build_sequence
from megatron_asvr.model.canonical import merge_ranks
from megatron_asvr.tokenizers.templates import IMAGE_PLACEHOLDER

TOL = 1e-5
STAGE2 = dataclasses.replace(TINY_MODEL, trainable=["projector", "llm", "visual_head"])


def test_first_fit_decreasing_fills_micro_batches_of_rows():
    lengths = [9, 3, 7, 5, 2]
    # rows of 10, micro-batches of 1 row: 9 -> bin 0; 7 -> bin 1; 5 -> bin 2; 3 -> bin 1 (fills it); 2 -> bin 2;
    # each cut to its content
    assert plan_step(lengths, "pack", micro_batch=1, seq_length=10) == [
        MicroPlan((0,), 9, True), MicroPlan((2, 1), 10, True), MicroPlan((3, 4), 7, True)]
    # micro-batches of 2 rows are one packed sequence of up to 20: samples cross the row boundary;
    # rounded up to a multiple of 4 (e.g. the tensor-parallel size under sequence parallelism)
    plans = plan_step(lengths, "pack", micro_batch=2, seq_length=10, length_multiple=4)
    assert plans == [MicroPlan((0, 2, 1), 20, True), MicroPlan((3, 4), 8, True)]
    report = packing_report(plans, lengths)
    assert (report.samples, report.micro_batches, report.real_positions, report.computed_positions) == (5, 2, 26, 28)
    # interleaved pipelining runs micro-batches in groups of PP: 3 -> 4 with PP 4 (one empty, of 1 position)
    assert [p.length for p in plan_step(lengths, "pack", 1, 10, micro_multiple=4)] == [9, 10, 7, 1]
    with pytest.raises(ValueError, match="a sample of 11 positions cannot fit a row of 10"):
        plan_step([11], "pack", 2, 10)


def test_padding_to_the_longest_rounds_up_and_caps():
    plans = plan_step([9, 3, 7, 5, 2], "pad_longest", micro_batch=2, seq_length=12, length_multiple=8)
    assert [(p.samples, p.length) for p in plans] == [((0, 1), 12), ((2, 3), 8), ((4,), 8)]
    assert [p.length for p in plan_step([9, 3], "pad_full", 2, 12)] == [12]


def test_packed_layout_keeps_samples_apart():
    a = build_sequence([1, IMAGE_PLACEHOLDER, 7, 8], [0, 0, 0, 1], [2], seq_length=8)  # 1 I I 7 | label 8
    b = build_sequence([1, 5, 6], [0, 1, 1], [], seq_length=8)
    assert (a.length, b.length) == (4, 2)
    laid = layout_tokens([a, b], MicroPlan((0, 1), 8, packed=True))
    assert laid["tokens"].tolist() == [[1, 0, 0, 7, 1, 5, 0, 0]]
    assert laid["labels"].tolist() == [[0, 0, 7, 8, 5, 6, 0, 0]]  # each sample's last label is its own
    assert laid["loss_mask"].tolist() == [[0, 0, 0, 1, 1, 1, 0, 0]]
    assert laid["image_mask"].tolist() == [[False, True, True, False, False, False, False, False]]
    assert laid["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 0, 1]]  # RoPE restarts per sample
    assert laid["cu_seqlens"].tolist() == [0, 4, 6, 8] and laid["max_seqlen"] == 4


def test_the_case_batches_are_packed():
    packed = VLMCase(model=STAGE2, batching="pack").global_batch_data(0)
    assert [m.cu_seqlens.tolist() for m in packed] == [[0, 13, 22, 24], [0, 9, 14, 16]]  # 22 -> 24, 14 -> 16 (8)
    assert [m.tokens.shape for m in packed] == [(1, 24), (1, 16)]


def _step_losses_and_params(results, model):
    return losses(results, model), merge_ranks([r["params"][-1] for r in results])


@pytest.fixture(scope="module")
def reference():
    return run_ranks(train_case, 1, VLMCase(model=STAGE2, steps=2))[0]


LAYOUTS = {
    "pack": (1, ParallelConfig(), "pack"),
    "pad_longest": (1, ParallelConfig(), "pad_longest"),
    "pack_tp2_sp": (2, ParallelConfig(tensor_parallel=2, sequence_parallel=True), "pack"),
    "pack_pp2_vp2": (2, ParallelConfig(pipeline_parallel=2, virtual_pipeline=2), "pack"),
    "pack_dp2_distopt": (2, ParallelConfig(distributed_optimizer=True), "pack"),
    "pad_longest_pp2": (2, ParallelConfig(pipeline_parallel=2), "pad_longest"),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_packed_and_unpadded_steps_equal_full_padding(reference, name):
    """Per step: text loss, visual loss and per-depth CE of the global batch, and every parameter after
    the last step, equal the pad-to-full TP=PP=DP=1 run within 1e-5."""
    world, parallel, batching = LAYOUTS[name]
    results = run_ranks(train_case, world, VLMCase(model=STAGE2, steps=2, parallel=parallel, batching=batching),
                        reference["initial"])
    got, params = _step_losses_and_params(results, STAGE2)
    want, ref_params = _step_losses_and_params([reference], STAGE2)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert abs(got[key] - value) <= TOL, (name, key, got[key], value)
    for key, value in ref_params.items():
        assert (params[key] - value).abs().max().item() <= TOL, (name, key)


def test_packed_anyres_tiles_keep_their_targets_in_order():
    """An anyres image of 3 tiles and a one-tile image packed into one micro-batch: the image
    positions, pixels and visual targets stay aligned, sample by sample."""
    from megatron_asvr.data.batch import build_micro_batch

    patches = 4
    first = build_sequence([1, IMAGE_PLACEHOLDER, 7, 8], [0, 0, 0, 1], [3 * patches], seq_length=20)
    second = build_sequence([1, IMAGE_PLACEHOLDER, 9], [0, 0, 1], [patches], seq_length=20)
    codes = [torch.arange(3 * patches * 2).view(3 * patches, 2) % 5, torch.full((patches, 2), 4)]
    batch = build_micro_batch([first, second], plan_step([first.length, second.length], "pack", 1, 20)[0],
                              images=torch.zeros(4, 3, 8, 8), codes={"semantic": codes}, depths={"semantic": 2})
    assert batch.cu_seqlens.tolist() == [0, 14, 19]  # BOS + 12 + one text position, then BOS + 4
    assert batch.image_index.tolist() == list(range(1, 13)) + list(range(15, 19))
    assert torch.equal(batch.visual_targets["semantic"], torch.cat(codes))
    assert batch.visual_rows.tolist() == list(range(16)) and batch.num_image_positions == 16
