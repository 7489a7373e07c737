"""A rank's helper processes end with the rank, and only with it.

A rank forks helpers: DataLoader workers and dist-checkpointing's writer processes. When
torchrun stops a worker it signals the worker's whole process group, but a worker that died
(SIGKILL, OOM) is not stopped, and its helpers lived on as orphans holding memory and ports.
Linux's parent-death signal ends a helper when the rank that forked it ends, however it ends:
``install`` arms it in every child forked from this process. (The spawned helpers the orphans
used to include, megatron's writer-results manager and multiprocessing's resource tracker, are
no longer started: ``checkpoint.training_state`` gives megatron an in-process queue.)

A preemption is SIGTERM to the whole job: torchrun passes it to each worker's process group, and
Slurm sends it to every process at once. The rank answers it by saving after the current step
(``training.loop``); its helpers must live until then, so they ignore SIGTERM and SIGINT, and end
with the rank by the parent-death signal (or torchrun's SIGKILL after its grace period).
The rank itself must not outlive its torchrun agent: an agent killed alone (the OOM killer, a
scheduler ending the launcher) left its worker training on with nobody watching it.
``stop_with_agent`` arms the parent-death signal of the rank as SIGTERM, answered like a
preemption. Elsewhere than Linux these are no-ops.
"""

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_installed = False
_forking_parent = None


def _remember_parent() -> None:
    global _forking_parent
    _forking_parent = os.getpid()


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """In a helper: leave SIGTERM and SIGINT to the rank. Also a DataLoader ``worker_init_fn``: its
    workers install a SIGTERM handler of their own after the fork, which this replaces (and a
    signal that came in between, held blocked since the fork, is discarded with it)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _die_with_parent() -> None:
    """In a forked child: the kernel SIGKILLs it when the parent ends; it ends now if the parent has.
    SIGTERM and SIGINT stay blocked for good: a DataLoader worker installs torch's SIGTERM handler
    before its ``worker_init_fn`` runs, and a preemption landing in that window killed the worker."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    ignore_stop_signals()
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != _forking_parent:  # the parent ended before the signal was armed
        os._exit(1)


def stop_with_agent() -> None:
    """Under torchrun: SIGTERM to this rank when its agent ends (once the loop's handler is in place,
    it saves after the current step and stops)."""
    if sys.platform.startswith("linux") and "TORCHELASTIC_RUN_ID" in os.environ:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() == 1:  # the agent ended before the signal was armed
            os.kill(os.getpid(), signal.SIGTERM)


def install() -> None:
    """Every process forked from this one from now on ends when this one does (once per process)."""
    global _installed
    if not _installed and sys.platform.startswith("linux"):
        os.register_at_fork(before=_remember_parent, after_in_child=_die_with_parent)
        _installed = True
