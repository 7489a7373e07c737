"""The micro-batch: what one forward pass of one pipeline stage consumes, built on the host.

``build_micro_batch(...)`` is the one place a micro-batch is assembled (the loader, the
synthetic benchmark batches and the tests all call it). Everything the step needs
to know on the host (how many samples, images, supervised tokens, dropped
samples) is computed here, from host tensors, so the training step never waits
for the device to learn it. ``MicroBatch.to(device)`` is the one device move,
done by the trainer right before megatron's schedule; ``pin_memory`` lets the
DataLoader's pinning thread prepare it for a ``non_blocking`` copy.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from megatron_asvr.data.packing import MicroPlan, layout_tokens
from megatron_asvr.data.sequence import SequenceSample, align_visual_targets


@dataclass
class MicroBatch:
    """One micro-batch of ``b`` samples of ``s`` positions (fields a stage does not need are None)."""

    tokens: torch.Tensor  # [b, s] int64; image positions hold the pad id
    position_ids: torch.Tensor  # [b, s] int64
    labels: Optional[torch.Tensor]  # [b, s] int64, the next token (None: inference, --verify)
    loss_mask: Optional[torch.Tensor]  # [b, s] float, 1 at supervised text labels
    image_index: Optional[torch.Tensor] = None  # [sum P] int64, image positions in the flattened [b * s]
    images: Optional[torch.Tensor] = None  # [sum T, 3, H, W] pixels of every tile, in order (first stage)
    input_codes: Optional[torch.Tensor] = None  # [n, P, D] semantic codes (first stage, discrete input)
    visual_targets: Dict[str, torch.Tensor] = field(default_factory=dict)  # branch -> [sum P, D] codes
    visual_rows: Optional[torch.Tensor] = None  # [n_sup] int64, supervised rows of visual_targets
    cu_seqlens: Optional[torch.Tensor] = None  # packed: [segments + 1] int32 sample boundaries in the one row
    # Host facts (never moved): sample ids, samples masked out as too long, counts for metrics.
    max_seqlen: int = 0  # packed: the longest segment
    sample_lengths: List[int] = field(default_factory=list)  # real positions of each sample
    ids: List[str] = field(default_factory=list)
    dropped: int = 0
    num_image_positions: int = 0
    # Set by the trainer on the last stage: the global batch's supervised counts, on the device.
    loss_counts: Optional[torch.Tensor] = None  # [2] float64: text tokens, visual rows

    def __post_init__(self):
        if not self.sample_lengths:  # built by hand: every row one full sample
            self.sample_lengths = [self.tokens.shape[1]] * self.tokens.shape[0]

    @property
    def num_samples(self) -> int:
        return len(self.sample_lengths)

    @property
    def rows(self) -> int:
        """The micro-batch size the schedule sees (1 when packed: the rows are one sequence)."""
        return self.tokens.shape[0]

    @property
    def computed_positions(self) -> int:
        return self.tokens.numel()

    def _map_tensors(self, fn) -> "MicroBatch":
        changes = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if torch.is_tensor(value):
                changes[f.name] = fn(value)
            elif isinstance(value, dict):
                changes[f.name] = {k: fn(v) for k, v in value.items()}
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device) -> "MicroBatch":
        """Every tensor on ``device``; the copies are asynchronous from pinned memory."""
        return self._map_tensors(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> "MicroBatch":
        """Called by the DataLoader's pinning thread (``pin_memory=True``)."""
        return self._map_tensors(lambda t: t.pin_memory())


def image_index_of(image_mask: torch.Tensor) -> torch.Tensor:
    """[b, s] bool -> [sum P] int64 positions in the flattened [b * s], row-major (host tensors)."""
    return image_mask.flatten().nonzero().squeeze(1)


def build_micro_batch(
    sequences: Sequence[SequenceSample],
    plan: Optional[MicroPlan] = None,
    images: Optional[torch.Tensor] = None,
    input_codes: Optional[torch.Tensor] = None,
    codes: Optional[Dict[str, List[torch.Tensor]]] = None,
    depths: Optional[Dict[str, int]] = None,
    target_shift: int = 0,
    ids: Sequence[str] = (),
    dropped: int = 0,
) -> MicroBatch:
    """Lay ``sequences`` out as ``plan`` says (default: one per row, at their built length), with
    their images' pixels / codes in the same order.

    ``codes``: branch -> per image [P_i, D] (the visual targets, last stage), aligned
    to the image positions with ``target_shift`` (``data.sequence.align_visual_targets``).
    """
    plan = plan or MicroPlan(tuple(range(len(sequences))), sequences[0].tokens.numel())
    laid = layout_tokens(sequences, plan)  # [b, s] each
    image_index = image_index_of(laid["image_mask"])
    batch = MicroBatch(
        tokens=laid["tokens"],
        position_ids=laid["position_ids"],
        labels=laid["labels"],
        loss_mask=laid["loss_mask"],
        image_index=image_index,
        cu_seqlens=laid.get("cu_seqlens"),
        max_seqlen=laid.get("max_seqlen", 0),
        sample_lengths=[s.length for s in sequences],
        images=images,
        input_codes=input_codes,
        ids=list(ids),
        dropped=dropped,
        num_image_positions=image_index.numel(),
    )
    if codes is not None:
        row_mask = torch.zeros(0, dtype=torch.bool)
        for branch, per_image in codes.items():
            batch.visual_targets[branch], row_mask = align_visual_targets(
                per_image, [True] * len(per_image), depths[branch], target_shift)
        if codes and row_mask.numel() != image_index.numel():
            raise ValueError(f"{row_mask.numel()} visual targets for {image_index.numel()} image positions")
        batch.visual_rows = row_mask.nonzero().squeeze(1)  # host tensor: no device sync
    return batch
