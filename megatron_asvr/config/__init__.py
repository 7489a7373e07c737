"""The configuration: the run's schema (``schema``), the tools' sections (``tools``), reading them
(``loading``), one-line errors (``errors``)."""

from megatron_asvr.config.errors import ConfigError
from megatron_asvr.config.loading import (
    apply_overrides,
    from_dict,
    load_config,
    load_run_config,
    load_yaml,
    to_dict,
    with_overrides,
)
from megatron_asvr.config.schema import (
    LLM_PRESETS,
    VISION_PRESETS,
    ASVRConfig,
    BenchConfig,
    BenchRunConfig,
    CodebookSpec,
    DataConfig,
    HeadConfig,
    ImageMode,
    LLMConfig,
    ModelConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
    TransformerImpl,
    VisionConfig,
)

__all__ = [
    "ConfigError",
    "apply_overrides",
    "from_dict",
    "load_config",
    "load_run_config",
    "load_yaml",
    "to_dict",
    "with_overrides",
    "LLM_PRESETS",
    "VISION_PRESETS",
    "ASVRConfig",
    "BenchConfig",
    "BenchRunConfig",
    "CodebookSpec",
    "DataConfig",
    "HeadConfig",
    "ImageMode",
    "LLMConfig",
    "ModelConfig",
    "ParallelConfig",
    "RunConfig",
    "TrainConfig",
    "TransformerImpl",
    "VisionConfig",
]
