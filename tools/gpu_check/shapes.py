"""What the check measures, on GPU (real sizes) and with --cpu (tiny sizes, the same code paths).

(c) the visual head's loss at the real shape: N = 16 images x 729 positions, D = 8 depths,
V = 16,384 codes per depth, E = 2,048, bf16. (d), (d-hf), (e): configs/bench_vicuna7b_1gpu.yaml
(Vicuna-7B widths, SigLIP-SO400M/384, the full visual head, sequence 2048, micro-batch 2 of global 16,
bf16, local layer specs) at 6 and 12 LLM layers, and at the most the device's memory holds by the
memory planner with HEADROOM left; with --cpu configs/bench_tiny.yaml.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

from megatron_asvr.config import BenchRunConfig, load_config
from tools.gpu_check.step_io import REPO

# Of the device's memory left free by the planned peak: the planner predicted 43.5 GiB where an H100
# measured 47.4 GiB (6 layers, docs/gpu_results/2026-11-26_h100_2_*): 9% under. Each throughput step reports
# the plan beside the measured peak; tighten this when they agree.
HEADROOM = 0.15
CPU_LAYERS = {"6": 1, "12": 2}  # --cpu: the same steps at tiny depth
# --cpu: every fast path on as its CPU twin (auto is off on CPU), so "fast paths on" runs something else
CPU_TWINS = ["train.fast_paths.fused_adam=true", "train.fast_paths.foreach_clip=true",
             "train.fast_paths.wgrad_accumulation=true", "train.fast_paths.bias_fusions=true",
             "train.fast_paths.rms_norm=torch", "train.fast_paths.attention=math"]


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
    """The benchmarked recipe: the CPU benchmark's, or Vicuna-7B + SigLIP-SO400M on one GPU."""
    return REPO / ("configs/bench_tiny.yaml" if cpu else "configs/bench_vicuna7b_1gpu.yaml")


def throughput_overrides(cpu: bool, llm_layers: int) -> List[str]:
    """The recipe with ``llm_layers``; with --cpu stage 2 at fp32, one rank, fewer steps, the CPU twins on."""
    common = [f"model.llm.num_layers={llm_layers}", "parallel.tensor_parallel=1", "parallel.pipeline_parallel=1"]
    if cpu:
        return common + ["model.transformer_impl=local", "parallel.distributed_optimizer=true",
                         "train.precision=fp32", "bench.warmup=1", "bench.steps=2", "bench.lengths=full", *CPU_TWINS]
    return common


def throughput_config(cpu: bool, llm_layers: int) -> BenchRunConfig:
    return load_config(BenchRunConfig, recipe(cpu), throughput_overrides(cpu, llm_layers))


def device_memory_gib(cpu: bool) -> float:
    """The GPU's memory (the planner's budget); with --cpu an H100's 80 GB, for the same arithmetic."""
    if cpu:
        return 80.0
    import torch

    return torch.cuda.get_device_properties(0).total_memory / 2**30


def planned_gib(cpu: bool, llm_layers: int) -> float:
    """The memory planner's peak for ``llm_layers`` at throughput_config's batch (the largest stage)."""
    from megatron_asvr.planner import Cluster, plan_memory

    plan = plan_memory(throughput_config(cpu, llm_layers), Cluster(nodes=1, gpus_per_node=1, gpu_memory_gib=1e6))
    return max(s.total_bytes for s in plan.stages) / 2**30


def largest_llm_layers(cpu: bool) -> Tuple[int, float]:
    """(LLM layers, planned GiB): the most layers whose planned peak leaves HEADROOM of the device's memory
    free (at most 2 with --cpu, to stay quick)."""
    budget = device_memory_gib(cpu) * (1 - HEADROOM)
    full = load_config(BenchRunConfig, recipe(cpu)).model.llm.num_layers if cpu else 32  # Vicuna-7B's 32
    for layers in range(min(full, 2) if cpu else full, 0, -1):
        planned = planned_gib(cpu, layers)
        if planned <= budget:
            return layers, planned
    raise RuntimeError(f"not one LLM layer fits {device_memory_gib(cpu):.0f} GiB with {HEADROOM:.0%} headroom")


def llm_layers(cpu: bool, requested: str) -> Tuple[int, float]:
    """(layers, planned GiB) for ``--layers`` 6, 12 or max."""
    if requested == "max":
        return largest_llm_layers(cpu)
    layers = CPU_LAYERS.get(requested, 1) if cpu else int(requested)
    return layers, planned_gib(cpu, layers)
