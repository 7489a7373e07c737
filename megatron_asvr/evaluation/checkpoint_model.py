"""Our checkpoint as an evaluation model: weights at any TP / PP layout, and the settings the
training run used (template, image mode) as defaults.

The visual head is a training-only part: it is not built for evaluation (its
weights stay in the checkpoint). Discrete-input models need the visual
tokenizer's codes of every evaluation image, which this path does not compute.
"""

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch

from megatron_asvr.config import ConfigError, ModelConfig, ParallelConfig
from megatron_asvr.convert import checkpoint_io
from megatron_asvr.training import checkpoint as ckpt


@dataclass(frozen=True)
class TrainingDefaults:
    """What the run that wrote a checkpoint used; None where it cannot be found."""

    template: Optional[str]  # from the training shards' manifest
    image_mode: Optional[str]
    tokenizer: Optional[Path]  # a tokenizer/ directory inside the checkpoint (HF imports)


def training_defaults(directory: Path) -> TrainingDefaults:
    directory = Path(directory)
    template = image_mode = None
    run_config = directory / ckpt.RUN_CONFIG
    if run_config.is_file():
        data = json.loads(run_config.read_text(encoding="utf-8")).get("data", {})
        image_mode = data.get("image_mode")
        manifest = Path(data.get("shards", "")) / "manifest.json"
        if manifest.is_file():
            template = json.loads(manifest.read_text(encoding="utf-8")).get("metadata", {}).get("template")
    tokenizer = directory / checkpoint_io.TOKENIZER_DIR
    return TrainingDefaults(template, image_mode, tokenizer if tokenizer.is_dir() else None)


def evaluation_model_config(model: ModelConfig, where: str) -> ModelConfig:
    """``model`` without the visual head; refuses discrete-input models."""
    if model.asvr.discrete_input:
        raise ConfigError(f"{where}: a discrete-input model needs the visual tokenizer's codes of each "
                          f"evaluation image; evaluation supports models with a vision encoder")
    return dataclasses.replace(model, asvr=dataclasses.replace(model.asvr, visual_loss=False))


def load_model(path: Path, parallel: ParallelConfig, dtype: torch.dtype, device):
    """(model chunks of this rank, ModelConfig, checkpoint directory) of a save directory
    (its newest checkpoint) or a checkpoint directory (collective)."""
    directory = ckpt.resolve(Path(path))
    model = evaluation_model_config(checkpoint_io.read_model_config(directory), str(directory))
    chunks: List[torch.nn.Module] = checkpoint_io.build_chunks(model, parallel, dtype, device)
    ckpt.load_weights(directory, chunks)
    return chunks, model, directory
