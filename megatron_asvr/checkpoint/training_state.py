"""Everything a training run resumes from, through megatron's dist_checkpointing (torch_dist).

    save_training(save_dir, step, model, optimizer, scheduler, ...) -> iter_* directory
    load_training(directory, model, optimizer, scheduler) -> TrainingProgress
    save_retried(save, save_dir, step, on_failure)    a failed save retried once, then stop or go on

``dist/`` holds the model entries (``model.py``), "optimizer" (the distributed optimizer in its
fully reshardable form), "rng" (one object per TP x PP rank) and the common state: step, consumed
samples, scheduler, layout. Saved at one TP / PP / DP layout, it loads at any other (the RNG is
restored only at the same layout). A save is atomic: it goes to ``iter_X.tmp``, which rank 0
renames only after every rank has written, and ``latest`` moves after that (``directory.py``); a
run killed mid-save leaves the previous checkpoint as the newest complete one, and so does a save
that fails on any rank (a full disk, a writer process that died): every rank raises
``CheckpointWriteError``. A checkpoint whose files changed after it was written (``manifest.py``)
is passed over for the previous one, with a warning naming it.
"""

import json
import os
import queue
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies import filesystem_async
from torch.distributed.checkpoint.api import CheckpointException

from megatron_asvr.checkpoint.directory import (
    DIST,
    LATEST,
    MODEL_CONFIG,
    RUN_CONFIG,
    UNFINISHED,
    checkpoint_dir,
    prune,
    publish,
)
from megatron_asvr.checkpoint.manifest import write_manifest
from megatron_asvr.checkpoint.model import model_keys, sharded_model_state, unwrap_ddp
from megatron_asvr.runtime.waits import waiting_for

OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
WRITE_ERRORS = (OSError, EOFError, CheckpointException)  # a full disk, no permission, a writer helper gone


class CheckpointWriteError(RuntimeError):
    """A save failed on some rank; the message is one line (which checkpoint, which rank, why)."""


@dataclass(frozen=True)
class TrainingProgress:
    """Where a loaded checkpoint left the run."""

    step: int
    consumed_samples: int
    same_layout: bool  # saved at this TP / PP / DP layout: the RNG was restored too


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
    shape = (parallel_state.get_pipeline_model_parallel_world_size(),
             parallel_state.get_tensor_model_parallel_world_size())
    return ShardedObject("rng_state", state, shape, (pp, tp), replica_id=parallel_state.get_data_parallel_rank())


def _training_state(model, optimizer, scheduler, step: int, consumed_samples: int, for_loading: bool) -> dict:
    state = sharded_model_state(model)
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=for_loading, metadata=OPTIMIZER_METADATA)
    state["scheduler"] = scheduler.state_dict()
    state["step"], state["consumed_samples"], state["layout"] = step, consumed_samples, _layout()
    return state


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())


def _in_process_writer_results() -> None:
    """Megatron's dist-checkpoint writers report through a queue which, for its asynchronous
    saves, a spawned manager process serves. Our saves are synchronous: the writing is driven from
    this process, which also reads the results, so an in-process queue serves, and no helper is
    left to outlive a killed rank or to die under a save (a BrokenPipeError deep in a save)."""
    if not isinstance(filesystem_async._results_queue, queue.Queue):
        filesystem_async._results_queue = queue.Queue()


def _describe(err: BaseException) -> str:
    """One line: the failure itself, not dist checkpointing's wrapping of it."""
    if isinstance(err, CheckpointException) and err.failures:
        rank, (inner, _) = next(iter(err.failures.items()))
        return f"rank {rank}: {_describe(inner.__cause__ or inner)}"
    return " ".join(f"{type(err).__name__}: {err}".split())


def _agree(name: str, part: str, error: Optional[BaseException]) -> None:
    """Every rank learns whether any rank's ``part`` of saving ``name`` failed (collective)."""
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, None if error is None else _describe(error))  # host sync, 3 per save
    failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
    if failed:
        rank, reason = failed[0]
        where = "" if reason.startswith("rank ") else f"rank {rank}: "
        raise CheckpointWriteError(f"checkpoint {name} was not written ({part}: {where}{reason})")


def _attempt(part: str, name: str, action, on_rank_0_only: bool = False) -> None:
    """Run this rank's share of ``part`` of the save, then agree with every rank on its outcome."""
    error = None
    if not on_rank_0_only or dist.get_rank() == 0:
        try:
            action()
        except WRITE_ERRORS as err:
            error = err
    _agree(name, part, error)


def save_training(
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
    """Save everything needed to resume exactly (collective); return the checkpoint directory.

    A write that fails on any rank raises ``CheckpointWriteError`` on every rank, with the
    temporary directory removed and ``latest`` unchanged.
    """
    final = checkpoint_dir(save_dir, step)
    tmp = final.with_name(final.name + UNFINISHED)

    def prepare():
        shutil.rmtree(tmp, ignore_errors=True)  # a previous attempt killed mid-write
        (tmp / DIST).mkdir(parents=True)

    def write():
        _in_process_writer_results()
        state = _training_state(model, optimizer, scheduler, step, consumed_samples, for_loading=False)
        state["rng"] = _sharded_rng(_rng_state())
        dist_checkpointing.save(state, str(tmp / DIST))
        if dist.get_rank() == 0:  # every rank's files are written: dist checkpointing's last barrier
            _write_json(tmp / MODEL_CONFIG, model_config)
            _write_json(tmp / RUN_CONFIG, run_config)
            write_manifest(tmp)

    _attempt("creating its directory", final.name, prepare, on_rank_0_only=True)
    try:
        _attempt("writing", final.name, write)
    except CheckpointWriteError:
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _attempt("publishing it as latest", final.name, lambda: publish(tmp, save_dir), on_rank_0_only=True)
    if dist.get_rank() == 0:
        prune(Path(save_dir), keep_last)
    dist.barrier()
    return final


def save_retried(save: Callable[[], Path], save_dir: Path, step: int, on_failure: str) -> Optional[Path]:
    """``save()`` (every rank's ``save_training`` of ``step``), retried once if it fails; then, per
    ``on_failure`` (``train.save_failure``), stop (``CheckpointWriteError``) or train on (None).
    ``latest`` keeps the last checkpoint written."""
    name = checkpoint_dir(save_dir, step).name
    for retry in (False, True):
        try:
            with waiting_for("every rank and this rank's checkpoint writers", f"the save of {name}"):
                return save()
        except CheckpointWriteError as err:
            failure = err
            if dist.get_rank() == 0 and not retry:
                print(f"{err}; retrying once", flush=True)
    pointer = Path(save_dir) / LATEST
    kept = f"latest is still {pointer.read_text()}" if pointer.is_file() else "no checkpoint was written yet"
    if on_failure == "stop":
        raise CheckpointWriteError(f"{failure}, twice; stopped (train.save_failure=stop); {kept}") from failure
    if dist.get_rank() == 0:
        print(f"{failure}, twice; training on (train.save_failure=continue); {kept}", flush=True)
    return None


def load_training(directory: Path, model, optimizer, scheduler) -> TrainingProgress:
    """Restore model, optimizer, scheduler (and RNG when the layout is unchanged) (collective)."""
    path = str(Path(directory) / DIST)
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
    return TrainingProgress(int(loaded["step"]), int(loaded["consumed_samples"]), same_layout)
