"""What one benchmark run measures: model preset, layout, batch, precision, ASVR on or off.

``BenchmarkSettings`` is a section of the configuration schema (``megatron_asvr.config``): typed
fields with their choices, checked on construction, and the run's batch and sequence-length
rules (``check_step_shape``) written once for both.
"""

import dataclasses
from typing import Literal, Optional, Sequence, Tuple, get_args

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
from megatron_asvr.benchmark.synthetic import PROMPT_TOKENS
from megatron_asvr.config.errors import section
from megatron_asvr.config.schema import Count, Positive, Recompute, TransformerImpl, check_step_shape

Preset = Literal["vicuna_7b", "vicuna_13b", "mistral_7b", "tiny"]
BenchPrecision = Literal["fp32", "bf16", "fp8"]  # fp8: the LLM's layers through TE; the rest bf16
FP8Recipe = Literal["delayed", "tensorwise", "mxfp8"]
PRESETS, PRECISIONS, FP8_RECIPES = get_args(Preset), get_args(BenchPrecision), get_args(FP8Recipe)
BENCH_KEYS = {"global_batch": "--global-batch", "micro_batch": "--micro-batch", "seq_length": "--seq-length"}
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


@section
class BenchmarkSettings:
    preset: Preset = "tiny"
    tensor_parallel: Positive = 1
    pipeline_parallel: Positive = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    micro_batch: Positive = 2
    global_batch: Positive = 4
    seq_length: Optional[Positive] = None  # default: 2048 (128 for tiny)
    stage: Literal[1, 2] = 2  # ASVR training stage: what trains
    recompute: Recompute = "none"
    precision: BenchPrecision = "fp32"
    fp8_recipe: FP8Recipe = "delayed"
    fp8_bf16_edge_layers: Count = 0  # keep this many first and last LLM layers in bf16 (FP8 only)
    asvr: bool = True  # the visual head and its loss; False = a plain LLaVA step
    transformer_impl: TransformerImpl = "auto"
    warmup: Count = 2
    steps: Positive = 5
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
        """The checks that span fields (choices and ranges are the field types'); raises BenchmarkError
        or ConfigError (one line each)."""
        parallel = self.parallel()
        parallel.validate(world_size)
        model = self.model()
        model.validate(parallel)
        check_step_shape(parallel, world_size, model, self.global_batch, self.micro_batch, self.positions, BENCH_KEYS)
        if self.positions < model.vision.num_patches + PROMPT_TOKENS + 2:
            raise ConfigError(f"--seq-length={self.positions} cannot hold a synthetic sample: one image "
                              f"({model.vision.num_patches} positions), a {PROMPT_TOKENS}-token prompt and an answer")
        if self.fp8_bf16_edge_layers and self.precision != "fp8":
            raise BenchmarkError("--fp8-bf16-edge-layers applies to --precision fp8 only")
        if self.fp8_bf16_edge_layers and self.fp8_recipe == "delayed":
            raise BenchmarkError("megatron keeps the first/last layers in bf16 only with the tensorwise or mxfp8 "
                                 "recipe, not delayed: use --fp8-recipe tensorwise")
