"""The timed loop: build the recipe's trainer, warm up, time training steps.

Every rank runs ``run_variants`` (under torchrun, or ``tests.support.multirank``).
Each variant (e.g. baseline / ASVR, or bf16 / FP8: the recipe with a few overrides)
builds its model from the same seed, runs ``warmup + steps`` optimizer steps on
the same synthetic batches through megatron's pipeline schedule, and is freed before the next.
A step is the trainer's own ``train_step`` (tools/train.py runs the same),
timed with the device synchronized before and after; a step's time is the slowest rank's, and a run's
the median over its timed steps. The visual head's share is its forward +
backward time (module hooks, on the last pipeline stage) over the step time. Each step is cut in two
phases by device marks around the optimizer's step (no change to the trainer): forward + backward (the
schedule, the gradient reduction and the step's counts) and the optimizer (clipping, AdamW, the copy to
the bf16 parameters). With ``bench.profile`` one more step runs under torch's profiler, its device time
summed by kernel class (``benchmark.profile``).
"""

import dataclasses
import functools
import gc
import os
import statistics
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron_asvr import runtime
from megatron_asvr.benchmark.fp8 import check_fp8_runnable
from megatron_asvr.benchmark.model import benchmark_trainer, precision_of
from megatron_asvr.benchmark.profile import profile_step
from megatron_asvr.benchmark.synthetic import synthetic_micro_batches
from megatron_asvr.benchmark.timing import DeviceClock, ModuleTimer, PhaseMarks
from megatron_asvr.config import BenchRunConfig, with_overrides
from megatron_asvr.data.packing import length_multiple_for
from megatron_asvr.model.flops import micro_batch_shape, step_flops
from megatron_asvr.model.head import VisualHead
from megatron_asvr.model.specs import resolve_backend
from megatron_asvr.runtime.device import peak_memory_bytes
from megatron_asvr.runtime.fast_paths import FastPaths


# Every fast path off (runtime/fast_paths.py): the step as megatron-core runs it without TE or apex.
FAST_PATHS_OFF = tuple(f"train.fast_paths.{name}={value}" for name, value in (
    ("fused_adam", "false"), ("foreach_clip", "false"), ("wgrad_accumulation", "false"), ("bias_fusions", "false"),
    ("rms_norm", "reference"), ("attention", "default"), ("batched_head_mlp", "false")))


@dataclass
class RunResult:
    """One variant's measurements (losses on the last pipeline stage only)."""

    name: str
    settings: dict  # what the table shows of the variant (``table_settings``)
    world_size: int
    data_parallel: int
    step_times: List[float]  # s, timed steps, slowest rank
    head_times: List[float]  # s, visual head forward + backward per timed step (last stage)
    losses: List[Dict[str, float]]  # every step, warm-up included
    flops: Dict[str, float]  # per step, by part, of the real work (padding excluded)
    tokens_per_step: int  # real (non-padding) positions
    computed_per_step: int  # positions computed, padding included
    samples_per_step: int
    peak_memory_bytes: int  # max over ranks: torch's peak allocation on GPU, peak RSS on CPU
    initial_weights_checksum: float  # sum of all initial parameters over all ranks
    gpu_peak_tflops: Optional[float] = None
    optimizer_times: List[float] = field(default_factory=list)  # s, the optimizer's step per timed step
    profile: Optional[dict] = None  # one profiled step by kernel class (bench.profile)
    derived: Dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        step = statistics.median(self.step_times)  # robust to a stray slow step on a shared machine
        optimizer = statistics.median(self.optimizer_times) if self.optimizer_times else 0.0
        tflops = self.flops["total"] / step / self.world_size / 1e12
        self.derived = {
            "step_time_s": step,
            "min_step_time_s": min(self.step_times),  # the least disturbed step, on a shared machine
            "tokens_per_s_per_gpu": self.tokens_per_step / step / self.world_size,  # real tokens
            "padding_share": 1 - self.tokens_per_step / self.computed_per_step,
            "samples_per_s": self.samples_per_step / step,
            "tflops_per_gpu": tflops,
            "mfu": tflops / self.gpu_peak_tflops if self.gpu_peak_tflops else None,
            "visual_head_share": statistics.median([h / t for h, t in zip(self.head_times, self.step_times)]),
            "optimizer_s": optimizer,
            "forward_backward_s": step - optimizer,
            "optimizer_share": optimizer / step,
        }


