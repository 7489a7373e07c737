"""torchrun, ending in one line: ``python launch/torchrun_wrapper.py <torchrun's own arguments>``.

launch/multinode.sh runs torchrun through this file. It is torch's torchrun (torch.distributed.run) in
this process, with three differences:

- A stop signal. Schedulers preempt a job with SIGTERM, then SIGKILL after a grace period. torchrun
  passes the signal to its workers and gives them --shutdown-timeout seconds (default 30) to exit,
  then SIGKILLs them. After that it raises the signal as an exception: a traceback and exit status 1,
  although the workers saved and exited 0. Here the job ends with one line instead. The status is 0
  when every worker of this node saved the step it stopped at and exited (tools/train.py leaves a
  report in $ASVR_STOP_REPORTS). Otherwise it is 128 + the signal's number, as a shell reports a
  signalled process.
- A failure for good. A worker failed with no --max-restarts left, or the rendezvous or its store
  failed. torchrun prints a traceback and a table; here one line names the worker and the restarts
  used, with status 1. The workers' own one-line errors above it say why they failed.
- TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 unless it is set. With the c10d rendezvous, torch shares its
  rank-0 agent's store with the workers by default, and that agent keeps the store's address from
  the first round. A node that joins later (a lost node's replacement) waits for the address in the
  new round's keys until the rendezvous read timeout (60 s), and the job fails. Unshared, the
  rank-0 agent publishes a fresh address every round, and rank 0's worker hosts the store
  (``megatron_asvr.runtime.job_store``).
"""

import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.train import STOP_REPORTS  # noqa: E402


def after_signal(sig: int, reports: Path, nproc: str) -> tuple:
    """(line, exit status) of a job that torchrun stopped on signal ``sig``; ``reports``: the workers'."""
    ended = [json.loads(p.read_text()) for p in sorted(reports.glob("*.json"))]
    local = ended[0]["local_world_size"] if ended else nproc
    saved = {e["saved"] for e in ended}
    name = signal.Signals(sig).name
    if len(ended) == local and len(saved) == 1 and None not in saved:
        return (f"torchrun: stopped by {name}: the {local} worker(s) of this node saved {saved.pop()} and exited; "
                "the same command resumes from it"), 0
    done = sum(1 for e in ended if e["saved"])
    return (f"torchrun: stopped by {name}: {done} of {local} worker(s) of this node saved the step they stopped at "
            "and exited (the others did not, or not within --shutdown-timeout); the same command resumes from the "
            "newest complete checkpoint"), 128 + sig


def failed_for_good(first_rank: int, failure, max_restarts: int) -> str:
    """The line of a job whose worker ``first_rank`` failed (torch's ProcessFailure) with no restart left."""
    how = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0
           else f"exited with status {failure.exitcode}")
    return (f"torchrun: worker rank {first_rank} (pid {failure.pid}) {how}, and no restart is left "
            f"(--max-restarts {max_restarts}, all used): the job ends")


def _first_lines(err: BaseException) -> str:
    """The error and its causes, the first line of each (the store's errors carry C++ stack frames)."""
    parts = []
    while err is not None:
        text = str(err).strip()
        parts.append(f"{type(err).__name__}: {text.splitlines()[0] if text else ''}")
        err = err.__cause__
    return "; caused by ".join(parts)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # no signal: whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def _reports_folder() -> Path:
    """This torchrun's folder for its workers' reports, after removing those of torchruns that are gone
    (a SIGKILLed one cannot remove its own)."""
    for stale in Path(tempfile.gettempdir()).glob("asvr-stop-reports-*"):
        pid = stale.name.rsplit("-", 1)[1]
        if not pid.isdigit() or not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    folder = Path(tempfile.gettempdir(), f"asvr-stop-reports-{os.getpid()}")
    shutil.rmtree(folder, ignore_errors=True)  # a dead torchrun's with this pid
    folder.mkdir()
    return folder


def main(argv: list) -> int:
    from torch.distributed import DistError
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError

    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    args = torchrun.parse_args(argv)
    reports = _reports_folder()
    os.environ[STOP_REPORTS] = str(reports)  # the workers inherit it
    try:
        torchrun.run(args)
        return 0
    except SignalException as stop:
        line, status = after_signal(stop.sigval, reports, str(args.nproc_per_node))
    except ChildFailedError as failed:
        line, status = failed_for_good(*failed.get_first_failure(), args.max_restarts), 1
    except (RendezvousError, DistError) as err:
        line, status = f"torchrun: the rendezvous failed: {_first_lines(err)}", 1
    finally:
        shutil.rmtree(reports, ignore_errors=True)
    print(line, file=sys.stderr, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
