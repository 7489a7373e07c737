"""The tools' sections of the schema: what each command-line tool's run needs, typed and checked on
construction like the run's own sections (``schema.py``), one-line ``ConfigError`` included.

    tools/preprocess.py           PreprocessConfig (with its ValidationConfig)
    tools/precompute_targets.py   TargetsConfig
    tools/fit_visual_tokenizer.py FitConfig
    tools/convert.py              ImportSources, ExportOptions
    tools/evaluate.py             EvalConfig (EvalModelConfig, EvalBenchmarkConfig)
    tools/attention_map.py        AttentionConfig
    tools/experiment_asvr_vs_llava.py  evaluation.experiment.ExperimentConfig (it reads the demo's layout)
    tools/benchmark.py            a run's recipe with a ``bench`` section (schema.BenchRunConfig)

Choices and ranges are in the field types; ``validate`` methods hold the rules that span fields.
Files are checked where they are opened, by the code that reads them.
"""

import dataclasses
from pathlib import Path
from typing import List, Literal, Optional, Tuple

from megatron_asvr.config.errors import ConfigError, section
from megatron_asvr.config.schema import (
    Count,
    Fraction,
    ImageMode,
    ParallelConfig,
    Positive,
    TransformerImpl,
)

Branch = Literal["semantic", "appearance"]  # the visual tokenizer's two code branches
TooLong = Literal["skip", "truncate", "error"]  # truncate drops trailing text, never an image
CodePrecision = Literal["bf16", "fp32"]  # the visual tokenizer's; bf16 reproduces the released codes
EvalPrecision = Literal["auto", "fp32", "bf16"]  # auto: bf16 on a GPU, fp32 on CPU
ExportPrecision = Literal["bf16", "fp32", "fp16"]  # of the model while converting and of the written tensors


@section
class ValidationConfig:
    """Limits and policies of the preprocessing's validation pass (``data.validate``)."""

    image_root: Path
    max_seq_length: Positive = 2048
    image_tokens: Positive = 729  # visual positions per image (a fixed-grid encoder: SigLIP-384's 27 x 27)
    too_long: TooLong = "skip"
    strict: bool = False  # every skip becomes an error
    min_image_side: Positive = 10
    max_image_pixels: Positive = 8192 * 8192
    verify_images: bool = True  # decode every image (JPEG at 1/8 scale), not just its header


@section
class PreprocessConfig:
    """One preprocessing run (``data.preprocess``): LLaVA JSON + images -> shards and a report."""

    inputs: Tuple[Tuple[Optional[str], Path], ...]  # (source name or None, JSON/JSONL file)
    output_dir: Path
    tokenizer: Path  # .model, tokenizer .json or a checkpoint directory
    template: str  # a key of tokenizers.templates.TEMPLATES (checked where it is used)
    validation: ValidationConfig
    legacy: Optional[bool] = None  # None: from tokenizer_config.json, else HF's default (True)
    max_skip_fraction: Fraction = 0.01
    workers: Positive = 1
    samples_per_shard: Positive = 100_000
    id_list_cap: Count = 1000
    progress: bool = True


@section
class TargetsConfig:
    """One precompute run (``data.precompute_targets``): the visual tokenizer's codes of every image."""

    data: Tuple[Path, ...]  # LLaVA JSON / JSONL files
    image_root: Path
    output_dir: Path
    tokenizer_config: Path  # DualToken-format config.json
    tokenizer_checkpoint: Path
    mode: ImageMode = "pad"  # as the training stage reads the images
    branches: Tuple[Branch, ...] = ("semantic",)  # "semantic", "appearance" or both ("dual")
    precision: CodePrecision = "bf16"
    backend: TransformerImpl = "auto"  # encoder layers: Transformer Engine on GPU when installed, else local
    batch_images: Positive = 32
    workers: Count = 4  # image decoding processes (0: decode in the main process)
    max_images: Optional[Count] = None  # stop after this many images; the next run resumes
    max_missing_fraction: Fraction = 0.01  # refuse the run above this fraction of missing / undecodable images
    progress: bool = True

    def validate(self) -> None:
        if not self.branches or len(set(self.branches)) != len(self.branches):
            raise ConfigError(f"TargetsConfig.branches must name semantic, appearance or both once, got "
                              f"{list(self.branches)}")


