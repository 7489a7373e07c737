"""Multi-node starts and ends: a lost node replaced (at the size of an all-reduce; the tiny model's
job, too slow for CI, is scripts/node_loss_check.py), the ranks' store handshake on a store that
outlives attempts, and the torchrun wrapper's one-line endings (launch/torchrun_wrapper.py)."""

import json
import random
import re
import runpy
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from megatron_asvr.runtime import job_store
from tests.support.node_loss import lose_a_node

ROOT = Path(__file__).resolve().parents[1]
ENV = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def test_a_lost_node_is_replaced_and_the_job_ends_as_an_uninterrupted_one(tmp_path):
    """Two nodes of one rank each on this machine, each started through launch/multinode.sh (torchrun's
    c10d rendezvous on localhost through launch/torchrun_wrapper.py, --max-restarts 1), each rank adding
    up one number per step (tests/support/node_worker.py). Node 1, agent and worker, is SIGKILLed after
    a random step: node 0's rank exits with one line, its agent restarts it (restart count 1) and waits
    in the rendezvous; node 1's launcher started again (its agent counts 0) joins; the ranks agree on
    a start (runtime/job_store.py), resume at the last saved step and end with the uninterrupted sum.
    No process is left."""
    steps = 10
    job = lose_a_node(ROOT / "tests/support/node_worker.sh", random.randrange(2, steps - 2), ENV,
                      args=["--work", tmp_path, "--steps", steps])
    assert job.returncodes == [0, 0], "\n\n".join(output[-3000:] for output in job.outputs)
    assert not job.survivors, f"processes outlived the job: {job.survivors}"
    lost = re.findall(r"^node_worker: error: rank 0: lost the other node's rank during step (\d+)'s all-reduce .*; "
                      r"another rank ended$", job.outputs[0], re.MULTILINE)
    resumed = re.findall(r"^resumed at step (\d+)$", job.outputs[0], re.MULTILINE)
    assert len(lost) == 1 and resumed == [str(int(lost[0]) - 1)], job.outputs[0][-3000:]
    assert int(resumed[0]) >= job.killed_after
    assert (tmp_path / "progress").read_text() == f"{steps} {3 * steps * (steps + 1) // 2}"
    assert re.search(f"^step {steps}/{steps}$", job.outputs[0], re.MULTILINE)


def _start(port: int, world_size: int, delays: dict) -> list:
    """Every rank's token, each rank a client of the store on ``port``, rank r starting ``delays[r]`` s late."""
    tokens = [None] * world_size

    def rank(r):
        time.sleep(delays.get(r, 0))
        client = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=20))
        tokens[r] = job_store.agree_on_start(client, r, world_size)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tokens


def test_ranks_agree_on_a_start_whatever_earlier_starts_left_in_the_store():
    """A store kept across attempts (as torchrun's agents keep theirs): rank 1's hello from a start that
    died is still there when rank 0 of the next start looks, and rank 2 of that start never said hello.
    The ranks of each start agree on one token, a new one each start; the stale hello got an answer
    that nobody waited for."""
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=20))
    server.set(f"{job_store.KEY}/hello/1", "stale")
    server.set(f"{job_store.KEY}/hello/2", "older")
    first = _start(server.port, 3, {1: 0.3, 2: 0.5})
    assert len(set(first)) == 1 and first[0] is not None
    assert server.get(f"{job_store.KEY}/welcome/stale").decode() == first[0]
    second = _start(server.port, 3, {0: 0.3})  # rank 0 last: the others wait for its answer
    assert len(set(second)) == 1 and second[0] not in (None, first[0])
    (alone,) = _start(server.port, 1, {})  # one rank: its own token at once
    assert alone not in (None, first[0], second[0])

WRAPPER = ROOT / "launch/torchrun_wrapper.py"


def test_a_signalled_job_ends_in_one_line_with_status_0_only_if_every_worker_saved(tmp_path):
    after_signal = runpy.run_path(str(WRAPPER))["after_signal"]

    def report(local_rank, saved):
        (tmp_path / f"{local_rank}.json").write_text(json.dumps({"local_world_size": 2, "saved": saved}))

    assert after_signal(signal.SIGTERM, tmp_path, "2") == (
        "torchrun: stopped by SIGTERM: 0 of 2 worker(s) of this node saved the step they stopped at and exited (the "
        "others did not, or not within --shutdown-timeout); the same command resumes from the newest complete "
        "checkpoint", 143)
    report(0, "iter_0000013")
    assert after_signal(signal.SIGTERM, tmp_path, "2")[1] == 143
    report(1, None)  # ended normally, its last step not saved (train.save_failure=continue)
    assert after_signal(signal.SIGINT, tmp_path, "2")[0].startswith("torchrun: stopped by SIGINT: 1 of 2 worker(s)")
    report(1, "iter_0000013")
    assert after_signal(signal.SIGTERM, tmp_path, "2") == (
        "torchrun: stopped by SIGTERM: the 2 worker(s) of this node saved iter_0000013 and exited; the same "
        "command resumes from it", 0)


def test_a_job_out_of_restarts_ends_in_one_line(tmp_path):
    """A worker that fails every time (/bin/false) under --max-restarts 1: torchrun's traceback and
    table become one line."""
    job = subprocess.run([sys.executable, WRAPPER, "--nproc_per_node", "1", "--max-restarts", "1",
                          "--monitor-interval", "0.05", "--no-python", "false"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert job.returncode == 1 and "Traceback" not in job.stderr, job.stderr[-3000:]
    last = job.stderr.splitlines()[-1]
    assert re.fullmatch(r"torchrun: worker rank 0 \(pid \d+\) exited with status 1, and no restart is left "
                        r"\(--max-restarts 1, all used\): the job ends", last), job.stderr[-3000:]
    assert job.stderr.count("failed (exitcode: 1)") == 2  # torch's own line, for each attempt
