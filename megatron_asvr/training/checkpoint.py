"""Training checkpoints through megatron's dist_checkpointing (torch_dist format).

Layout of a save directory::

    latest                 name of the newest complete checkpoint (updated last)
    iter_0000100/
        model_config.json  the model's ModelConfig (what the HF converter reads)
        run_config.json    the whole RunConfig of the run that wrote it
        manifest.json      every file's size (and small files' hashes) as written
        dist/              dist checkpoint: "model" (or "model0", ... per virtual stage),
                           "optimizer", "rng" (per TP x PP rank), and common state:
                           step, consumed samples, scheduler, layout

Tensors are keyed layout-independently (global layer numbers, full shapes with
each rank's shard offsets; the distributed optimizer in its fully reshardable
form), so a checkpoint written at one TP / PP / DP layout loads at any other.
A save is atomic: it goes to ``iter_X.tmp``, which rank 0 renames only after
every rank has written, and ``latest`` moves after that; a run killed mid-save
leaves the previous checkpoint as the newest complete one, and so does a save that fails on
any rank (a full disk, a writer process that died): every rank raises ``CheckpointWriteError``.
A checkpoint whose files changed after it was written (``checkpoint_integrity``) is passed over
for the previous one, with a warning naming it.
"""

import json
import os
import queue
import random
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies import filesystem_async
from torch.distributed.checkpoint.api import CheckpointException

from megatron_asvr.checkpoint_format import DIST, MODEL_CONFIG, load_model, model_keys, sharded_model_state, unwrap_ddp
from megatron_asvr.training.checkpoint_integrity import damage, write_manifest

LATEST = "latest"
RUN_CONFIG = "run_config.json"
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
WRITE_ERRORS = (OSError, EOFError, CheckpointException)  # a full disk, no permission, a writer helper gone


class CheckpointWriteError(RuntimeError):
    """A save failed on some rank; the message is one line (which checkpoint, which rank, why)."""

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
    """``latest`` if it names a complete, undamaged checkpoint, else the newest such ``iter_*``;
    each damaged one passed over is named in a warning."""
    save_dir = Path(save_dir)
    pointer = save_dir / LATEST
    named = save_dir / pointer.read_text().strip() if pointer.is_file() else None
    candidates = sorted((p for p in save_dir.glob("iter_*") if p.is_dir() and p.suffix != ".tmp"), reverse=True)
    for directory in ([named] if named else []) + [p for p in candidates if p != named]:
        if not is_complete(directory):
            continue
        problem = damage(directory)
        if problem is None:
            return directory
        print(f"warning: checkpoint {directory} is damaged ({problem}): passed over",
              file=sys.stderr, flush=True)
    return None


def remove_incomplete(save_dir: Path) -> List[str]:
    """Delete what saves that never finished left in ``save_dir`` (``iter_*.tmp``, ``latest.tmp``);
    return their names. Only while no rank is saving (at start-up, on one rank)."""
    leftovers = sorted(Path(save_dir).glob("iter_*.tmp")) + sorted(Path(save_dir).glob(LATEST + ".tmp"))
    for path in leftovers:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return [p.name for p in leftovers]


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
    """Save everything needed to resume exactly (collective); return the checkpoint directory.

    A write that fails on any rank raises ``CheckpointWriteError`` on every rank, with the
    temporary directory removed and ``latest`` unchanged.
    """
    final = checkpoint_dir(save_dir, step)
    tmp = final.with_name(final.name + ".tmp")

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

    def publish():
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer_tmp = Path(save_dir) / (LATEST + ".tmp")
        pointer_tmp.write_text(final.name)
        os.replace(pointer_tmp, Path(save_dir) / LATEST)

    _attempt("creating its directory", final.name, prepare, on_rank_0_only=True)
    try:
        _attempt("writing", final.name, write)
    except CheckpointWriteError:
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _attempt("publishing it as latest", final.name, publish, on_rank_0_only=True)
    if dist.get_rank() == 0:
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
