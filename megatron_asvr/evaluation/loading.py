"""The model an evaluation runs: our checkpoint (any TP / PP / DP, under torchrun) or an HF
export (one process, transformers), wrapped in an ``Answerer`` with its prompts and images.

A checkpoint's model is built without the visual head, a training-only part (its weights stay in
the checkpoint), with the settings its training run used (template, image mode) as defaults.
Discrete-input models need the visual tokenizer's codes of every evaluation image, which this
path does not compute.
"""

import contextlib
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch

from megatron_asvr.checkpoint.directory import RUN_CONFIG, TOKENIZER_DIR
from megatron_asvr.config import ConfigError, ModelConfig, ParallelConfig
from megatron_asvr.data.shards import SHARD_MANIFEST
from megatron_asvr.evaluation.answerer import Answerer
from megatron_asvr.evaluation.queries import QueryEncoder
from megatron_asvr.tokenizers.text import load_text_tokenizer

DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class ModelSpec:
    checkpoint: Optional[Path] = None  # ours: a save directory or one checkpoint
    hf_model: Optional[Path] = None  # or an HF LLaVA export
    tokenizer: Optional[Path] = None  # default: the checkpoint's (or export's) own
    template: Optional[str] = None  # default: the training shards' template
    image_mode: Optional[str] = None  # default: the training run's data.image_mode
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    micro_batch: int = 4
    batch_size: int = 32  # questions decoded together
    max_new_tokens: int = 16

    def validate(self) -> None:
        if (self.checkpoint is None) == (self.hf_model is None):
            raise ConfigError("give exactly one of a checkpoint (ours) or an HF model directory")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.hf_model is not None and self.image_mode == "anyres":
            raise ConfigError("an HF LlavaForConditionalGeneration takes one tile per image: "
                              "use image mode resize or pad")

    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype] or (torch.bfloat16 if torch.cuda.is_available() else torch.float32)


@dataclass
class LoadedModel:
    answerer: Answerer
    name: str  # the checkpoint or export directory
    writer: bool  # this rank prints and writes files
    patch_size: int  # vision patch, in pixels of the 384 view


@dataclass(frozen=True)
class TrainingDefaults:
    """What the run that wrote a checkpoint used; None where it cannot be found."""

    template: Optional[str]  # from the training shards' manifest
    image_mode: Optional[str]
    tokenizer: Optional[Path]  # a tokenizer/ directory inside the checkpoint (HF imports)


def training_defaults(directory: Path) -> TrainingDefaults:
    directory = Path(directory)
    template = image_mode = None
    run_config = directory / RUN_CONFIG
    if run_config.is_file():
        data = json.loads(run_config.read_text(encoding="utf-8")).get("data", {})
        image_mode = data.get("image_mode")
        manifest = Path(data.get("shards", "")) / SHARD_MANIFEST
        if manifest.is_file():
            template = json.loads(manifest.read_text(encoding="utf-8")).get("metadata", {}).get("template")
    tokenizer = directory / TOKENIZER_DIR
    return TrainingDefaults(template, image_mode, tokenizer if tokenizer.is_dir() else None)


def evaluation_model_config(model: ModelConfig, where: str) -> ModelConfig:
    """``model`` without the visual head; refuses discrete-input models."""
    if model.asvr.discrete_input:
        raise ConfigError(f"{where}: a discrete-input model needs the visual tokenizer's codes of each "
                          f"evaluation image; evaluation supports models with a vision encoder")
    return dataclasses.replace(model, asvr=dataclasses.replace(model.asvr, visual_loss=False))


def _required(value, what: str, flag: str):
    if value is None:
        raise ConfigError(f"no {what} known for this model: pass {flag}")
    return value


def _checkpoint_model(spec: ModelSpec) -> LoadedModel:
    from megatron_asvr import runtime
    from megatron_asvr.checkpoint.directory import resolve
    from megatron_asvr.checkpoint.model import load_model, read_model_config
    from megatron_asvr.evaluation.runners import MegatronRunner

    info = runtime.initialize(spec.parallel)
    directory = resolve(spec.checkpoint)
    model = evaluation_model_config(read_model_config(directory), str(directory))
    chunks = load_model(directory, model, spec.parallel, spec.torch_dtype(), info.device)
    defaults = training_defaults(directory)
    tokenizer = load_text_tokenizer(_required(spec.tokenizer or defaults.tokenizer, "text tokenizer", "--tokenizer"))
    encoder = QueryEncoder(tokenizer, _required(spec.template or defaults.template, "template", "--template"),
                           _required(spec.image_mode or defaults.image_mode, "image mode", "--image-mode"),
                           model.vision.num_patches, model.llm.max_sequence_length)
    runner = MegatronRunner(chunks, min(model.llm.vocab_size, tokenizer.vocab_size), spec.micro_batch)
    answerer = Answerer(runner, encoder, spec.max_new_tokens, spec.batch_size)
    return LoadedModel(answerer, str(directory), info.rank == 0, model.vision.patch_size)


def _hf_model(spec: ModelSpec) -> LoadedModel:
    from megatron_asvr.evaluation.hf_runner import HFRunner

    tokenizer = load_text_tokenizer(spec.tokenizer or spec.hf_model)
    runner = HFRunner(spec.hf_model, tokenizer.vocab_size, spec.micro_batch, spec.torch_dtype())
    encoder = QueryEncoder(tokenizer, _required(spec.template, "template", "--template"),
                           _required(spec.image_mode, "image mode", "--image-mode"), runner.patches_per_tile,
                           runner.max_length)
    answerer = Answerer(runner, encoder, spec.max_new_tokens, spec.batch_size)
    return LoadedModel(answerer, str(spec.hf_model), True, runner.patch_size)


@contextlib.contextmanager
def open_model(spec: ModelSpec) -> Iterator[LoadedModel]:
    """The loaded model; for a checkpoint the distributed runtime lives as long as the context."""
    spec.validate()
    if spec.hf_model is not None:
        yield _hf_model(spec)
        return
    from megatron_asvr import runtime

    try:
        yield _checkpoint_model(spec)
    finally:
        runtime.destroy()
