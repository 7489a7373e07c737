"""What one benchmark run measures: model preset, layout, batch, precision, ASVR on or off."""

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

from megatron_asvr.config import (
    LLM_PRESETS,
    VISION_PRESETS,
    ASVRConfig,
    CodebookSpec,
    ConfigError,
    HeadConfig,
    LLMConfig,
    ModelConfig,
    ParallelConfig,
    VisionConfig,
    apply_overrides,
    from_dict,
)

PRESETS = ("vicuna_7b", "vicuna_13b", "mistral_7b", "tiny")
PRECISIONS = ("fp32", "bf16", "fp8")
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8")
# Trained parts per ASVR stage (docs/method.md#7-the-two-stage-recipe).
STAGE_TRAINABLE = {1: ["projector", "visual_head"], 2: ["projector", "llm", "visual_head"]}
STAGE_LR = {1: 1e-3, 2: 2e-5}

# CPU-sized VLM: 64 image positions (8 x 8 patches) of 128 positions, as 729 of 2048 at full size.
TINY_MODEL = ModelConfig(
    vision=VisionConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                        patch_size=14, image_size=112),
    llm=LLMConfig(num_layers=4, hidden_size=128, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=352,
                  vocab_size=1000, max_sequence_length=256),
    asvr=ASVRConfig(head=HeadConfig(hidden_size=64, num_layers=2, num_attention_heads=4),
                    semantic=CodebookSpec(sizes=[256] * 4, dim=32)),
)


class BenchmarkError(ValueError):
    """A benchmark that cannot run here or as asked; the message is one actionable line."""


def override_model(model: ModelConfig, overrides: Sequence[str]) -> ModelConfig:
    """``model`` with ``model.<field path>=<YAML value>`` overrides; an unknown key raises a ConfigError naming it."""
    if not overrides:
        return model
    data = apply_overrides({"model": dataclasses.asdict(model)}, overrides)
    outside = sorted(set(data) - {"model"})
    if outside:
        raise BenchmarkError(f"--set {outside[0]}...: only the model's fields can be set (model.<section>.<key>)")
    return from_dict(ModelConfig, data["model"], "model.")


@dataclass(frozen=True)
class BenchmarkSettings:
    preset: str = "tiny"
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    micro_batch: int = 2
    global_batch: int = 4
    seq_length: Optional[int] = None  # default: 2048 (128 for tiny)
    stage: int = 2  # ASVR training stage: what trains
    recompute: str = "none"  # none | selective | full
    precision: str = "fp32"  # fp32 (CPU) | bf16 | fp8 (the LLM's layers through TE; the rest bf16)
    fp8_recipe: str = "delayed"  # delayed | tensorwise | mxfp8
    fp8_bf16_edge_layers: int = 0  # keep this many first and last LLM layers in bf16 (FP8 only)
    asvr: bool = True  # the visual head and its loss; False = a plain LLaVA step
    transformer_impl: str = "auto"  # auto | transformer_engine | local
    warmup: int = 2
    steps: int = 5
    seed: int = 1234
    gpu_peak_tflops: Optional[float] = None  # dense bf16 peak per GPU for MFU (H100 SXM: 989)
    model_overrides: Tuple[str, ...] = ()  # "model.llm.num_layers=8" etc., applied after everything else

    @property
    def positions(self) -> int:
        return self.seq_length or (128 if self.preset == "tiny" else 2048)

    def parallel(self) -> ParallelConfig:
        return ParallelConfig(
            tensor_parallel=self.tensor_parallel, pipeline_parallel=self.pipeline_parallel,
            sequence_parallel=self.sequence_parallel, distributed_optimizer=self.distributed_optimizer,
        )

    def model(self) -> ModelConfig:
        """The preset's VLM (SigLIP-SO400M/384 and the reference head at full size), this stage trainable,
        then ``model_overrides``."""
        if self.preset == "tiny":
            model = TINY_MODEL
        else:
            llm = LLM_PRESETS[self.preset]
            length = max(llm.max_sequence_length, self.positions)
            model = ModelConfig(vision=VISION_PRESETS["siglip_so400m_384"],
                                llm=dataclasses.replace(llm, max_sequence_length=length))
        model = dataclasses.replace(
            model, asvr=dataclasses.replace(model.asvr, visual_loss=self.asvr),
            trainable=list(STAGE_TRAINABLE[self.stage]), transformer_impl=self.transformer_impl,
        )
        return override_model(model, self.model_overrides)

    def validate(self, world_size: int) -> None:
        """Every check that needs no model; raises BenchmarkError or ConfigError (one line each)."""
        for name, value, allowed in (("preset", self.preset, PRESETS), ("precision", self.precision, PRECISIONS),
                                     ("fp8_recipe", self.fp8_recipe, FP8_RECIPES), ("stage", self.stage, (1, 2)),
                                     ("recompute", self.recompute, ("none", "selective", "full"))):
            if value not in allowed:
                raise BenchmarkError(f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}")
        if self.warmup < 0 or self.steps < 1:
            raise BenchmarkError(f"need warmup >= 0 and steps >= 1, got {self.warmup} and {self.steps}")
        parallel = self.parallel()
        parallel.validate(world_size)
        model = self.model()
        model.validate(parallel)
        dp = parallel.data_parallel(world_size)
        if self.global_batch % (dp * self.micro_batch):
            raise ConfigError(
                f"global batch {self.global_batch} is not divisible by data-parallel size x micro-batch = "
                f"{dp} x {self.micro_batch}: change --global-batch or --micro-batch"
            )
        if self.positions < model.vision.num_patches + 8:
            raise ConfigError(
                f"sequence length {self.positions} cannot hold one image ({model.vision.num_patches} positions) "
                f"plus a prompt: raise --seq-length"
            )
        if self.sequence_parallel and self.positions % self.tensor_parallel:
            raise ConfigError(f"sequence length {self.positions} must be divisible by TP={self.tensor_parallel} "
                              f"with sequence parallelism")
        if self.fp8_bf16_edge_layers and self.precision != "fp8":
            raise BenchmarkError("--fp8-bf16-edge-layers applies to --precision fp8 only")
        if self.fp8_bf16_edge_layers and self.fp8_recipe == "delayed":
            raise BenchmarkError("megatron keeps the first/last layers in bf16 only with the tensorwise or mxfp8 "
                                 "recipe, not delayed: use --fp8-recipe tensorwise")
