"""tools/train.py with faults injected, for the fault-tolerance tests under torchrun.

    ASVR_FAULTS="kill_in_step:5:1,stall:3:1@1" torchrun --nproc_per_node 2 --max-restarts 2 \
        tests/support/faults.py --config run.yaml

ASVR_FAULTS holds comma-separated faults (one may repeat), each firing in one attempt of the torchrun
job (TORCHELASTIC_RESTART_COUNT): ``@N`` names it, the first attempt (0) by default; an attempt
without faults runs clean. Each attempt's ranks first print ``[faults] attempt N: rank R``.

    kill_in_step:STEP:RANK      SIGKILL after STEP's forward and backward, before its all-reduce
    kill_in_save:STEP:RANK      SIGKILL once the rank's shards of checkpoint STEP are written, before it is published
    stall:STEP:RANK             SIGSTOP when STEP's batches are asked for
    enospc:STEP:RANK:TIMES      the checkpoint writer fails with ENOSPC in the first TIMES saves of STEP
    kill_writer:STEP:RANK       a checkpoint writer process of STEP's save is SIGKILLed while it writes
    preempt:STEP:RANK           SIGTERM to torchrun when STEP's batches are asked for (a scheduler's stop)
    preempt_all:STEP:RANK       SIGTERM to torchrun and every process it started, at once (as Slurm does)
    kill_agent:STEP:RANK        SIGKILL to torchrun alone (the OOM killer, a scheduler killing the launcher)
"""

import errno
import functools
import os
import runpy
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def attempt() -> int:
    """This torchrun attempt: 0, then 1, 2, ... after each restart."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def _faults() -> list:
    """[(fault, (step, rank, *more))] of this attempt, from ASVR_FAULTS."""
    faults = []
    for spec in filter(None, os.environ.get("ASVR_FAULTS", "").split(",")):
        spec, _, when = spec.partition("@")
        fault, *numbers = spec.split(":")
        if int(when or 0) == attempt():
            faults.append((fault, tuple(int(n) for n in numbers)))
    return faults


def _fault(faults: list, name: str, step: int):
    """The fault ``name`` for ``step`` on this rank, or None."""
    rank = int(os.environ["RANK"])
    return next((numbers for k, numbers in faults if k == name and numbers[:2] == (step, rank)), None)


def _die(sig: int) -> None:
    print(f"[faults] rank {os.environ['RANK']}: {signal.Signals(sig).name}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), sig)


def _signal_agent(sig: int, everyone: bool = False) -> None:
    """``sig`` to this worker's torchrun agent, and with ``everyone`` to all the agent's descendants."""
    import psutil

    agent = psutil.Process(os.getppid())
    targets = [agent, *agent.children(recursive=True)] if everyone else [agent]
    print(f"[faults] rank {os.environ['RANK']}: {signal.Signals(sig).name} to "
          f"{'the job' if everyone else 'torchrun'}", file=sys.stderr, flush=True)
    for process in targets:
        process.send_signal(sig)


def install(faults: list) -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_asvr.data.loader import TrainLoader
    from megatron_asvr.checkpoint import training_state
    from megatron_asvr.training.trainer import Trainer

    over_the_job, next_step = Trainer._over_the_job, TrainLoader.next_step
    dist_save, write_item = training_state.dist_checkpointing.save, filesystem_async._write_item
    saves = {}  # step -> saves of it so far
    failing = {"writes": False, "writer": False}

    def faulty_over_the_job(self, *args):
        if _fault(faults, "kill_in_step", self.step + 1):
            _die(signal.SIGKILL)
        return over_the_job(self, *args)

    def faulty_next_step(self):
        step = self.consumed_samples // self.order.global_batch + 1
        if _fault(faults, "stall", step):
            _die(signal.SIGSTOP)
        if _fault(faults, "preempt", step):
            _signal_agent(signal.SIGTERM)
        if _fault(faults, "preempt_all", step):
            _signal_agent(signal.SIGTERM, everyone=True)
        if _fault(faults, "kill_agent", step):
            _signal_agent(signal.SIGKILL)
        return next_step(self)

    def faulty_save(state, directory, *args, **kwargs):
        step = int(Path(directory).parent.name.split("_")[1].split(".")[0])
        saves[step] = saves.get(step, 0) + 1
        enospc = _fault(faults, "enospc", step)
        failing["writes"] = enospc is not None and saves[step] <= enospc[2]
        failing["writer"] = _fault(faults, "kill_writer", step) is not None
        result = dist_save(state, directory, *args, **kwargs)
        if _fault(faults, "kill_in_save", step):
            _die(signal.SIGKILL)
        return result

    @functools.wraps(write_item)  # megatron inspects its signature
    def faulty_write_item(*args, **kwargs):  # in the writer processes, forked after faulty_save set the flag
        if failing["writes"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if failing["writer"]:
            _die(signal.SIGKILL)
        return write_item(*args, **kwargs)

    Trainer._over_the_job, TrainLoader.next_step = faulty_over_the_job, faulty_next_step
    training_state.dist_checkpointing.save, filesystem_async._write_item = faulty_save, faulty_write_item


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print(f"[faults] attempt {attempt()}: rank {os.environ['RANK']}", flush=True)
    install(_faults())
    sys.argv[0] = str(ROOT / "tools/train.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
