"""Where checkpoints lie, and which one is the newest complete one.

A save directory (``train.save_dir``)::

    latest                 name of the newest complete checkpoint (written last, by a rename)
    iter_0000100/          one checkpoint:
        model_config.json  the model's ModelConfig (what conversion and evaluation read)
        run_config.json    the whole RunConfig of the run that wrote it (training only)
        manifest.json      every file's size (and small files' hashes) as written (manifest.py)
        dist/              megatron dist checkpoint (torch_dist): "model" (or "model0", ... per
                           virtual stage); training adds "optimizer", "rng" and its common state
        hf_vocab.json      optional: the llava-hf vocabulary (an import from llava-hf)
        tokenizer/         optional: the text tokenizer's files (an import from HF)
    iter_0000200.tmp/      a save in progress, or one that never finished

A checkpoint written by conversion is such an ``iter_*`` directory on its own. Tensors are keyed
independently of the layout, so a checkpoint written at one TP / PP / DP layout loads at any other.
"""

import shutil
import sys
from pathlib import Path
from typing import List, Optional

import torch.distributed as dist
from megatron.core import dist_checkpointing

from megatron_asvr.checkpoint.manifest import damage

LATEST = "latest"
MODEL_CONFIG = "model_config.json"
RUN_CONFIG = "run_config.json"
DIST = "dist"
HF_VOCAB = "hf_vocab.json"
TOKENIZER_DIR = "tokenizer"
UNFINISHED = ".tmp"  # suffix of a checkpoint (or ``latest``) being written


def checkpoint_dir(save_dir: Path, step: int) -> Path:
    return Path(save_dir) / f"iter_{step:07d}"


def is_complete(directory: Path) -> bool:
    """A checkpoint whose configs and dist metadata are all on disk."""
    directory = Path(directory)
    return (directory / MODEL_CONFIG).is_file() and dist_checkpointing.check_is_distributed_checkpoint(
        str(directory / DIST)
    )


def _finished(save_dir: Path) -> List[Path]:
    """The ``iter_*`` directories of ``save_dir`` that are not saves in progress, newest first."""
    return sorted((p for p in Path(save_dir).glob("iter_*") if p.is_dir() and p.suffix != UNFINISHED), reverse=True)


def find_latest(save_dir: Path) -> Optional[Path]:
    """``latest`` if it names a complete, undamaged checkpoint, else the newest such ``iter_*``;
    each damaged one passed over is named in a warning."""
    save_dir = Path(save_dir)
    pointer = save_dir / LATEST
    named = save_dir / pointer.read_text().strip() if pointer.is_file() else None
    for directory in ([named] if named else []) + [p for p in _finished(save_dir) if p != named]:
        if not is_complete(directory):
            continue
        problem = damage(directory)
        if problem is None:
            return directory
        print(f"warning: checkpoint {directory} is damaged ({problem}): passed over",
              file=sys.stderr, flush=True)
    return None


def resolve(path: Path) -> Path:
    """A checkpoint directory from a save directory (its newest complete checkpoint) or itself."""
    path = Path(path)
    if (path / LATEST).is_file() or any(path.glob("iter_*")):
        latest = find_latest(path)
        if latest is None:
            raise FileNotFoundError(f"{path} holds no complete checkpoint")
        return latest
    return path


def remove_unfinished(save_dir: Path) -> List[str]:
    """Delete what saves that never finished left in ``save_dir`` (``iter_*.tmp``, ``latest.tmp``);
    return their names. Only while no rank is saving (at start-up, on one rank)."""
    save_dir = Path(save_dir)
    leftovers = sorted(save_dir.glob("iter_*" + UNFINISHED)) + sorted(save_dir.glob(LATEST + UNFINISHED))
    for path in leftovers:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return [p.name for p in leftovers]


def newest_for_every_rank(save_dir: Path) -> Optional[Path]:
    """The newest complete, undamaged checkpoint in ``save_dir`` (None if there is none), the same on
    every rank (collective): rank 0 first clears what unfinished saves left, then chooses."""
    chosen = [None]
    if dist.get_rank() == 0:
        for name in remove_unfinished(save_dir):
            print(f"removed {Path(save_dir) / name}, left by a save that did not finish", flush=True)
        chosen = [find_latest(save_dir)]
    dist.broadcast_object_list(chosen, src=0)  # host sync, once at start-up
    return chosen[0]


def publish(unfinished: Path, save_dir: Path) -> Path:
    """Rename a fully written ``iter_X.tmp`` to ``iter_X``, then point ``latest`` at it (rank 0)."""
    final = unfinished.with_suffix("")
    shutil.rmtree(final, ignore_errors=True)
    unfinished.replace(final)
    pointer_tmp = Path(save_dir) / (LATEST + UNFINISHED)
    pointer_tmp.write_text(final.name)
    pointer_tmp.replace(Path(save_dir) / LATEST)
    return final


def prune(save_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (rank 0)."""
    complete = sorted(p for p in _finished(save_dir) if is_complete(p))
    for old in complete[: max(len(complete) - keep_last, 0)]:
        shutil.rmtree(old, ignore_errors=True)
