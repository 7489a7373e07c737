"""Collective helpers for conversions that run on every rank of a TP x PP layout."""

from pathlib import Path
from typing import Any, List, Optional

import torch.distributed as dist
from megatron.core import parallel_state


class ConversionError(RuntimeError):
    """A conversion problem found on some rank, raised on every rank."""


def raise_if_any(error: Optional[str]) -> None:
    """Raise ``ConversionError`` on every rank when any rank passes an error message, so no rank
    is left waiting in a later collective."""
    errors = gather_objects(error)
    found = [e for e in errors if e]
    if found:
        raise ConversionError(found[0] + (f" (and {len(found) - 1} more ranks)" if len(found) > 1 else ""))


def gather_objects(value: Any) -> List[Any]:
    """``value`` of every rank, by global rank."""
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def is_writer() -> bool:
    """The one rank of each pipeline stage that writes files (TP rank 0, DP rank 0)."""
    return parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0


def require_new_directory(directory) -> None:
    """Every rank looks before any rank writes (collective): the output must be new or empty."""
    directory = Path(directory)
    busy = directory.exists() and any(directory.iterdir())
    raise_if_any(f"{directory} is not empty: choose a new output directory" if busy else None)
