"""Training checkpoints through megatron's dist_checkpointing (torch_dist format).

Layout of a save directory::

    latest                 name of the newest complete checkpoint (updated last)
    iter_0000100/
        model_config.json  the model's ModelConfig (what the HF converter reads)
        run_config.json    the whole RunConfig of the run that wrote it
        dist/              dist checkpoint: "model" (or "model0", ... per virtual stage),
                           "optimizer", "rng" (per TP x PP rank), and common state:
                           step, consumed samples, scheduler, layout

Tensors are keyed layout-independently (global layer numbers, full shapes with
each rank's shard offsets; the distributed optimizer in its fully reshardable
form), so a checkpoint written at one TP / PP / DP layout loads at any other.
A save is atomic: it goes to ``iter_X.tmp``, which rank 0 renames only after
every rank has written, and ``latest`` moves after that; a run killed mid-save
leaves the previous checkpoint as the newest complete one.
"""

import json
import os
import random
import shutil
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_asvr.checkpoint_format import DIST, MODEL_CONFIG, load_model, model_keys, sharded_model_state, unwrap_ddp

LATEST = "latest"
RUN_CONFIG = "run_config.json"
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}



def _layout() -> Dict[str, int]:
    return {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
    }


def _rng_state() -> dict:
    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_rng(state: Optional[dict] = None) -> ShardedObject:
    """This rank's RNG states, one object per (PP, TP) rank, replicated over DP."""
    pp, tp = parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()
    shape = (parallel_state.get_pipeline_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_world_size())
    return ShardedObject("rng_state", state, shape, (pp, tp), replica_id=parallel_state.get_data_parallel_rank())


def _training_state(model, optimizer, scheduler, step: int, consumed_samples: int, for_loading: bool) -> dict:
    state = sharded_model_state(model)
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=for_loading, metadata=OPTIMIZER_METADATA)
    state["scheduler"] = scheduler.state_dict()
    state["step"], state["consumed_samples"], state["layout"] = step, consumed_samples, _layout()
    return state


def checkpoint_dir(save_dir: Path, step: int) -> Path:
    return Path(save_dir) / f"iter_{step:07d}"


def is_complete(directory: Path) -> bool:
    """A checkpoint whose configs and dist metadata are all on disk."""
    directory = Path(directory)
    return (directory / MODEL_CONFIG).is_file() and dist_checkpointing.check_is_distributed_checkpoint(
        str(directory / DIST)
    )


def find_latest(save_dir: Path) -> Optional[Path]:
    """``latest`` if it names a complete checkpoint, else the newest complete ``iter_*``."""
    save_dir = Path(save_dir)
    pointer = save_dir / LATEST
    if pointer.is_file():
        named = save_dir / pointer.read_text().strip()
        if is_complete(named):
            return named
    candidates = sorted(p for p in save_dir.glob("iter_*") if p.is_dir() and p.suffix != ".tmp")
    for directory in reversed(candidates):
        if is_complete(directory):
            return directory
    return None


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(
    save_dir: Path,
    step: int,
    model,
    optimizer,
    scheduler,
    consumed_samples: int,
    model_config: dict,
    run_config: dict,
    keep_last: int = 3,
) -> Path:
    """Save everything needed to resume exactly (collective); return the checkpoint directory."""
    final = checkpoint_dir(save_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a previous attempt killed mid-write
        (tmp / DIST).mkdir(parents=True)
    dist.barrier()
    state = _training_state(model, optimizer, scheduler, step, consumed_samples, for_loading=False)
    state["rng"] = _sharded_rng(_rng_state())
    dist_checkpointing.save(state, str(tmp / DIST))
    if rank == 0:
        _write_json(tmp / MODEL_CONFIG, model_config)
        _write_json(tmp / RUN_CONFIG, run_config)
    dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer_tmp = Path(save_dir) / (LATEST + ".tmp")
        pointer_tmp.write_text(final.name)
        os.replace(pointer_tmp, Path(save_dir) / LATEST)
        _prune(Path(save_dir), keep_last)
    dist.barrier()
    return final


def _prune(save_dir: Path, keep_last: int) -> None:
    complete = sorted(p for p in save_dir.glob("iter_*") if p.suffix != ".tmp" and is_complete(p))
    for old in complete[: max(len(complete) - keep_last, 0)]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(directory: Path, model, optimizer, scheduler) -> Dict[str, int]:
    """Restore model, optimizer, scheduler (and RNG when the layout is unchanged); return
    ``{"step", "consumed_samples"}``."""
    directory = Path(directory)
    path = str(directory / DIST)
    common = dist_checkpointing.load_common_state_dict(path)
    state = _training_state(model, optimizer, scheduler, 0, 0, for_loading=True)
    same_layout = common["layout"] == _layout()
    if same_layout:
        state["rng"] = _sharded_rng()
    loaded = dist_checkpointing.load(state, path)
    for key, chunk in zip(model_keys(model), model):
        unwrap_ddp(chunk).load_state_dict(loaded[key], strict=True)
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])
    if same_layout:
        _set_rng_state(loaded["rng"])
    return {"step": int(loaded["step"]), "consumed_samples": int(loaded["consumed_samples"]), "same_layout": same_layout}


def resolve(path: Path) -> Path:
    """A checkpoint directory from a save directory (its newest complete checkpoint) or itself."""
    path = Path(path)
    if (path / LATEST).is_file() or any(path.glob("iter_*")):
        latest = find_latest(path)
        if latest is None:
            raise FileNotFoundError(f"{path} holds no complete checkpoint")
        return latest
    return path


def load_weights(path: Path, model, optional: Sequence[str] = ("visual_heads.",)) -> Path:
    """Initial weights only (a stage-1 run, an HF import): ``path`` is a save directory, a
    checkpoint (with ``dist/``) or a bare dist checkpoint. Visual heads absent from it (a
    stage 1 without the visual loss, an HF import) start from their initialisation.
    Returns the checkpoint loaded."""
    directory = resolve(path)
    load_model(model, directory / DIST if (directory / DIST).is_dir() else directory, optional)
    return directory