def _max_over_ranks(values: Sequence[float]) -> List[float]:
    tensor = torch.tensor(list(values), dtype=torch.float64, device=runtime.current_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()  # host sync, outside the timed steps


def _sum_over_ranks_each(values: Sequence[float]) -> List[float]:
    tensor = torch.tensor(list(values), dtype=torch.float64, device=runtime.current_device())
    dist.all_reduce(tensor)
    return tensor.tolist()  # host sync, outside the timed steps


def _sum_over_ranks(value: float) -> float:
    return _sum_over_ranks_each([value])[0]


def table_settings(config: BenchRunConfig) -> dict:
    """The variant's settings the table and the JSON show."""
    p, t, d = config.parallel, config.train, config.data
    return {"precision": precision_of(config), "fp8_recipe": config.bench.fp8_recipe, "batching": d.batching,
            "tensor_parallel": p.tensor_parallel, "pipeline_parallel": p.pipeline_parallel,
            "sequence_parallel": p.sequence_parallel, "micro_batch": t.micro_batch, "global_batch": t.global_batch,
            "seq_length": d.seq_length, "lengths": config.bench.lengths, "visual_loss": config.model.asvr.visual_loss,
            "transformer_impl": config.model.transformer_impl, "recompute": t.recompute,
            "master_weights": t.master_weights,
            "fast_paths": dataclasses.asdict(FastPaths.resolve(t.fast_paths, torch.cuda.is_available()))}


def run_one(name: str, config: BenchRunConfig, info: runtime.RankInfo) -> RunResult:
    """Build, warm up and time one variant on this rank (the runtime is initialised)."""
    model, bench = config.model, config.bench
    clock = DeviceClock()
    runtime.set_seed(config.train.seed)
    if clock.cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = benchmark_trainer(config, info)
    checksum = _sum_over_ranks(sum(p.double().sum().item() for c in trainer.chunks for p in c.parameters()))
    parallel = config.parallel
    micro = synthetic_micro_batches(
        model, config.train.micro_batch, config.train.global_batch // info.dp_size, config.data.seq_length,
        seed=config.train.seed + info.dp_rank, batching=config.data.batching, lengths=bench.lengths,
        length_multiple=length_multiple_for(parallel.tensor_parallel, parallel.sequence_parallel),
    )
    timer = ModuleTimer([m for c in trainer.chunks for m in c.modules() if isinstance(m, VisualHead)], clock)
    phases = PhaseMarks(trainer.optimizer, clock)

    step_times, head_times, optimizer_times, losses = [], [], [], []
    for step in range(bench.warmup + bench.steps):
        timer.reset()
        clock.synchronize()
        start = clock.mark()
        result = trainer.train_step(micro)
        end = clock.mark()
        clock.synchronize()
        losses.append(result.losses)
        if step >= bench.warmup:
            step_times.append(clock.seconds(start, end))
            head_times.append(timer.seconds())
            optimizer_times.append(phases.seconds())
    timer.remove()
    phases.remove()
    profile = profile_step(functools.partial(trainer.train_step, micro), clock) if bench.profile else None
    peak = _max_over_ranks([float(peak_memory_bytes())])[0]
    replicas = info.world_size // info.dp_size  # every TP x PP rank of a replica holds its samples
    parts = step_flops(model, micro_batch_shape(model, micro))
    summed = _sum_over_ranks_each([*parts.values(), sum(sum(m.sample_lengths) for m in micro),
                                   sum(m.computed_positions for m in micro)])
    result = RunResult(
        name=name, settings=table_settings(config), world_size=info.world_size, data_parallel=info.dp_size,
        step_times=_max_over_ranks(step_times), head_times=_max_over_ranks(head_times), losses=losses,
        optimizer_times=_max_over_ranks(optimizer_times), profile=profile,
        flops={k: v / replicas for k, v in zip(parts, summed)}, tokens_per_step=int(summed[-2]) // replicas,
        computed_per_step=int(summed[-1]) // replicas, samples_per_step=config.train.global_batch,
        peak_memory_bytes=int(peak), initial_weights_checksum=checksum,
        gpu_peak_tflops=config.train.gpu_peak_tflops if clock.cuda else None,
    )
    del trainer, micro
    gc.collect()
    if clock.cuda:
        torch.cuda.empty_cache()
    return result


def run_variants(config: BenchRunConfig, variants: Sequence[Tuple[str, Tuple[str, ...]]]) -> List[RunResult]:
    """Run each (name, recipe overrides) on this rank; every rank calls this. The overrides change what
    is timed (the visual loss, the batching, the precision), never the layout."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    runs = []
    for name, overrides in variants:
        variant = with_overrides(config, overrides)
        variant.validate(world_size)
        if precision_of(variant) == "fp8":
            check_fp8_runnable(variant, resolve_backend(variant.model.transformer_impl))
        runs.append((name, variant))
    info = runtime.initialize(config.parallel, seed=config.train.seed)
    try:
        return [run_one(name, variant, info) for name, variant in runs]
    finally:
        runtime.destroy()


def benchmark_variants(config: BenchRunConfig) -> List[Tuple[str, Tuple[str, ...]]]:
    """The variants ``bench.mode`` runs: ``single`` (the recipe as it is), ``compare-asvr`` (baseline,
    asvr), ``compare-packing`` (full padding, padding to the longest, packing), ``ab`` (two precisions),
    ``compare-fast-paths`` (baseline and asvr with every fast path off, then as the recipe sets them)."""
    mode = config.bench.mode
    if mode == "single":
        return [("asvr" if config.model.asvr.visual_loss else "baseline", ())]
    if mode == "compare-asvr":  # a plain LLaVA step, then the same step with the visual head and its loss
        return [("baseline", ("model.asvr.visual_loss=false",)), ("asvr", ("model.asvr.visual_loss=true",))]
    if mode == "compare-fast-paths":
        asvr = (("baseline", ("model.asvr.visual_loss=false",)), ("asvr", ("model.asvr.visual_loss=true",)))
        return [(f"{name}-unfused", (*changes, *FAST_PATHS_OFF)) for name, changes in asvr] + list(asvr)
    if mode == "compare-packing":
        return [(batching, (f"data.batching={batching}",)) for batching in ("pad_full", "pad_longest", "pack")]
    return [(precision, (f"bench.precision={precision}",)) for precision in config.bench.ab]  # ab
