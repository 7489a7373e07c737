"""The torchrun jobs of the fault tests (tests/test_fault_tolerance.py, tests/test_preemption.py): 2 CPU
ranks (gloo) at TP=2 on the tiny run, STEPS steps with a save every SAVE_INTERVAL; the uninterrupted
reference job; bitwise comparison of final checkpoints."""

import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from megatron_asvr.config import ParallelConfig, to_dict
from tests.support.tiny_run import tiny_run_config
from tests.support.torchrun_job import run_torchrun

ROOT = Path(__file__).resolve().parents[2]
STEPS, SAVE_INTERVAL = 8, 2
TIMEOUT_S = 20  # train.distributed_timeout_minutes in the torchrun jobs
ENV = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
WRAPPED_TORCHRUN = [sys.executable, ROOT / "launch/torchrun_wrapper.py"]  # as launch/multinode.sh runs it


def fault_config(tiny_root, save_dir, parallel=ParallelConfig(tensor_parallel=2), num_workers=1, **train):
    """The tiny run's config for a fault job: STEPS steps, a save every SAVE_INTERVAL, the hang guard TIMEOUT_S."""
    train = {"steps": STEPS, "save_interval": SAVE_INTERVAL, "keep_last": 3,
             "distributed_timeout_minutes": TIMEOUT_S / 60, **train}
    config = tiny_run_config(tiny_root, save_dir, **train)
    data = dataclasses.replace(config.data, num_workers=num_workers)
    return dataclasses.replace(config, parallel=parallel, data=data)


def write_recipe(tiny_root, work: Path) -> Path:
    """``work``/run.yaml: fault_config saving into ``work``/run."""
    path = work / "run.yaml"
    path.write_text(yaml.safe_dump(to_dict(fault_config(tiny_root, work / "run"))))
    return path


def checkpoint_state(checkpoint: Path) -> dict:
    """Every entry of a checkpoint: its dist checkpoint's tensors and objects, and its common state."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = checkpoint / "flat.pt"
    dcp_to_torch_save(checkpoint / "dist", flat)
    state = torch.load(flat, weights_only=False)
    flat.unlink()
    return {**state, **torch.load(checkpoint / "dist/common.pt", weights_only=False)}


def same(a, b) -> bool:
    """Bitwise equality, through dicts, sequences, tensors and arrays."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return a == b


def assert_same_final_state(reference: Path, run: Path) -> None:
    final = f"iter_{STEPS:07d}"
    assert (run / "latest").read_text() == final
    a, b = checkpoint_state(reference / final), checkpoint_state(run / final)
    assert sorted(a) == sorted(b)
    assert any(k.startswith("optimizer.state.exp_avg") for k in a)
    different = [k for k in a if not same(a[k], b[k])]
    assert not different, different[:5]


def run_reference(tiny_root, work: Path) -> None:
    """The uninterrupted job, launched through a launcher: torchrun hands launch/pretrain_7b.sh to Python;
    it saves into ``work``/run (write_recipe)."""
    job = run_torchrun([ROOT / "launch/pretrain_7b.sh"], env={**ENV, "RECIPE": str(write_recipe(tiny_root, work))})
    assert job.returncode == 0, job.output[-4000:]
    assert f"step {STEPS}/{STEPS} |" in job.output and "resumed" not in job.output
    assert not job.survivors
