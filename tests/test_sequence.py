"""Image placeholders expand to visual positions; labels and masks follow; images are never cut."""

import pytest
import torch

from megatron_asvr.data.batch import build_micro_batch
from megatron_asvr.data.sequence import SequenceTooLong, align_visual_targets, build_sequence
from megatron_asvr.tokenizers.templates import IMAGE_PLACEHOLDER as IMG


def test_expansion_labels_and_masks_by_hand():
    # BOS, image (3 positions), prompt 7, answer 8 9, image (2 positions), answer 10
    ids = [1, IMG, 7, 8, 9, IMG, 10]
    sup = [0, 0, 0, 1, 1, 0, 1]
    s = build_sequence(ids, sup, [3, 2], seq_length=12, pad_id=0)
    #            positions: 0  1  2  3  4  5  6  7  8  9 10 11
    assert s.tokens.tolist() == [1, 0, 0, 0, 7, 8, 9, 0, 0, 0, 0, 0]  # the last token is only a label
    assert s.labels.tolist() == [0, 0, 0, 7, 8, 9, 0, 0, 10, 0, 0, 0]
    assert s.loss_mask.tolist() == [0, 0, 0, 0, 1, 1, 0, 0, 1, 0, 0, 0]
    assert s.image_mask.tolist() == [0, 1, 1, 1, 0, 0, 0, 1, 1, 0, 0, 0]
    assert s.image_tokens == [3, 2]


def test_text_may_be_truncated_but_never_an_image():
    ids, sup = [1, IMG, 7, 8, 9, 10], [0, 0, 0, 1, 1, 1]
    s = build_sequence(ids, sup, [3], seq_length=6)
    assert s.tokens.tolist() == [1, 0, 0, 0, 7, 8] and s.labels.tolist() == [0, 0, 0, 7, 8, 9]
    assert s.image_mask.sum() == 3
    with pytest.raises(SequenceTooLong, match="do not fit seq_length=3"):
        build_sequence(ids, sup, [3], seq_length=3)  # the image would be cut
    with pytest.raises(ValueError, match="1 image placeholders but 2 images"):
        build_sequence(ids, sup, [3, 3], seq_length=20)


def test_visual_targets_shift_and_masks():
    a = torch.tensor([[1, 10], [2, 20], [3, 30]])
    b = torch.tensor([[4, 40], [5, 50]])
    targets, mask = align_visual_targets([a, b], [True, False], depth=2, shift=0)
    assert targets.tolist() == [[1, 10], [2, 20], [3, 30], [4, 40], [5, 50]]
    assert mask.tolist() == [True, True, True, False, False]
    targets, mask = align_visual_targets([a, b], [True, True], depth=2, shift=1)
    assert targets[mask].tolist() == [[2, 20], [3, 30], [5, 50]]  # position j -> patch j + 1
    assert mask.tolist() == [True, True, False, True, False]
    empty_targets, empty_mask = align_visual_targets([], [], depth=2)
    assert empty_targets.shape == (0, 2) and empty_mask.shape == (0,)


def test_samples_stack_into_a_micro_batch():
    """One sample per row at their built length (the default plan): evaluation's queries."""
    s = build_sequence([1, IMG, 5, 6], [0, 0, 0, 1], [2], seq_length=6)
    batch = build_micro_batch([s, s])
    assert batch.tokens.shape == (2, 6) and batch.position_ids.tolist()[1] == list(range(6))
    assert batch.image_index.tolist() == [1, 2, 7, 8]  # in the flattened [2 * 6]
    assert batch.sample_lengths == [4, 4] and batch.labels.tolist()[0] == [0, 0, 5, 6, 0, 0]
