"""Samples whose images cannot be read at training time (``data.unreadable_image``).

Preprocessing read every image, but files change under a running job (deleted, truncated, a
storage hiccup). The loader worker then gives the sample blank tiles (as many as its images
would have made, so that the layout planned from lengths holds) and says why. Only the first
pipeline stage reads pixels, and a file can flicker between the tensor-parallel ranks that read
it, so the ranks of a model replica agree on the step's unreadable samples (one all-reduce of
host flags over gloo), then each masks those samples' loss, text and visual alike: a zero image
never teaches the model. The samples are counted; with the ``stop`` policy the run ends instead,
naming the record.
"""

import dataclasses
import itertools
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_asvr.data.batch import MicroBatch
from megatron_asvr.runtime.waits import waiting_for


def agree(reasons: List[List[Optional[str]]], group) -> List[List[bool]]:
    """Per micro-batch, per sample: unreadable on any rank of ``group`` (None: this rank alone)."""
    flags = torch.tensor([reason is not None for micro in reasons for reason in micro], dtype=torch.uint8)
    if group is not None and flags.numel():
        with waiting_for("the ranks of this model replica", "the agreement on the step's unreadable images"):
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)  # host tensors on a gloo group: no device sync
    it = iter(flags.tolist())
    return [[bool(next(it)) for _ in micro] for micro in reasons]


def without_loss(batch: MicroBatch, lost: Sequence[bool]) -> MicroBatch:
    """``batch`` (on the host) with no loss on the samples flagged in ``lost``, in layout order:
    their text labels and their images' visual targets unsupervised."""
    if not any(lost):
        return batch
    if batch.cu_seqlens is None:  # one sample per row
        in_lost = torch.tensor(lost)[:, None].expand_as(batch.tokens)
    else:  # packed: the samples end to end in the one row
        in_lost = torch.zeros_like(batch.tokens, dtype=torch.bool)
        starts = itertools.accumulate(batch.sample_lengths, initial=0)
        for flag, start, length in zip(lost, starts, batch.sample_lengths):
            in_lost[0, start:start + length] = flag
    changes = {"loss_mask": batch.loss_mask.masked_fill(in_lost, 0.0)}
    if batch.visual_rows is not None:
        image_lost = in_lost.flatten()[batch.image_index]  # [sum P], per visual position
        changes["visual_rows"] = batch.visual_rows[~image_lost[batch.visual_rows]]
    return dataclasses.replace(batch, **changes)
