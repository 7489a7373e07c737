"""Training micro-batches from shards + images + precomputed visual targets, resumable exactly.

Order: a deterministic permutation per epoch from (seed, epoch); global batch k is
positions [k G, (k + 1) G) of that order (the incomplete tail of an epoch is
dropped, as Megatron-LM does), so the order does not depend on the data-parallel
size and a run resumes (even at another DP size) from the consumed-sample count
alone. Data-parallel rank r takes the r-th contiguous block of each global batch
and cuts it into micro-batches. With ``group_by_length`` each window of 8 global
batches is sorted by length before it is cut, and the batches of the window are
shuffled: similar lengths share a batch, still deterministically.

Each pipeline stage gets what it needs: the first stage tokens and pixels (or
codes, with discrete input), the last stage labels, masks and visual targets;
every stage gets the token-level tensors (they are small). An image that cannot
be read at training time is handled by ``unreadable_images`` (``data.unreadable_image``).
"""

import dataclasses
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from megatron_asvr.config import ASVRConfig
from megatron_asvr.data.batch import MicroBatch, build_micro_batch
from megatron_asvr.data.packing import Batching, MicroPlan, PackingReport, packing_report, plan_step
from megatron_asvr.data import unreadable_images
from megatron_asvr.data.images import TILE_SIZE, ImageLoadError, image_token_count, load_image_batch, tile_count
from megatron_asvr.data.sequence import SequenceTooLong, build_sequence
from megatron_asvr.data.targets import ZERO_IMAGE  # the blank image supervised text-only samples get
from megatron_asvr.runtime import child_processes
from megatron_asvr.tokenizers.templates import IMAGE_PLACEHOLDER

GROUP_WINDOW = 8  # global batches per length-sorting window


class DataLoaderError(ValueError):
    """A sample or a file the loader cannot use; the message names it."""


@dataclass
class StageNeeds:
    """What this rank's pipeline stage consumes."""

    pixels: bool = True  # first stage, continuous input
    input_codes: bool = False  # first stage, discrete input
    targets: bool = True  # last stage


