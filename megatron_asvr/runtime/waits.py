"""Waits on other ranks, each named, and the watchdog that ends a rank whose wait outlasts the timeout.

    watchdog = Watchdog(rank, timeout_s).start()
    with waiting_for("the data-parallel group", "step 12's all-reduce"):
        dist.all_reduce(facts)

A stalled peer (SIGSTOP, a hung GPU, a node whose sockets stay open) never answers, and torchrun
cannot tell a rank waiting on it from a working one. The watchdog thread looks at the wait in
progress once a second; past the timeout it prints one line naming it, e.g.

    rank 0: no answer from the data-parallel group within 20 s during step 12's all-reduce
        (train.distributed_timeout_minutes)

and ends the process (exit code 1), so that torchrun restarts the job or ends it. The process
groups' own timeout (gloo, NCCL) is ``BACKSTOP`` times longer, for a wait outside any named one.
A peer that died is noticed at once by the collective (its connection resets): ``waiting_for``
turns that error into one line too (``PeerLost``). The watchdog also reports a step that runs
``slow_factor`` times longer than the median of the recent ones (a warning: the run goes on).
"""

import os
import statistics
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

SETTING = "train.distributed_timeout_minutes"
BACKSTOP = 1.5  # the process groups' timeout, in watchdog timeouts
RECENT_STEPS = 50  # step times the median is taken over
MIN_STEPS_FOR_MEDIAN = 5


class PeerLost(RuntimeError):
    """A collective failed because another rank is gone; the message is one line naming the wait."""


@dataclass(frozen=True)
class Wait:
    peers: str  # whom the rank waits for: "the data-parallel group"
    during: str  # what it is doing: "step 12's all-reduce"
    since: float  # _clock() (time.monotonic) when it began


_current: Optional[Wait] = None  # set by the main thread, read by the watchdog
_clock = time.monotonic


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _is_peer_failure(err: BaseException) -> bool:
    """A collective's error caused by another rank: gloo's transport errors (plain RuntimeErrors
    naming gloo's source) and torch's distributed errors (NCCL, the store)."""
    return isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and "/gloo/" in str(err))


@contextmanager
def waiting_for(peers: str, during: str):
    """Name the wait on ``peers`` the block makes (nested waits restore the outer one); a peer
    failure inside becomes ``PeerLost``."""
    global _current
    outer, _current = _current, Wait(peers, during, _clock())
    try:
        yield
    except RuntimeError as err:
        if not _is_peer_failure(err) or isinstance(err, PeerLost):
            raise
        cause = " ".join(str(err).split())[:200]
        raise PeerLost(f"rank {_rank()}: lost {peers} during {during} ({cause}); another rank ended") from err
    finally:
        _current = outer


class Watchdog:
    """A daemon thread that ends this rank when a named wait outlasts ``timeout_s`` and reports
    steps slower than ``slow_factor`` x the median (0: no report)."""

    def __init__(self, rank: int, timeout_s: float, slow_factor: float = 0.0, interval_s: float = 1.0):
        self.rank, self.timeout_s, self.slow_factor, self.interval_s = rank, timeout_s, slow_factor, interval_s
        self._step: Optional[tuple] = None  # (step, started), while one runs
        self._reported_step: Optional[int] = None
        self._durations = deque(maxlen=RECENT_STEPS)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="asvr-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    @contextmanager
    def step(self, number: int):
        """Time step ``number`` (the median the slow-step report compares with)."""
        started = _clock()
        self._step = (number, started)
        try:
            yield
        finally:
            self._step = None
            self._durations.append(_clock() - started)

    def check(self, now: float) -> tuple:
        """(line ending the rank or None, warning line or None) at time ``now``."""
        wait, step = _current, self._step
        fatal = None
        if wait is not None and now - wait.since > self.timeout_s:
            fatal = (f"rank {self.rank}: no answer from {wait.peers} within {self.timeout_s:.0f} s "
                     f"during {wait.during} ({SETTING})")
        warning = None
        if (step is not None and self.slow_factor and len(self._durations) >= MIN_STEPS_FOR_MEDIAN
                and step[0] != self._reported_step):
            median = statistics.median(self._durations)
            running = now - step[1]
            if running > self.slow_factor * median:
                self._reported_step = step[0]
                doing = f", during {wait.during}" if wait is not None else ""
                warning = (f"rank {self.rank}: step {step[0]} has run {running:.1f} s, more than "
                           f"{self.slow_factor:g} x the median step ({median:.2f} s){doing}")
        return fatal, warning

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            fatal, warning = self.check(_clock())
            if warning:
                print(warning, file=sys.stderr, flush=True)
            if fatal:
                print(fatal, file=sys.stderr, flush=True)
                sys.stdout.flush()
                os._exit(1)  # the main thread is stuck in the wait: nothing else can end the process
