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
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from megatron_asvr.checkpoint.directory import RUN_CONFIG, TOKENIZER_DIR
from megatron_asvr.config import ConfigError, ModelConfig
from megatron_asvr.config.tools import EvalModelConfig
from megatron_asvr.data.shards import SHARD_MANIFEST
from megatron_asvr.evaluation.answerer import Answerer
from megatron_asvr.evaluation.queries import QueryEncoder
from megatron_asvr.runtime.device import dtype_of
from megatron_asvr.tokenizers.text import load_text_tokenizer


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


def _checkpoint_model(spec: EvalModelConfig) -> LoadedModel:
    from megatron_asvr import runtime
    from megatron_asvr.checkpoint.directory import resolve
    from megatron_asvr.checkpoint.model import load_model, read_model_config
    from megatron_asvr.evaluation.runners import MegatronRunner

    info = runtime.initialize(spec.parallel)
    directory = resolve(spec.checkpoint)
    model = evaluation_model_config(read_model_config(directory), str(directory))
    chunks = load_model(directory, model, spec.parallel, dtype_of(spec.dtype), info.device)
    defaults = training_defaults(directory)
    tokenizer = load_text_tokenizer(_required(spec.tokenizer or defaults.tokenizer, "text tokenizer", "--tokenizer"))
    encoder = QueryEncoder(tokenizer, _required(spec.template or defaults.template, "template", "--template"),
                           _required(spec.image_mode or defaults.image_mode, "image mode", "--image-mode"),
                           model.vision.num_patches, model.llm.max_sequence_length)
    runner = MegatronRunner(chunks, min(model.llm.vocab_size, tokenizer.vocab_size), spec.micro_batch)
    answerer = Answerer(runner, encoder, spec.max_new_tokens, spec.batch_size)
    return LoadedModel(answerer, str(directory), info.rank == 0, model.vision.patch_size)


def _hf_model(spec: EvalModelConfig) -> LoadedModel:
    from megatron_asvr.evaluation.hf_runner import HFRunner

    tokenizer = load_text_tokenizer(spec.tokenizer or spec.hf_model)
    runner = HFRunner(spec.hf_model, tokenizer.vocab_size, spec.micro_batch, dtype_of(spec.dtype))
    encoder = QueryEncoder(tokenizer, _required(spec.template, "template", "--template"),
                           _required(spec.image_mode, "image mode", "--image-mode"), runner.patches_per_tile,
                           runner.max_length)
    answerer = Answerer(runner, encoder, spec.max_new_tokens, spec.batch_size)
    return LoadedModel(answerer, str(spec.hf_model), True, runner.patch_size)


@contextlib.contextmanager
def open_model(spec: EvalModelConfig) -> Iterator[LoadedModel]:
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
