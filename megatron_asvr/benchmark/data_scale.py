"""The data path of a recipe without a model: its loader over shards, what each step plans, and an
exact-resume check (tools/bench_scale.py measures them at 0.1M-2M records; tests check them small).

    recipe_loader(config, shards, consumed)  -> TrainLoader   the recipe's order, builder and batching,
                                                              one data-parallel rank, no image and
                                                              no visual target read
    planned_steps(loader, first, count)      -> [Step]        the micro-batches the loader plans,
                                                              from the order and lengths alone
    walk_plans(loader, first, count)                          the same, planned and dropped
    built_steps(loader, count)               -> [Step]        the micro-batches next_step() builds
    resume_check(config, shards, step, n)    -> ResumeCheck   a loader resumed at ``step`` against
                                                              the order and plans of a run from 0

A step is a tuple of micro-batches, each (sample ids in layout order, computed length, the
samples' lengths): what fixes the model's input, so two equal steps train alike.
"""

import time
from dataclasses import dataclass
from typing import List, Tuple

from megatron_asvr.config import RunConfig
from megatron_asvr.data.loader import StageNeeds, TrainLoader
from megatron_asvr.data.shards import ShardDataset
from megatron_asvr.training import loop

Micro = Tuple[Tuple[str, ...], int, Tuple[int, ...]]  # ids, computed length, sample lengths
Step = Tuple[Micro, ...]
NOTHING = StageNeeds(pixels=False, input_codes=False, targets=False)  # tokens and plans only


def recipe_loader(config: RunConfig, shards: ShardDataset, consumed_samples: int = 0,
                  num_workers: int = 0) -> TrainLoader:
    """The loader ``config`` trains with, as data-parallel rank 0 of 1 (the whole global batch)."""
    return loop.recipe_loader(config, shards, NOTHING, None, 0, 1, num_workers, consumed_samples)


def _plans(loader: TrainLoader, step: int):
    """(samples, their lengths, micro-batch plans) of the run's step ``step``, as the loader's worker plans it."""
    steps = loader.steps
    mine = steps.samples(step - steps.first_step)
    return mine, steps.builder.lengths(mine), steps.plans(mine)


def walk_plans(loader: TrainLoader, first: int, count: int) -> None:
    """Plans steps ``first`` .. ``first + count - 1`` (the order and lengths of each), as a run does."""
    steps = loader.steps
    for step in range(first, first + count):
        steps.plans(steps.samples(step - steps.first_step))


def planned_steps(loader: TrainLoader, first: int, count: int) -> List[Step]:
    """Steps ``first`` .. ``first + count - 1`` of the run (from step 0) as the loader plans them."""
    shards, out = loader.steps.builder.shards, []
    for step in range(first, first + count):
        mine, lengths, plans = _plans(loader, step)
        out.append(tuple((tuple(shards[int(mine[i])].id for i in plan.samples), plan.length,
                          tuple(int(lengths[i]) for i in plan.samples)) for plan in plans))
    return out


def built_steps(loader: TrainLoader, count: int) -> List[Step]:
    """The loader's next ``count`` steps, built (``next_step``)."""
    return [tuple((tuple(m.ids), m.tokens.shape[1], tuple(m.sample_lengths)) for m in loader.next_step())
            for _ in range(count)]


@dataclass(frozen=True)
class ResumeCheck:
    step: int  # the first step after the resume
    steps_per_epoch: int
    uninterrupted: List[Step]  # from a run from step 0, walked step by step to ``step`` and beyond
    resumed: List[Step]  # built by a loader resumed from the checkpoint's data state
    walk_seconds: float  # planning every step of the run from 0 up to the compared ones
    resume_seconds: float  # the resumed loader: built, and its first step returned

    @property
    def samples(self) -> int:
        return sum(len(ids) for step in self.resumed for ids, _, _ in step)

    @property
    def exact(self) -> bool:
        return self.resumed == self.uninterrupted


def resume_check(config: RunConfig, shards: ShardDataset, step: int, samples: int = 100) -> ResumeCheck:
    """A run resumed at ``step`` (its loader rebuilt from the consumed-sample count a checkpoint holds)
    against a run from step 0 whose loader has planned every step before it: the next ``samples``
    samples (whole steps) must have the same ids in the same micro-batches, planned alike."""
    g = config.train.global_batch
    count = -(-samples // g)
    start = time.perf_counter()
    straight = recipe_loader(config, shards)
    walk_plans(straight, 0, step)  # the uninterrupted run's steps before the resume
    uninterrupted = planned_steps(straight, step, count)
    walk_seconds = time.perf_counter() - start
    start = time.perf_counter()
    resumed_loader = recipe_loader(config, shards, consumed_samples=step * g)  # a checkpoint's data state
    resumed = built_steps(resumed_loader, 1)
    resume_seconds = time.perf_counter() - start
    resumed += built_steps(resumed_loader, count - 1)
    return ResumeCheck(step, straight.order.batches_per_epoch, uninterrupted, resumed, walk_seconds, resume_seconds)
