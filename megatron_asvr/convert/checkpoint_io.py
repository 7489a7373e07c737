"""Our checkpoint directory, as the converter and the trainer read and write it::

    <dir>/model_config.json   to_dict(ModelConfig)
    <dir>/dist/               megatron dist checkpoint; model entries "model" (or "model0",
                              "model1", ... per virtual stage), layout-independent keys;
                              training adds optimizer entries, which the converter ignores
    <dir>/hf_vocab.json       optional: the llava-hf vocabulary record (convert.hf_vocab)
    <dir>/tokenizer/          optional: the text tokenizer's files

Model chunks for conversion are built with placeholder (zero) codebooks: the
visual head's teacher-forcing codebooks are frozen, unsaved buffers that
conversion never reads.
"""

import json
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_asvr.config import ConfigError, ModelConfig, ParallelConfig, from_dict, to_dict
from megatron_asvr.convert.hf_vocab import HFVocab
from megatron_asvr.model.specs import resolve_backend
from megatron_asvr.model.vlm import stage_builder
from megatron_asvr.checkpoint_format import DIST, MODEL_CONFIG, load_model, save_model
from megatron_asvr.model.chunks import build_model_chunks

HF_VOCAB = "hf_vocab.json"
TOKENIZER_DIR = "tokenizer"


def read_model_config(directory) -> ModelConfig:
    path = Path(directory) / MODEL_CONFIG
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot read the model config: {err}") from err
    return from_dict(ModelConfig, data, f"{path}: ")


def write_model_config(directory, model: ModelConfig) -> None:
    text = json.dumps(to_dict(model), indent=1) + "\n"
    (Path(directory) / MODEL_CONFIG).write_text(text, encoding="utf-8")


def read_hf_vocab(directory) -> Optional[HFVocab]:
    """The llava-hf vocabulary record of a checkpoint imported from llava-hf, else None."""
    path = Path(directory) / HF_VOCAB
    return HFVocab.read(path) if path.is_file() else None


def placeholder_codebooks(model: ModelConfig) -> Dict[str, List[torch.Tensor]]:
    """Zero codebooks (expanded views: no memory) for the branches the model builds."""
    asvr = model.asvr
    branches = set(asvr.branches) | ({"semantic"} if asvr.discrete_input else set())
    return {
        branch: [torch.zeros(1, spec.dim).expand(size, spec.dim) for size in spec.sizes]
        for branch, spec in ((b, getattr(asvr, b)) for b in sorted(branches))
    }


def build_chunks(
    model: ModelConfig, parallel: ParallelConfig, params_dtype: torch.dtype, device
) -> List[torch.nn.Module]:
    """This rank's model chunks (after ``runtime.initialize``), freshly initialised, every floating
    tensor in ``params_dtype`` (as megatron's Float16Module casts them for training: the ViT's
    convolution and a few plain torch layers are built in fp32)."""
    backend = resolve_backend(model.transformer_impl)
    builder = stage_builder(model, parallel, backend, placeholder_codebooks(model), params_dtype)
    return [chunk.to(params_dtype) for chunk in build_model_chunks(builder, device)]


def save_model_checkpoint(chunks, directory, model: ModelConfig, hf_vocab: Optional[HFVocab] = None) -> None:
    """Write the checkpoint (collective): configs from rank 0, the weights from every rank."""
    directory = Path(directory)
    if dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        write_model_config(directory, model)
        if hf_vocab is not None:
            hf_vocab.write(directory / HF_VOCAB)
    dist.barrier()
    save_model(chunks, directory / DIST)


def load_model_weights(chunks, directory) -> None:
    """Load the model entries of a checkpoint saved at any layout (collective)."""
    load_model(chunks, Path(directory) / DIST)
