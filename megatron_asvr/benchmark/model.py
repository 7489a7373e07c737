"""The benchmarked trainer: the recipe's, built by training's own code (``training.loop.build_trainer``),
with random frozen codebooks, no initial weights, and the bench section's precision (FP8 on the
LLM's TransformerConfig only)."""

import dataclasses
from typing import Dict, List

import torch

from megatron_asvr import runtime
from megatron_asvr.benchmark.fp8 import fp8_llm_changes
from megatron_asvr.config import BenchRunConfig, ModelConfig
from megatron_asvr.model import vlm
from megatron_asvr.model.specs import resolve_backend
from megatron_asvr.model.transformer_defaults import recompute_kwargs
from megatron_asvr.runtime.device import dtype_of
from megatron_asvr.training.loop import build_trainer
from megatron_asvr.training.trainer import Trainer


def precision_of(config: BenchRunConfig) -> str:
    """``bench.precision``, else ``train.precision`` with auto resolved: fp32, bf16 or fp8."""
    precision = config.bench.precision or config.train.precision
    if precision == "auto":
        return "bf16" if dtype_of("auto") == torch.bfloat16 else "fp32"
    return precision


def llm_changes(config: BenchRunConfig) -> dict:
    """The LLM's TransformerConfig changes: FP8's, or none."""
    if precision_of(config) != "fp8":
        return {}
    return fp8_llm_changes(config.bench.fp8_recipe, config.bench.fp8_bf16_edge_layers)


def trained_as(config: BenchRunConfig) -> BenchRunConfig:
    """The config the trainer is built from: parameters in bf16 under FP8, and no initial weights."""
    precision = precision_of(config)
    train = dataclasses.replace(config.train, precision="bf16" if precision == "fp8" else precision, load=None)
    return dataclasses.replace(config, train=train)


def stage_configs(config: BenchRunConfig) -> vlm.StageConfigs:
    """The parts' TransformerConfigs as the benchmark builds them (recompute on all, FP8 on the LLM's)."""
    model, train = config.model, trained_as(config).train
    return vlm.stage_configs(model, config.parallel, resolve_backend(model.transformer_impl),
                             dtype_of(train.precision), llm_changes(config), **recompute_kwargs(train.recompute))


def random_codebooks(model: ModelConfig, seed: int) -> Dict[str, List[torch.Tensor]]:
    """Frozen codebooks of the visual heads' branches, random."""
    g = torch.Generator().manual_seed(seed)
    return {branch: [torch.randn(v, getattr(model.asvr, branch).dim, generator=g)
                     for v in getattr(model.asvr, branch).sizes] for branch in model.asvr.branches}


def benchmark_trainer(config: BenchRunConfig, info: runtime.RankInfo) -> Trainer:
    """The recipe's trainer for ``bench.warmup + bench.steps`` steps (every rank calls it)."""
    steps = config.bench.warmup + config.bench.steps
    return build_trainer(trained_as(config), info, random_codebooks(config.model, config.train.seed), steps,
                         llm_changes(config))