class GlobalBatchOrder:
    """Sample indices of global batch k, from (seed, epoch) only."""

    def __init__(self, num_samples: int, global_batch: int, seed: int, lengths: Optional[np.ndarray] = None):
        if num_samples < global_batch:
            raise DataLoaderError(f"{num_samples} samples cannot fill one global batch of {global_batch}")
        self.num_samples, self.global_batch, self.seed = num_samples, global_batch, seed
        self.batches_per_epoch = num_samples // global_batch
        self.lengths = lengths
        self._epoch, self._order = None, None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(self.num_samples)[: self.batches_per_epoch * self.global_batch]
            if self.lengths is not None:
                order = self._grouped(order, rng)
            self._epoch, self._order = epoch, order
        return self._order

    def _grouped(self, order: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        g = self.global_batch
        window = GROUP_WINDOW * g
        batches = []
        for start in range(0, len(order), window):
            chunk = order[start:start + window]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches += [chunk[i:i + g] for i in range(0, len(chunk), g)]
        return np.concatenate([batches[i] for i in rng.permutation(len(batches))])

    def batch(self, k: int) -> np.ndarray:
        epoch, within = divmod(k, self.batches_per_epoch)
        return self._epoch_order(epoch)[within * self.global_batch:(within + 1) * self.global_batch]


class SampleBuilder:
    """One shard sample -> model inputs for this stage (runs in loader workers)."""

    def __init__(self, shards, image_root, targets, asvr: ASVRConfig, seq_length: int, image_mode: str,
                 needs: StageNeeds, patches_per_tile: int, pad_id: int = 0, drop_too_long: bool = False):
        self.shards, self.image_root, self.targets = shards, image_root, targets
        self.patches_per_tile = patches_per_tile
        self.asvr, self.seq_length, self.image_mode = asvr, seq_length, image_mode
        self.needs, self.pad_id, self.drop_too_long = needs, pad_id, drop_too_long
        self.branches = asvr.branches
        if needs.targets and self.branches and targets is None:
            raise DataLoaderError("the visual loss is on but no visual targets directory was given")
        if (needs.targets or needs.input_codes) and asvr.supervise_text_only and ZERO_IMAGE not in targets:
            raise DataLoaderError(
                f"asvr.supervise_text_only needs the codes of the zero image ({ZERO_IMAGE!r}) in {targets.directory}"
            )

    def length(self, index: int) -> int:
        """Real positions sample ``index`` takes (what packing and padding plan with; no image is read)."""
        return self._sequence(index)[1].length

    def _sequence(self, index: int):
        """(shard sample, SequenceSample, image keys, their (width, height), dropped) of sample ``index``."""
        sample = self.shards[int(index)]
        ids, supervised = list(sample.input_ids), list(sample.loss_mask)
        images, sizes = list(sample.images), list(sample.image_sizes)
        if not images and self.asvr.supervise_text_only:
            ids.insert(1, IMAGE_PLACEHOLDER)  # right after BOS, as the released code feeds it
            supervised.insert(1, 0)
            images, sizes = [ZERO_IMAGE], [(384, 384)]
        counts = [image_token_count(w, h, self._mode(key), patches_per_tile=self.patches_per_tile)
                  for key, (w, h) in zip(images, sizes)]
        try:
            sequence = build_sequence(ids, supervised, counts, self.seq_length, self.pad_id)
            dropped = False
        except SequenceTooLong as err:
            if not self.drop_too_long:
                raise DataLoaderError(f"sample {sample.id!r} ({sample.source}): {err}") from err
            # A counted drop: the slot keeps the batch shape but carries no image and no loss.
            sequence = build_sequence(ids[:1], [0], [], self.seq_length, self.pad_id)
            images, sizes, dropped = [], [], True
        return sample, sequence, images, sizes, dropped

    def __call__(self, index: int) -> dict:
        sample, sequence, images, sizes, dropped = self._sequence(index)
        out = {"sequence": sequence, "id": sample.id, "dropped": dropped, "unreadable": None}
        if self.needs.pixels and images:
            out["pixels"], out["unreadable"] = self._pixels(images, sizes)
        if self.needs.input_codes and images:
            patches = self.targets.meta["semantic"].num_patches
            depth = self.asvr.semantic.depth
            out["input_codes"] = torch.cat([self._codes(k, "semantic").view(-1, patches, depth) for k in images])
        if self.needs.targets:
            out["codes"] = {b: [self._codes(key, b) for key in images] for b in self.branches}
        return out

    def _mode(self, key: str) -> str:
        return "resize" if key == ZERO_IMAGE else self.image_mode

    def _pixels(self, images: Sequence[str], sizes) -> Tuple[torch.Tensor, Optional[str]]:
        """The tiles of a sample's images [sum T, 3, 384, 384], and why they could not be read
        (None when they could): then all blank, as many as the images would have made."""
        real = [self.image_root / key for key in images if key != ZERO_IMAGE]
        try:
            batch = load_image_batch(real, self.image_mode) if real else None
        except ImageLoadError as err:
            count = sum(tile_count(w, h, self._mode(key)) for key, (w, h) in zip(images, sizes))
            return torch.zeros(count, 3, TILE_SIZE, TILE_SIZE), str(err)
        tiles, it = [], iter(torch.split(batch.pixels, list(batch.tiles_per_image)) if batch else [])
        for key in images:
            tiles.append(torch.zeros(1, 3, TILE_SIZE, TILE_SIZE) if key == ZERO_IMAGE else next(it))
        return torch.cat(tiles), None

    def _codes(self, key: str, branch: str) -> torch.Tensor:
        try:
            return torch.from_numpy(self.targets.codes(key, branch).astype(np.int64))
        except KeyError as err:
            raise DataLoaderError(f"visual targets: {err.args[0]}") from err


def collate_micro_batch(items: List[dict], plan: MicroPlan, asvr: ASVRConfig, needs: StageNeeds) -> MicroBatch:
    """Items of one micro-batch, in ``plan``'s order -> the ``MicroBatch`` the trainer feeds the model."""
    def cat(key):
        parts = [item[key] for item in items if key in item]  # [tiles, ...] per image
        return torch.cat(parts) if parts else None

    codes = None
    if needs.targets:
        codes = {b: [c for item in items for c in item["codes"][b]] for b in asvr.branches}  # [P_i, D] per image
    return build_micro_batch(
        [item["sequence"] for item in items], plan, images=cat("pixels"), input_codes=cat("input_codes"), codes=codes,
        depths={b: getattr(asvr, b).depth for b in asvr.branches}, target_shift=asvr.target_shift,
        ids=[item["id"] for item in items], dropped=sum(item["dropped"] for item in items),
    )


@dataclass(frozen=True)
class BatchingSettings:
    """How a step's samples become micro-batches (``data.packing``)."""

    batching: Batching = "pad_full"
    micro_batch: int = 1  # samples per micro-batch, or packed rows
    seq_length: int = 2048
    length_multiple: int = 1  # a padded length divides by this (TP under sequence parallelism)
    micro_multiple: int = 1  # micro-batches per step divide by this (PP with interleaving)

    def plan(self, lengths: Sequence[int]) -> List[MicroPlan]:
        return plan_step(lengths, self.batching, self.micro_batch, self.seq_length, self.length_multiple,
                         self.micro_multiple)


class _Steps(torch.utils.data.Dataset):
    """Step k of the run (from ``first_step``) for this data-parallel rank: its planned micro-batches."""

    def __init__(self, order: GlobalBatchOrder, builder: SampleBuilder, dp_rank: int, dp_size: int,
                 first_step: int, asvr: ASVRConfig, needs: StageNeeds, batching: BatchingSettings):
        self.order, self.builder, self.asvr, self.needs, self.batching = order, builder, asvr, needs, batching
        self.per_rank = order.global_batch // dp_size
        self.dp_rank, self.first_step = dp_rank, first_step

    def __len__(self) -> int:
        return 2**62  # endless: the training loop decides when to stop

    def samples(self, k: int) -> np.ndarray:
        batch = self.order.batch(self.first_step + k)
        return batch[self.dp_rank * self.per_rank:(self.dp_rank + 1) * self.per_rank]

    def plans(self, mine: np.ndarray) -> List[MicroPlan]:
        full = self.batching.batching == "pad_full"  # needs no lengths
        return self.batching.plan([self.batching.seq_length] * len(mine) if full else
                                  [self.builder.length(i) for i in mine])

    def __getitem__(self, k: int) -> Tuple[List[MicroBatch], List[List[Optional[str]]]]:
        """The micro-batches, and per micro-batch, per sample why its images could not be read (or None)."""
        mine, micro, unreadable = self.samples(k), [], []
        for plan in self.plans(mine):
            items = [self.builder(mine[i]) for i in plan.samples]
            micro.append(collate_micro_batch(items, plan, self.asvr, self.needs))
            unreadable.append([item["unreadable"] for item in items])
        return micro, unreadable


def _identity(items):
    return items[0]


class TrainLoader:
    """This rank's micro-batches, a step at a time (one worker builds a whole step), resumable.

    ``replica_group``: the other ranks of this rank's model replica (gloo; None when alone), with
    which the step's unreadable samples are agreed; ``unreadable_image``: what they cause
    (``data.unreadable_image``: substitute, counted in ``unreadable_samples``, or stop)."""

    def __init__(self, order: GlobalBatchOrder, builder: SampleBuilder, dp_rank: int, dp_size: int,
                 batching: BatchingSettings, asvr: ASVRConfig, needs: StageNeeds, num_workers: int = 2,
                 consumed_samples: int = 0, replica_group=None, unreadable_image: str = "substitute"):
        g = order.global_batch  # divisible by the data-parallel size (x micro_batch): RunConfig.validate_shapes
        if consumed_samples % g:
            raise DataLoaderError(f"consumed_samples={consumed_samples} is not a multiple of the global batch {g}")
        self.order, self.consumed_samples = order, consumed_samples
        self.steps = _Steps(order, builder, dp_rank, dp_size, consumed_samples // g, asvr, needs, batching)
        self._loader = torch.utils.data.DataLoader(
            self.steps, batch_size=1, collate_fn=_identity, num_workers=num_workers,
            persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None,
            pin_memory=torch.cuda.is_available(),  # MicroBatch.pin_memory, for the non-blocking device copy
            # Its workers' seeds are drawn when iteration starts: from a generator of its own, not the
            # global RNG that checkpoints restore (a resumed run would be one draw apart).
            generator=torch.Generator(),
            worker_init_fn=child_processes.ignore_stop_signals,  # a preemption is the rank's to answer
        )
        self._iter: Optional[Iterator] = None
        self.replica_group, self.unreadable_image = replica_group, unreadable_image
        self.unreadable_samples = 0  # in the last step, this rank's share of it

    def next_step(self) -> List[MicroBatch]:
        """The micro-batches of the next step on this rank."""
        if self._iter is None:
            self._iter = iter(self._loader)
        micro, reasons = next(self._iter)
        lost = unreadable_images.agree(reasons, self.replica_group)
        self.unreadable_samples = sum(map(sum, lost))
        if self.unreadable_samples and self.unreadable_image == "stop":
            sample, reason = next((m.ids[i], reasons[j][i]) for j, m in enumerate(micro)
                                  for i in range(m.num_samples) if lost[j][i])
            raise DataLoaderError(f"sample {sample!r}: {reason or 'its image could not be read on another rank'} "
                                  f"(data.unreadable_image=stop)")
        self.consumed_samples += self.order.global_batch
        return [unreadable_images.without_loss(m, flags) for m, flags in zip(micro, lost)]

    def batching_report(self, steps: int) -> PackingReport:
        """How this rank's next ``steps`` steps fill their micro-batches (planned from lengths alone)."""
        first = self.consumed_samples // self.order.global_batch - self.steps.first_step
        plans, lengths = [], []
        for k in range(first, first + steps):
            mine = self.steps.samples(k)
            step_lengths = [self.steps.builder.length(i) for i in mine]
            plans += [dataclasses.replace(p, samples=tuple(i + len(lengths) for i in p.samples))
                      for p in self.steps.batching.plan(step_lengths)]
            lengths += step_lengths
        return packing_report(plans, lengths)

    def state_dict(self) -> Dict[str, int]:
        return {"consumed_samples": self.consumed_samples, "seed": self.order.seed,
                "global_batch": self.order.global_batch}


def stage_needs(pre_process: bool, post_process: bool, asvr: ASVRConfig) -> StageNeeds:
    return StageNeeds(
        pixels=pre_process and not asvr.discrete_input,
        input_codes=pre_process and asvr.discrete_input,
        targets=post_process,
    )

