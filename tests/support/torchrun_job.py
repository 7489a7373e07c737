"""A torchrun job from pytest, watched: its output, exit code, and the processes it left alive.

    job = run_torchrun(["tests/support/faults.py", "--config", "run.yaml"], max_restarts=1, env={...})
    job.returncode, job.output, job.survivors

Every process the job starts (workers and their helpers) is recorded while it runs, every
``POLL_S``; ``survivors`` are those still alive ``grace`` seconds after torchrun ended.
``on_poll(output so far, processes)`` runs at every poll (e.g. to SIGCONT a stopped worker). A
job still running after ``timeout`` seconds is killed with all it started and reported as hung.
"""

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import psutil

from megatron_asvr.runtime.ports import free_port

POLL_S = 0.2


@dataclass
class TorchrunJob:
    returncode: int
    output: str
    survivors: List[str]  # "pid: command line" of the job's processes alive after it ended


def _record(root: psutil.Process, seen: Dict[int, psutil.Process]) -> None:
    try:
        for child in root.children(recursive=True):
            seen.setdefault(child.pid, child)
    except psutil.NoSuchProcess:
        pass


def _alive(processes) -> List[psutil.Process]:
    alive = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def _describe(p: psutil.Process) -> str:
    try:
        return f"{p.pid}: {' '.join(p.cmdline())[:160]}"
    except psutil.Error:
        return f"{p.pid}: ?"


def survivors(seen: Dict[int, psutil.Process], grace: float) -> List[str]:
    """"pid: command line" of the ``seen`` processes still alive ``grace`` seconds after their job
    ended; they are killed then, not to be left to the next test."""
    deadline = time.monotonic() + grace
    while _alive(seen.values()) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    alive = _alive(seen.values())
    described = [_describe(p) for p in alive]
    for p in alive:
        p.kill()
    return described


def run_torchrun(args: Sequence[str], nproc: int = 2, max_restarts: int = 0, env: Optional[dict] = None,
                 timeout: float = 300.0, grace: float = 5.0,
                 on_poll: Optional[Callable[[str, List[psutil.Process]], None]] = None,
                 torchrun: Sequence[str] = ()) -> TorchrunJob:
    """``torchrun --nproc_per_node nproc --max-restarts max_restarts <args>`` on a free port, watched;
    ``torchrun``: the command that runs it instead of this Python's torchrun (a wrapper of it)."""
    torchrun = [*map(str, torchrun)] or [str(Path(sys.executable).with_name("torchrun"))]
    command = [*torchrun, "--nproc_per_node", str(nproc), "--max-restarts", str(max_restarts),
               "--master_port", str(free_port()), *map(str, args)]
    # append mode: the job's processes share the file's offset with this one, which seeks to 0 to read
    # what they wrote so far; without O_APPEND their next lines would overwrite its head
    with tempfile.TemporaryFile("a+") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        root, seen, started = psutil.Process(proc.pid), {}, time.monotonic()
        while proc.poll() is None:
            _record(root, seen)
            if on_poll is not None:
                log.seek(0)
                on_poll(log.read(), _alive(seen.values()))
            if time.monotonic() - started > timeout:
                for p in [root, *_alive(seen.values())]:
                    p.kill()
                log.seek(0)
                raise AssertionError(f"torchrun job hung: running after {timeout:.0f} s\n{log.read()[-4000:]}")
            time.sleep(POLL_S)
        described = survivors(seen, grace)
        log.seek(0)
        return TorchrunJob(proc.returncode, log.read(), described)
