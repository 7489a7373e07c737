"""Device-exact timestamps, the forward + backward time of chosen modules from hooks, and the
optimizer's phase of a step from marks around its ``step``."""

import time
from functools import partial
from typing import Iterable, List, Tuple

import torch


class DeviceClock:
    """CUDA events on a GPU (the time the kernels took), ``perf_counter`` on CPU."""

    def __init__(self):
        self.cuda = torch.cuda.is_available()

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        """Between two marks; on a GPU, call ``synchronize`` first."""
        return start.elapsed_time(end) / 1e3 if self.cuda else end - start

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


class ModuleTimer:
    """Time inside some modules' forward and backward, from module hooks, until ``reset``.

    Backward is timed from the full backward pre-hook (gradients of the module's
    outputs ready) to the full backward hook (gradients of its inputs computed),
    so the module's inputs must require grad (true for the visual head whenever
    the LLM or the projector trains).
    """

    def __init__(self, modules: Iterable[torch.nn.Module], clock: DeviceClock):
        self.clock = clock
        self.intervals: List[Tuple[object, object]] = []
        self._open = {}
        self._handles = []
        for module in modules:
            for phase, start, stop in (
                ("forward", module.register_forward_pre_hook, module.register_forward_hook),
                ("backward", module.register_full_backward_pre_hook, module.register_full_backward_hook),
            ):
                key = (phase, id(module))
                self._handles += [start(partial(self._start, key)), stop(partial(self._stop, key))]

    def _start(self, key, *hook_args) -> None:
        self._open[key] = self.clock.mark()

    def _stop(self, key, *hook_args) -> None:
        self.intervals.append((self._open.pop(key), self.clock.mark()))

    def seconds(self) -> float:
        """Time recorded since the last ``reset`` (synchronizes the device)."""
        self.clock.synchronize()
        return sum(self.clock.seconds(start, end) for start, end in self.intervals)

    def reset(self) -> None:
        self.intervals.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class PhaseMarks:
    """Device marks around ``optimizer.step`` (an instance attribute wraps the bound method, as the
    trainer calls it; ``remove`` restores it): the optimizer's time in the last step."""

    def __init__(self, optimizer, clock: DeviceClock):
        self.optimizer, self.clock, self.interval = optimizer, clock, None
        step = optimizer.step

        def marked_step(*args, **kwargs):
            start = clock.mark()
            out = step(*args, **kwargs)
            self.interval = (start, clock.mark())
            return out

        optimizer.step = marked_step

    def seconds(self) -> float:
        """The last optimizer step's time (0 when the step was skipped); synchronizes the device."""
        interval, self.interval = self.interval, None
        if interval is None:
            return 0.0
        self.clock.synchronize()
        return self.clock.seconds(*interval)

    def remove(self) -> None:
        del self.optimizer.step  # the class's method again
