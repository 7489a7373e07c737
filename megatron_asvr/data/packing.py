"""How one rank's samples of a step become micro-batches: fixed length, padded to the longest, or packed.

    plan_step(lengths, batching, ...) -> [MicroPlan]   from the samples' lengths alone, so every
                                                       pipeline stage of a replica plans the same
    layout_tokens(sequences, plan)    -> [b, s] token-level tensors (+ cu_seqlens when packed)

``pad_full``: every sample padded to ``data.seq_length`` (the old behaviour). ``pad_longest``:
each micro-batch padded to its longest sample, rounded up to ``length_multiple`` (the tensor-
parallel size under sequence parallelism). ``pack``: first-fit-decreasing puts several samples
into rows of ``data.seq_length``; a micro-batch is ``micro_batch`` rows concatenated into one
packed sequence [1, rows x seq_length] whose ``cu_seqlens`` mark each sample (and each row's
padding tail), so that attention stays within a sample (THD / cu_seqlens attention, or its CPU
twin, ``model.attention``) and RoPE positions restart at each. Row and micro-batch counts are
padded with empty rows to multiples the schedule needs (``micro_multiple``: interleaved
pipelining runs micro-batches in groups of the pipeline size).
"""

import itertools
import math
from dataclasses import dataclass
from typing import Dict, List, Literal, Optional, Sequence, Tuple

import torch

from megatron_asvr.data.sequence import SequenceSample

Batching = Literal["pack", "pad_longest", "pad_full"]
# token-level fields and their dtypes (padding: id 0, label 0, no loss, no image)
_FIELDS = {"tokens": torch.long, "labels": torch.long, "loss_mask": torch.float32, "image_mask": torch.bool}


@dataclass(frozen=True)
class MicroPlan:
    """One micro-batch: which samples, in the order they are laid out, and how."""

    samples: Tuple[int, ...]  # positions in this rank's share of the step
    length: int  # positions per row
    rows: Optional[Tuple[int, ...]] = None  # packed: samples in each row, in order; None: one sample per row

    @property
    def num_rows(self) -> int:
        return len(self.samples) if self.rows is None else len(self.rows)


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> List[List[int]]:
    """Sample positions per row: the longest first, each into the first row it fits (ties by position)."""
    rows: List[List[int]] = []
    room: List[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] > capacity:
            raise ValueError(f"a sample of {lengths[i]} positions cannot fit a row of {capacity}")
        row = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return rows


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def plan_step(lengths: Sequence[int], batching: Batching, micro_batch: int, seq_length: int,
              length_multiple: int = 1, micro_multiple: int = 1) -> List[MicroPlan]:
    """This rank's micro-batches of one step, from its samples' real lengths (in step order)."""
    if batching != "pack":
        plans = []
        for start in range(0, len(lengths), micro_batch):
            chunk = tuple(range(start, min(start + micro_batch, len(lengths))))
            longest = max(lengths[i] for i in chunk)
            length = seq_length if batching == "pad_full" else min(seq_length, _round_up(longest, length_multiple))
            plans.append(MicroPlan(chunk, length))
        return plans
    rows = first_fit_decreasing(lengths, seq_length)
    rows += [[] for _ in range(_round_up(len(rows), micro_batch * micro_multiple) - len(rows))]
    return [
        MicroPlan(tuple(i for row in group for i in row), seq_length, tuple(len(row) for row in group))
        for group in (rows[m:m + micro_batch] for m in range(0, len(rows), micro_batch))
    ]


def layout_tokens(sequences: Sequence[SequenceSample], plan: MicroPlan) -> Dict[str, torch.Tensor]:
    """tokens, labels, loss_mask, image_mask, position_ids [b, s] of ``plan`` (``sequences`` in its
    order); packed: one row [1, rows x length], ``cu_seqlens`` [segments + 1] int32 and ``max_seqlen``."""
    length = plan.length
    if plan.rows is None:
        out = {key: torch.stack([getattr(s, key)[:length] for s in sequences]) for key in _FIELDS}
        out["position_ids"] = torch.arange(length).expand(len(sequences), length).contiguous()
        return out
    pieces = {key: [] for key in (*_FIELDS, "position_ids")}
    segments, it = [], iter(sequences)
    for count in plan.rows:
        used = 0
        for sample in (next(it) for _ in range(count)):
            for key in _FIELDS:
                pieces[key].append(getattr(sample, key)[:sample.length])
            pieces["position_ids"].append(torch.arange(sample.length))  # RoPE restarts at each sample
            segments.append(sample.length)
            used += sample.length
        if used < length:  # the row's padding tail: a segment of its own, attending only to itself
            for key, dtype in _FIELDS.items():
                pieces[key].append(torch.zeros(length - used, dtype=dtype))
            pieces["position_ids"].append(torch.arange(length - used))
            segments.append(length - used)
    out = {key: torch.cat(parts)[None] for key, parts in pieces.items()}  # [1, rows * length]
    out["cu_seqlens"] = torch.tensor([0, *itertools.accumulate(segments)], dtype=torch.int32)
    out["max_seqlen"] = max(segments)
    return out


@dataclass(frozen=True)
class PackingReport:
    """How well the planned micro-batches are filled (over the steps it was computed on)."""

    samples: int
    rows: int
    real_positions: int
    computed_positions: int

    @property
    def fill(self) -> float:
        return self.real_positions / max(self.computed_positions, 1)

    @property
    def samples_per_row(self) -> float:
        return self.samples / max(self.rows, 1)

    def describe(self) -> str:
        return (f"{self.samples} samples in {self.rows} rows ({self.samples_per_row:.2f} per row), "
                f"fill {self.fill:.1%} ({self.real_positions} real of {self.computed_positions} computed positions)")


def packing_report(plans: Sequence[MicroPlan], lengths: Sequence[int]) -> PackingReport:
    return PackingReport(
        samples=sum(len(p.samples) for p in plans), rows=sum(p.num_rows for p in plans),
        real_positions=sum(lengths[i] for p in plans for i in p.samples),
        computed_positions=sum(p.num_rows * p.length for p in plans),
    )


def length_multiple_for(tensor_parallel: int, sequence_parallel: bool) -> int:
    """What a padded micro-batch length must divide by: 8 (aligned kernels), and TP under sequence parallelism."""
    tp = tensor_parallel if sequence_parallel else 1
    return tp * 8 // math.gcd(tp, 8)
