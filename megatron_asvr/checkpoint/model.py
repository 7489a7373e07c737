"""A checkpoint's model: its config (``model_config.json``) and weights (``dist/``), saved at one
TP / PP layout and loaded at any other (collective calls: every rank makes them).

    save_weights(chunks, directory)     the chunks' weights as a dist checkpoint
    load_weights(chunks, path)          into built chunks, from a save directory (its newest
                                        checkpoint), a checkpoint, or a bare dist checkpoint
    save_model(chunks, directory, model)                 model_config.json, then the weights
    load_model(directory, model, parallel, dtype, device) -> chunks built for ``model``, loaded

The dist checkpoint's model entries are "model" (or "model0", "model1", ... per virtual stage,
Megatron-LM's naming). Chunks built to load a checkpoint get placeholder (zero) codebooks: the
visual head's teacher-forcing codebooks are frozen, unsaved buffers that loading never reads.
"""

import json
from pathlib import Path
from typing import Dict, List, Sequence

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.distributed import DistributedDataParallel

from megatron_asvr.checkpoint.directory import DIST, MODEL_CONFIG, resolve
from megatron_asvr.config import ConfigError, ModelConfig, ParallelConfig, from_dict, to_dict
from megatron_asvr.model.chunks import build_model_chunks
from megatron_asvr.model.specs import resolve_backend
from megatron_asvr.model.vlm import stage_builder

# Absent from a stage-1 checkpoint trained without the visual loss and from an HF import: a run that
# starts from one (train.load) keeps the visual heads' initialisation.
VISUAL_HEADS = "visual_heads."


def unwrap_ddp(chunk: torch.nn.Module) -> torch.nn.Module:
    return chunk.module if isinstance(chunk, DistributedDataParallel) else chunk


def model_keys(model: List[torch.nn.Module]) -> List[str]:
    return ["model"] if len(model) == 1 else [f"model{i}" for i in range(len(model))]


def sharded_model_state(model: List[torch.nn.Module]) -> Dict[str, dict]:
    """The sharded state dict of every model chunk on this rank."""
    return {key: unwrap_ddp(chunk).sharded_state_dict() for key, chunk in zip(model_keys(model), model)}


def read_model_config(directory) -> ModelConfig:
    path = Path(directory) / MODEL_CONFIG
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot read the model config: {err}") from err
    vision = data.get("vision") if isinstance(data, dict) else None
    if isinstance(vision, dict) and "kind" in vision:  # written before vision.kind was named vision.family
        vision["family"] = vision.pop("kind")
    return from_dict(ModelConfig, data, f"{path}: ")


def write_model_config(directory, model: ModelConfig) -> None:
    text = json.dumps(to_dict(model), indent=1) + "\n"
    (Path(directory) / MODEL_CONFIG).write_text(text, encoding="utf-8")


def save_weights(model: List[torch.nn.Module], directory: Path) -> None:
    """Write the model's weights into an empty ``directory`` (a bare dist checkpoint)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(sharded_model_state(model), str(directory))


def load_weights(model: List[torch.nn.Module], path: Path, optional: Sequence[str] = ()) -> Path:
    """Load weights saved at any layout into this rank's chunks; return the checkpoint read.

    ``path``: a save directory (its newest complete checkpoint), a checkpoint (with ``dist/``)
    or a bare dist checkpoint. Tensors the checkpoint lacks are an error naming them, except
    those under an ``optional`` prefix (e.g. ``VISUAL_HEADS``): those keep their initialisation.
    """
    directory = resolve(path)
    dist_dir = directory / DIST if (directory / DIST).is_dir() else directory
    if not dist_checkpointing.check_is_distributed_checkpoint(str(dist_dir)):
        raise FileNotFoundError(f"{dist_dir} is not a dist checkpoint (no metadata.json)")
    available = set(dist_checkpointing.load_tensors_metadata(str(dist_dir)))
    sharded, kept_init, missing = sharded_model_state(model), [], []
    tensors = [item for chunk_state in sharded.values() for item in chunk_state.values()
               if isinstance(item, ShardedTensor)]
    for item in tensors:
        if item.key not in available:
            (kept_init if item.key.startswith(tuple(optional)) else missing).append(item.key)
    # An absent optional part goes whole: its tensors and its modules' extra state.
    absent = tuple(p for p in optional if any(k.startswith(p) for k in kept_init))
    for chunk_state in sharded.values():
        for name, item in list(chunk_state.items()):
            if absent and getattr(item, "key", "").startswith(absent):
                del chunk_state[name]
    if missing:
        raise KeyError(f"{dist_dir} lacks {len(missing)} model tensors, e.g. {sorted(missing)[:5]}")
    state = dist_checkpointing.load(sharded, str(dist_dir))
    for key, chunk in zip(model_keys(model), model):
        result = unwrap_ddp(chunk).load_state_dict(state[key], strict=False)
        unexpected_missing = [k for k in result.missing_keys
                              if not k.startswith(tuple(optional)) and "_extra_state" not in k]
        if unexpected_missing or result.unexpected_keys:
            raise KeyError(f"{dist_dir}: missing {unexpected_missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    return directory


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


def save_model(chunks: List[torch.nn.Module], directory: Path, model: ModelConfig) -> None:
    """A checkpoint directory: the config from rank 0, then the weights from every rank."""
    directory = Path(directory)
    if dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        write_model_config(directory, model)
    dist.barrier()
    save_weights(chunks, directory / DIST)


def load_model(directory: Path, model: ModelConfig, parallel: ParallelConfig, params_dtype: torch.dtype,
               device) -> List[torch.nn.Module]:
    """This rank's chunks of ``model`` (read from ``directory``, or changed from it: evaluation
    leaves the visual head out) with the checkpoint's weights."""
    chunks = build_chunks(model, parallel, params_dtype, device)
    load_weights(chunks, directory)
    return chunks
