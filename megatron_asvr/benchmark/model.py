"""The benchmarked model: ``model.vlm`` stages at the settings' precision, FP8 on the LLM's config only."""

from typing import Tuple

import torch

from megatron_asvr.benchmark.fp8 import fp8_llm_changes
from megatron_asvr.benchmark.settings import BenchmarkSettings
from megatron_asvr.model import vlm
from megatron_asvr.model.transformer_defaults import recompute_kwargs
from megatron_asvr.model.vlm import StageConfigs


def precision_settings(settings: BenchmarkSettings) -> Tuple[torch.dtype, dict]:
    """Parameter dtype and the changes to the LLM's TransformerConfig (FP8 only)."""
    if settings.precision == "fp32":
        return torch.float32, {}
    if settings.precision == "fp8":
        return torch.bfloat16, fp8_llm_changes(settings.fp8_recipe, settings.fp8_bf16_edge_layers)
    return torch.bfloat16, {}


def stage_configs(settings: BenchmarkSettings, backend: str, dtype: torch.dtype, llm_changes: dict) -> StageConfigs:
    """The parts' TransformerConfigs: recompute on all of them, ``llm_changes`` on the LLM's alone."""
    return vlm.stage_configs(settings.model(), settings.parallel(), backend, dtype, llm_changes,
                             **recompute_kwargs(settings.recompute))


def stage_builder(settings: BenchmarkSettings, backend: str, dtype: torch.dtype, llm_changes: dict):
    """A ``ChunkBuilder`` (``model.vlm.stage_builder``) with random frozen codebooks."""
    model = settings.model()
    g = torch.Generator().manual_seed(settings.seed)
    codebooks = {branch: [torch.randn(v, getattr(model.asvr, branch).dim, generator=g)
                          for v in getattr(model.asvr, branch).sizes] for branch in model.asvr.branches}
    return vlm.stage_builder(model, settings.parallel(), backend, codebooks, dtype, llm_changes,
                             **recompute_kwargs(settings.recompute))
