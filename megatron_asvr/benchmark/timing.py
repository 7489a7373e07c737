"""Device-exact timestamps, and the forward + backward time of chosen modules from hooks."""

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