@section
class FitConfig:
    """One visual-tokenizer fit (``tokenizers.visual_fit``)."""

    images: Path  # directory searched recursively for image files
    encoder: Path  # HF SigLIP directory: config.json + *.safetensors
    output_dir: Path
    depth: Positive = 8
    codebook_size: Positive = 16384
    semantic_layer: int = -2  # HF hidden_states index; -2 = block 26 of 27
    appearance_layer: int = 6
    mode: ImageMode = "resize"  # data.images preprocessing
    epochs: Count = 1
    batch_images: Positive = 16
    seed_images: Positive = 64
    seed_iters: Count = 10
    restart_after: Optional[Positive] = None  # vectors a code may go unused; None = 400 x codebook_size
    max_images: Optional[Positive] = None  # a random subset of this many images
    seed: int = 0
    workers: Count = 4
    head_width: Positive = 2048  # rqtransformer.embed_dim written to config.json
    backend: TransformerImpl = "auto"
    progress: bool = True


@section
class ImportSources:
    """What tools/convert.py import reads (``convert.hf_import``)."""

    llava: Optional[Path] = None  # a LlavaForConditionalGeneration directory
    llm: Optional[Path] = None  # a LlamaForCausalLM / MistralForCausalLM directory
    vision: Optional[Path] = None  # a SigLIP / CLIP (vision) model directory
    visual_head: Optional[Path] = None  # an exported visual head directory
    tokenizer: Optional[Path] = None  # default: the llava or llm directory, when it has tokenizer files

    def validate(self) -> None:
        if (self.llava is None) == (self.llm is None and self.vision is None):
            raise ConfigError("give either a llava directory or a vision directory (and an llm directory)")
        if self.llava is None and self.vision is None:
            raise ConfigError("an import of an llm needs the vision directory too")


@section
class ExportOptions:
    """How tools/convert.py export writes (``convert.hf_export``)."""

    vision_tower_from: Optional[Path] = None  # the original HF vision weights (complete tower)
    tokenizer: Optional[Path] = None  # default: the checkpoint's tokenizer/ directory
    dtype: ExportPrecision = "bf16"
    max_shard_bytes: Positive = 2 * 1024**3
    progress: bool = True
    llm_only: bool = False  # the language model alone, as an HF LlamaForCausalLM / MistralForCausalLM


@section
class EvalModelConfig:
    """The model an evaluation runs (``evaluation.loading``): our checkpoint or an HF export."""

    checkpoint: Optional[Path] = None  # ours: a save directory or one checkpoint
    hf_model: Optional[Path] = None  # or an HF LLaVA export
    tokenizer: Optional[Path] = None  # default: the checkpoint's (or export's) own
    template: Optional[str] = None  # default: the training shards' template
    image_mode: Optional[ImageMode] = None  # default: the training run's data.image_mode
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    dtype: EvalPrecision = "auto"
    micro_batch: Positive = 4
    batch_size: Positive = 32  # questions decoded together
    max_new_tokens: Positive = 16

    def validate(self) -> None:
        if (self.checkpoint is None) == (self.hf_model is None):
            raise ConfigError("give exactly one of a checkpoint (ours) or an HF model directory")
        if self.hf_model is not None and self.image_mode == "anyres":
            raise ConfigError("an HF LlavaForConditionalGeneration takes one tile per image: "
                              "use image mode resize or pad")


@section
class EvalBenchmarkConfig:
    """One benchmark file of an evaluation."""

    name: str  # a key of evaluation.suites' benchmarks
    path: Path
    image_root: Optional[Path] = None  # default: the benchmark file's directory


@section
class EvalConfig:
    """One evaluation run (``evaluation.run``)."""

    model: EvalModelConfig
    benchmarks: List[EvalBenchmarkConfig]
    out_dir: Path
    method: Literal["generate", "likelihood"] = "generate"  # likelihood: the candidates' where an item has them
    limit: Optional[Positive] = None  # the first N questions of each benchmark
    suite: Optional[str] = None  # paper14: the benchmarks are the paper's; add its table and average

    def validate(self) -> None:
        if not self.benchmarks:
            raise ConfigError("no benchmark given")
        self.model.validate()


@section
class AttentionConfig:
    """One attention map (``evaluation.attention_tool``): the last token's attention over an image."""

    model: EvalModelConfig  # a checkpoint of ours (attention is read from our layers)
    image: Path
    question: str  # the whole user turn, answer prompt included if wanted
    out: Path  # the PNG
    layers: Optional[List[Positive]] = None  # 1-based decoder layers; None = all
    heads: Optional[List[Count]] = None  # 0-based heads; None = all

    def validate(self) -> None:
        if self.model.checkpoint is None:
            raise ConfigError("the attention map reads our model's layers: give a checkpoint, not an HF export")
        self.model.validate()
