"""The timed loop: build the model at the requested layout, warm up, time training steps.

Every rank runs ``run_variants`` (under torchrun, or ``testing.multirank``).
Each variant (e.g. baseline / ASVR, or bf16 / FP8) builds its model from the
same seed, runs ``warmup + steps`` optimizer steps on the same synthetic
batches through megatron's pipeline schedule, and is freed before the next.
A step is the trainer's own ``train_step`` (tools/train.py runs the same),
timed with the device synchronized before and after; a step's time is the slowest rank's, and a run's
the median over its timed steps. The visual head's share is its forward +
backward time (module hooks, on the last pipeline stage) over the step time.
"""

import dataclasses
import gc
import os
import statistics
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron_asvr import runtime
from megatron_asvr.benchmark.fp8 import check_fp8_runnable
from megatron_asvr.benchmark.model import precision_settings, stage_builder
from megatron_asvr.benchmark.settings import MODES, STAGE_LR, BenchmarkError, BenchmarkSettings
from megatron_asvr.benchmark.synthetic import synthetic_micro_batches
from megatron_asvr.benchmark.timing import DeviceClock, ModuleTimer
from megatron_asvr.model.head import VisualHead
from megatron_asvr.model.specs import resolve_backend
from megatron_asvr.runtime.device import peak_memory_bytes
from megatron_asvr.data.packing import length_multiple_for
from megatron_asvr.model.flops import micro_batch_shape, step_flops
from megatron_asvr.training.task import ASVRTask
from megatron_asvr.training.trainer import OptimizerSettings, Trainer

LAYOUT_FIELDS = ("tensor_parallel", "pipeline_parallel", "sequence_parallel", "micro_batch", "global_batch",
                 "seq_length")


@dataclass
class RunResult:
    """One variant's measurements (losses on the last pipeline stage only)."""

    name: str
    settings: dict
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
    derived: Dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        step = statistics.median(self.step_times)  # robust to a stray slow step on a shared machine
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


def run_one(name: str, settings: BenchmarkSettings, info: runtime.RankInfo) -> RunResult:
    """Build, warm up and time one variant on this rank (the runtime is initialised)."""
    model_cfg = settings.model()
    backend = resolve_backend(model_cfg.transformer_impl)
    dtype, llm_changes = precision_settings(settings)
    clock = DeviceClock()
    runtime.set_seed(settings.seed)
    if clock.cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(stage_builder(settings, backend, dtype, llm_changes), ASVRTask(model_cfg.asvr),
                      settings.parallel(), OptimizerSettings(lr=STAGE_LR[settings.stage]), info)
    checksum = _sum_over_ranks(sum(p.double().sum().item() for c in trainer.chunks for p in c.parameters()))
    parallel = settings.parallel()
    micro = synthetic_micro_batches(
        model_cfg, settings.micro_batch, settings.global_batch // info.dp_size, settings.positions,
        seed=settings.seed + info.dp_rank, batching=settings.batching, lengths=settings.lengths,
        length_multiple=length_multiple_for(parallel.tensor_parallel, parallel.sequence_parallel),
    )
    timer = ModuleTimer([m for c in trainer.chunks for m in c.modules() if isinstance(m, VisualHead)], clock)

    step_times, head_times, losses = [], [], []
    for step in range(settings.warmup + settings.steps):
        timer.reset()
        clock.synchronize()
        start = clock.mark()
        result = trainer.train_step(micro)
        end = clock.mark()
        clock.synchronize()
        losses.append(result.losses)
        if step >= settings.warmup:
            step_times.append(clock.seconds(start, end))
            head_times.append(timer.seconds())
    timer.remove()
    peak = _max_over_ranks([float(peak_memory_bytes())])[0]
    replicas = info.world_size // info.dp_size  # every TP x PP rank of a replica holds its samples
    parts = step_flops(model_cfg, micro_batch_shape(model_cfg, micro))
    summed = _sum_over_ranks_each([*parts.values(), sum(sum(m.sample_lengths) for m in micro),
                                   sum(m.computed_positions for m in micro)])
    result = RunResult(
        name=name, settings=dataclasses.asdict(dataclasses.replace(settings, seq_length=settings.positions)),
        world_size=info.world_size, data_parallel=info.dp_size,
        step_times=_max_over_ranks(step_times), head_times=_max_over_ranks(head_times), losses=losses,
        flops={k: v / replicas for k, v in zip(parts, summed)}, tokens_per_step=int(summed[-2]) // replicas,
        computed_per_step=int(summed[-1]) // replicas, samples_per_step=settings.global_batch,
        peak_memory_bytes=int(peak), initial_weights_checksum=checksum, gpu_peak_tflops=settings.gpu_peak_tflops,
    )
    del trainer, micro
    gc.collect()
    if clock.cuda:
        torch.cuda.empty_cache()
    return result


def run_variants(settings: BenchmarkSettings, variants: Sequence[Tuple[str, dict]]) -> List[RunResult]:
    """Run each (name, settings changes) on this rank; every rank calls this. Variants may not change the layout."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    runs = []
    for name, changes in variants:
        if set(changes) & set(LAYOUT_FIELDS):
            raise BenchmarkError(f"variant {name!r} changes the layout ({sorted(set(changes) & set(LAYOUT_FIELDS))})")
        variant = dataclasses.replace(settings, **changes)
        variant.validate(world_size)
        if variant.precision == "fp8":
            check_fp8_runnable(variant, resolve_backend(variant.model().transformer_impl))
        runs.append((name, variant))
    info = runtime.initialize(settings.parallel(), seed=settings.seed)
    try:
        return [run_one(name, variant, info) for name, variant in runs]
    finally:
        runtime.destroy()


def packing_variants() -> List[Tuple[str, dict]]:
    """The same samples padded to the full length, padded to each micro-batch's longest, and packed."""
    return [(mode, {"batching": mode}) for mode in ("pad_full", "pad_longest", "pack")]


def asvr_variants() -> List[Tuple[str, dict]]:
    """A plain LLaVA step, then the same step with the visual head and its loss."""
    return [("baseline", {"asvr": False}), ("asvr", {"asvr": True})]


def precision_variants(first: str = "bf16", second: str = "fp8") -> List[Tuple[str, dict]]:
    """The A/B pair: the same config at two precisions."""
    return [(first, {"precision": first}), (second, {"precision": second})]


def benchmark_variants(settings: BenchmarkSettings, mode: str, ab: Tuple[str, str] = ("bf16", "fp8")):
    """The variants a mode runs: ``single`` (as set), ``compare-asvr`` (baseline, asvr), ``compare-packing``
    (full padding, padding to the longest, packing), ``ab`` (two precisions)."""
    if mode == "single":
        return [("asvr" if settings.asvr else "baseline", {})]
    if mode == "compare-asvr":
        return asvr_variants()
    if mode == "compare-packing":
        return packing_variants()
    if mode == "ab":
        return precision_variants(*ab)
    raise BenchmarkError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
