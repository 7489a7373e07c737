"""The worker of the small node-loss job (tests/test_multinode.py): what tools/train.py does when a node
is lost, at the size of one all-reduce per step.

    tests/support/node_worker.sh --work DIR --steps N     (each node; launch/multinode.sh's environment)

The ranks meet through ``megatron_asvr.runtime.job_store`` (the start every rank agrees on, whatever
each agent's restart count), resume from the newest "checkpoint" (DIR/progress: the step and the sum so
far, which rank 0 replaces after each step), and add up ``(rank + 1) x step`` over the job in one
all-reduce per step. A rank whose peer is gone exits 1 with one line (``runtime.waits.PeerLost``).
Uninterrupted or not, DIR/progress ends as ``N  3 x N (N + 1) / 2`` with two ranks.
"""

import argparse
import importlib.util
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

RUNTIME = Path(__file__).resolve().parents[2] / "megatron_asvr/runtime"


def _runtime_module(name: str):
    """megatron_asvr/runtime/<name>.py alone: the package's __init__ imports megatron-core, seconds of CPU
    at each of the job's worker starts that these two torch-only modules do not need."""
    spec = importlib.util.spec_from_file_location(f"node_worker_{name}", RUNTIME / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


job_store, waits = _runtime_module("job_store"), _runtime_module("waits")
PeerLost, waiting_for = waits.PeerLost, waits.waiting_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--step-seconds", type=float, default=0.3, help="a pause after each step")
    args = parser.parse_args()
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = timedelta(seconds=60)
    progress = args.work / "progress"
    try:
        with waiting_for("the other ranks", "start-up"):
            dist.init_process_group("gloo", store=job_store.connect(rank, world_size, timeout), rank=rank,
                                    world_size=world_size, timeout=timeout)
        step, total = map(int, progress.read_text().split()) if progress.exists() else (0, 0)
        if rank == 0 and step:
            print(f"resumed at step {step}", flush=True)
        while step < args.steps:
            value = torch.tensor([float((rank + 1) * (step + 1))])
            with waiting_for("the other node's rank", f"step {step + 1}'s all-reduce"):
                dist.all_reduce(value)
            step, total = step + 1, total + int(value.item())
            if rank == 0:
                (args.work / "progress.tmp").write_text(f"{step} {total}")
                (args.work / "progress.tmp").rename(progress)  # atomic: a step is saved whole or not at all
                print(f"step {step}/{args.steps}", flush=True)
            time.sleep(args.step_seconds)
        dist.destroy_process_group()
    except PeerLost as err:
        print(f"node_worker: error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
