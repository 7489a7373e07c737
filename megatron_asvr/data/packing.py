"""How one rank's samples of a step become micro-batches: fixed length, padded to the longest, or packed.

    plan_step(lengths, batching, ...) -> [MicroPlan]   from the samples' lengths alone, so every
                                                       pipeline stage of a replica plans the same
    layout_tokens(sequences, plan)    -> [b, s] token-level tensors (+ cu_seqlens when packed)

``pad_full``: every sample padded to ``data.seq_length`` (the old behaviour). ``pad_longest``:
each micro-batch padded to its longest sample, rounded up to ``length_multiple`` (8, and the
tensor-parallel size under sequence parallelism). ``pack``: a micro-batch is ``micro_batch`` rows
of ``data.seq_length`` laid end to end as ONE packed sequence [1, micro_batch x seq_length];
first-fit-decreasing fills these micro-batches with whole samples (a sample may cross from one
row into the next: rows are only the unit of size), and ``cu_seqlens`` mark each sample, so
that attention stays within a sample (THD / cu_seqlens attention, or its CPU twin,
``model.attention``) and RoPE positions restart at each. A micro-batch is cut to its content,
rounded up to ``length_multiple``: the last one of a step is often far from full (megatron's
pipeline then sends each micro-batch's shape first). The count of micro-batches is padded with
empty ones to what the schedule needs (``micro_multiple``: interleaved pipelining runs
micro-batches in groups of the pipeline size). The larger ``micro_batch x seq_length``, the less
padding: samples of 760 positions fill a 2048-position row only to 74%, but 16 such rows to 97%.
"""

import itertools
import math
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

from megatron_asvr.config.schema import Batching
from megatron_asvr.data.sequence import SequenceSample

# token-level fields and their dtypes (padding: id 0, label 0, no loss, no image)
_FIELDS = {"tokens": torch.long, "labels": torch.long, "loss_mask": torch.float32, "image_mask": torch.bool}


@dataclass(frozen=True)
class MicroPlan:
    """One micro-batch: which samples, in the order they are laid out, and how."""

    samples: Tuple[int, ...]  # positions in this rank's share of the step
    length: int  # positions per row; packed: of the one packed sequence
    packed: bool = False  # the samples end to end in one row; else one sample per row

    @property
    def computed_positions(self) -> int:
        return self.length if self.packed else len(self.samples) * self.length


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> List[List[int]]:
    """Sample positions per bin: the longest first, each into the first bin it fits (ties by position)."""
    rows: List[List[int]] = []
    room: List[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] > capacity:
            raise ValueError(f"a sample of {lengths[i]} positions cannot fit {capacity}")
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
    if max(lengths, default=0) > seq_length:
        raise ValueError(f"a sample of {max(lengths)} positions cannot fit a row of {seq_length}")
    capacity = micro_batch * seq_length
    bins = first_fit_decreasing(lengths, capacity)
    bins += [[] for _ in range(_round_up(len(bins), micro_multiple) - len(bins))]
    return [MicroPlan(tuple(b), min(capacity, _round_up(max(sum(lengths[i] for i in b), 1), length_multiple)),
                      packed=True) for b in bins]


def layout_tokens(sequences: Sequence[SequenceSample], plan: MicroPlan) -> Dict[str, torch.Tensor]:
    """tokens, labels, loss_mask, image_mask, position_ids [b, s] of ``plan`` (``sequences`` in its
    order); packed: one row [1, length], ``cu_seqlens`` [segments + 1] int32 and ``max_seqlen``."""
    length = plan.length
    if not plan.packed:
        out = {key: torch.stack([getattr(s, key)[:length] for s in sequences]) for key in _FIELDS}
        out["position_ids"] = torch.arange(length).expand(len(sequences), length).contiguous()
        return out
    pieces = {key: [] for key in (*_FIELDS, "position_ids")}
    segments = []
    for sample in sequences:
        for key in _FIELDS:
            pieces[key].append(getattr(sample, key)[:sample.length])
        pieces["position_ids"].append(torch.arange(sample.length))  # RoPE restarts at each sample
        segments.append(sample.length)
    tail = length - sum(segments)
    if tail:  # the padding: a segment of its own, attending only to itself
        for key, dtype in _FIELDS.items():
            pieces[key].append(torch.zeros(tail, dtype=dtype))
        pieces["position_ids"].append(torch.arange(tail))
        segments.append(tail)
    out = {key: torch.cat(parts)[None] for key, parts in pieces.items()}  # [1, length]
    out["cu_seqlens"] = torch.tensor([0, *itertools.accumulate(segments)], dtype=torch.int32)
    out["max_seqlen"] = max(segments)
    return out


@dataclass(frozen=True)
class PackingReport:
    """How well planned micro-batches are filled (over the steps it was computed on)."""

    samples: int
    micro_batches: int
    real_positions: int
    computed_positions: int

    @property
    def fill(self) -> float:
        return self.real_positions / max(self.computed_positions, 1)

    def describe(self) -> str:
        return (f"{self.samples} samples in {self.micro_batches} micro-batches "
                f"({self.samples / max(self.micro_batches, 1):.2f} each), fill {self.fill:.1%} "
                f"({self.real_positions} real of {self.computed_positions} computed positions)")


def packing_report(plans: Sequence[MicroPlan], lengths: Sequence[int]) -> PackingReport:
    return PackingReport(
        samples=sum(len(p.samples) for p in plans), micro_batches=len(plans),
        real_positions=sum(lengths[i] for p in plans for i in p.samples),
        computed_positions=sum(p.computed_positions for p in plans),
    )


def length_multiple_for(tensor_parallel: int, sequence_parallel: bool) -> int:
    """What a padded micro-batch length must divide by: 8 (aligned kernels), and TP under sequence parallelism."""
    tp = tensor_parallel if sequence_parallel else 1
    return tp * 8 // math.gcd(tp, 8)
