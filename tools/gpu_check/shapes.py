"""What the check measures, on GPU (real sizes) and with --cpu (tiny sizes, the same code paths).

(c) the visual head's loss at the real shape: N = 16 images x 729 positions, D = 8 depths,
V = 16,384 codes per depth, E = 2,048, bf16. (d) and (e): Vicuna-7B widths with as many LLM layers
as the memory planner fits on one 80 GB GPU with the distributed optimizer and 45% headroom (see
HEADROOM), SigLIP-SO400M/384 (26 layers used, 729 patches), the full visual head, sequence 2048, bf16,
local layer specs (SDPA attention).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

from megatron_asvr.config import BenchRunConfig, load_config
from tools.gpu_check.step_io import REPO

GPU_MEMORY_GIB = 80.0  # one 80 GB H100
HEADROOM = 0.45  # of the GPU's memory left free by the planned total: 6 layers (planned 43.5 GiB, measured
# 47.4 GiB on an H100); the first run's 12 layers ran out of memory in a since-fixed allocation
# (docs/gpu_results/NOTES_2026-11-26.md): lower this once a run shows more layers fit


@dataclass(frozen=True)
class HeadShape:
    rows: int  # N
    depths: int  # D
    vocab: int  # V per depth
    embed: int  # E
    dtype: str


def head_shape(cpu: bool) -> HeadShape:
    return HeadShape(96, 3, 300, 32, "float32") if cpu else HeadShape(16 * 729, 8, 16384, 2048, "bfloat16")


def recipe(cpu: bool) -> Path:
    """The benchmarked recipe: the CPU benchmark's, or Vicuna-7B + SigLIP-SO400M stage 2."""
    return REPO / ("configs/bench_tiny.yaml" if cpu else "configs/vicuna7b_stage2.yaml")


def throughput_overrides(cpu: bool, llm_layers: int) -> List[str]:
    """The recipe's overrides: stage 2 (projector, LLM and head train), one GPU, the distributed optimizer
    without overlap, micro-batch 2 of global 4, full-length samples padded to the sequence."""
    common = [f"model.llm.num_layers={llm_layers}", "model.transformer_impl=local", "parallel.tensor_parallel=1",
              "parallel.pipeline_parallel=1", "parallel.distributed_optimizer=true",
              "parallel.overlap_grad_reduce=false", "parallel.overlap_param_gather=false", "train.micro_batch=2",
              "train.global_batch=4", "data.batching=pad_full", "bench.lengths=full"]
    if cpu:
        return common + ["train.precision=fp32", "bench.warmup=1", "bench.steps=2"]
    return common + ["data.seq_length=2048", "train.precision=bf16", "train.gpu_peak_tflops=989.0",
                     "bench.warmup=2", "bench.steps=5"]


def throughput_config(cpu: bool, llm_layers: int) -> BenchRunConfig:
    return load_config(BenchRunConfig, recipe(cpu), throughput_overrides(cpu, llm_layers))


def largest_llm_layers(cpu: bool) -> Tuple[int, float]:
    """(LLM layers, planned GiB): the most layers the memory planner fits in GPU_MEMORY_GIB with HEADROOM
    left, at throughput_config's batch (at most 2 layers with --cpu, to stay quick)."""
    from megatron_asvr.planner import Cluster, plan_memory

    cluster = Cluster(nodes=1, gpus_per_node=1, gpu_memory_gib=GPU_MEMORY_GIB,
                      reserve_gib=HEADROOM * GPU_MEMORY_GIB)
    full = load_config(BenchRunConfig, recipe(cpu)).model.llm.num_layers
    for layers in range(2 if cpu else full, 0, -1):
        plan = plan_memory(throughput_config(cpu, layers), cluster)
        if plan.fits:
            return layers, max(s.total_bytes for s in plan.stages) / 2**30
    raise RuntimeError(f"not one LLM layer fits {GPU_MEMORY_GIB:g} GiB with {HEADROOM:.0%} headroom")
