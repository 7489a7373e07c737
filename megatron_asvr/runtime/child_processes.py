"""A rank's helper processes end with the rank.

A rank forks helpers: DataLoader workers and dist-checkpointing's writer processes. When
torchrun stops a worker it signals the worker's whole process group, but a worker that died
(SIGKILL, OOM) is not stopped, and its helpers lived on as orphans holding memory and ports.
Linux's parent-death signal ends a helper when the rank that forked it ends, however it ends:
``install`` arms it in every child forked from this process. (The spawned helpers the orphans
used to include, megatron's writer-results manager and multiprocessing's resource tracker, are
no longer started: ``checkpoint.training_state`` gives megatron an in-process queue.) Elsewhere than
Linux this is a no-op.
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


def _die_with_parent() -> None:
    """In a forked child: the kernel SIGKILLs it when the parent ends; it ends now if the parent has."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != _forking_parent:  # the parent ended before the signal was armed
        os._exit(1)


def install() -> None:
    """Every process forked from this one from now on ends when this one does (once per process)."""
    global _installed
    if not _installed and sys.platform.startswith("linux"):
        os.register_at_fork(before=_remember_parent, after_in_child=_die_with_parent)
        _installed = True
