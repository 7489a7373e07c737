"""The on-disk format of model weights, shared by the trainer, the converter and the evaluator.

A checkpoint directory holds ``model_config.json`` (the ModelConfig) and ``dist/``,
a megatron dist checkpoint (torch_dist) whose model entries are "model" (or
"model0", "model1", ... per virtual stage) with layout-independent keys: saved at
one TP / PP / DP layout, they load at any other. Training adds its optimizer,
scheduler and RNG entries to the same ``dist/`` (``training.checkpoint``).
"""

from pathlib import Path
from typing import Dict, List, Sequence

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.distributed import DistributedDataParallel

MODEL_CONFIG = "model_config.json"
DIST = "dist"


def unwrap_ddp(chunk: torch.nn.Module) -> torch.nn.Module:
    return chunk.module if isinstance(chunk, DistributedDataParallel) else chunk


def model_keys(model: List[torch.nn.Module]) -> List[str]:
    # Megatron-LM's naming: "model", or "model0", "model1", ... per virtual stage.
    return ["model"] if len(model) == 1 else [f"model{i}" for i in range(len(model))]


def sharded_model_state(model: List[torch.nn.Module]) -> Dict[str, dict]:
    """The sharded state dict of every model chunk on this rank."""
    return {key: unwrap_ddp(chunk).sharded_state_dict() for key, chunk in zip(model_keys(model), model)}


def save_model(model: List[torch.nn.Module], directory: Path) -> None:
    """Write the model's weights (collective over all ranks) into an empty ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(sharded_model_state(model), str(directory))


def load_model(model: List[torch.nn.Module], directory: Path, optional: Sequence[str] = ()) -> List[str]:
    """Load weights saved at any layout into this rank's chunks (collective).

    Tensors the checkpoint lacks are an error naming them, except those under an
    ``optional`` prefix (e.g. ``visual_heads.`` when stage 1 ran without the visual
    loss): those keep their initialisation and are returned.
    """
    directory = Path(directory)
    if not dist_checkpointing.check_is_distributed_checkpoint(str(directory)):
        raise FileNotFoundError(f"{directory} is not a dist checkpoint (no metadata.json)")
    available = set(dist_checkpointing.load_tensors_metadata(str(directory)))
    sharded, kept_init, missing = sharded_model_state(model), [], []
    tensors = [item for chunk_state in sharded.values() for item in chunk_state.values() if isinstance(item, ShardedTensor)]
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
        raise KeyError(f"{directory} lacks {len(missing)} model tensors, e.g. {sorted(missing)[:5]}")
    state = dist_checkpointing.load(sharded, str(directory))
    for key, chunk in zip(model_keys(model), model):
        result = unwrap_ddp(chunk).load_state_dict(state[key], strict=False)
        unexpected_missing = [k for k in result.missing_keys if not k.startswith(tuple(optional)) and "_extra_state" not in k]
        if unexpected_missing or result.unexpected_keys:
            raise KeyError(f"{directory}: missing {unexpected_missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    return sorted(set(kept_init))
