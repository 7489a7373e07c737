"""Checkpoints through megatron's dist_checkpointing (torch_dist format).

Tensors are saved under layout-independent keys (global layer numbers, full
shapes with each rank's shard offsets), so a checkpoint written at one TP / PP /
DP layout loads at any other.
"""

from pathlib import Path
from typing import Dict, List

import torch
from megatron.core import dist_checkpointing
from megatron.core.distributed import DistributedDataParallel


def _unwrap_ddp(chunk: torch.nn.Module) -> torch.nn.Module:
    return chunk.module if isinstance(chunk, DistributedDataParallel) else chunk


def _model_keys(model: List[torch.nn.Module]) -> List[str]:
    # Megatron-LM's naming: "model", or "model0", "model1", ... per virtual stage.
    return ["model"] if len(model) == 1 else [f"model{i}" for i in range(len(model))]


def sharded_model_state(model: List[torch.nn.Module]) -> Dict[str, dict]:
    """The sharded state dict of every model chunk on this rank."""
    return {key: _unwrap_ddp(chunk).sharded_state_dict() for key, chunk in zip(_model_keys(model), model)}


def save_model(model: List[torch.nn.Module], directory: Path) -> None:
    """Write the model's weights (collective over all ranks) into an empty ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(sharded_model_state(model), str(directory))


def load_model(model: List[torch.nn.Module], directory: Path) -> None:
    """Load weights saved at any layout into this rank's chunks (collective)."""
    directory = Path(directory)
    if not dist_checkpointing.check_is_distributed_checkpoint(str(directory)):
        raise FileNotFoundError(f"{directory} is not a dist checkpoint (no metadata.json)")
    state = dist_checkpointing.load(sharded_model_state(model), str(directory))
    for key, chunk in zip(_model_keys(model), model):
        _unwrap_ddp(chunk).load_state_dict(state[key], strict=True)
