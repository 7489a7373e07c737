"""CPU emulation of the CUDA calls megatron-core makes, so its real TP/PP/DP code runs on CPU.

This is the only module in the project that knows about it. ``install()`` is a
no-op when CUDA is available; on a CPU-only machine it makes, for the whole
process:

- ``torch.cuda.current_device()`` return ``"cpu"`` (megatron passes it as a
  ``device=`` argument in layers, buffers and p2p communication);
- any ``device="cuda"`` / ``cuda:N`` / device-index argument of a torch
  function, and ``Tensor.to("cuda")``, mean the CPU (a ``TorchFunctionMode``);
  ``Tensor.cuda()`` / ``Module.cuda()`` and ``pin_memory`` become no-ops;
- streams, events and ``synchronize`` / ``empty_cache`` no-ops;
- the CUDA RNG be the CPU default generator, so megatron's
  ``CudaRNGStatesTracker`` (model-parallel seeds, dropout forks, recompute)
  works unchanged and stays reproducible;
- ``Tensor.type()`` report ``torch.cuda.*Tensor`` strings for CPU tensors (the
  optimizers and grad clipping check those strings).

The device rewrite only happens while the mode is on the torch-function stack
of the thread that called ``install()`` (the main thread, which also runs
autograd for CPU tensors).
"""

import logging
import threading
from contextlib import nullcontext

import torch
from torch.overrides import TorchFunctionMode

_INSTALLED = False
_LOCK = threading.Lock()


def is_active() -> bool:
    """True when the emulation has been installed in this process."""
    return _INSTALLED


def install() -> bool:
    """Install the emulation if no GPU is present; return whether it is active."""
    global _INSTALLED
    if torch.cuda.is_available():
        return False
    with _LOCK:
        if not _INSTALLED:
            _patch_cuda_namespace()
            _patch_tensor_and_module()
            _patch_megatron_rng()
            _CudaToCpuMode().__enter__()  # stays on the stack for the process lifetime
            _INSTALLED = True
    return True


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of every torch call to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to:
            args = tuple("cpu" if i > 0 and _is_cuda_device(a) else a for i, a in enumerate(args))
        elif func is torch.Tensor.pin_memory:
            return args[0]
        return func(*args, **kwargs)


class _Stream:
    """Stand-in for torch.cuda.Stream: work on CPU is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event or _Event()

    def synchronize(self):
        pass

    def query(self):
        return True


class _Event:
    """Stand-in for torch.cuda.Event; timing events report 0 ms."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, end_event):
        return 0.0


def _noop():
    """A fresh do-nothing function: torch._dynamo rejects one object patched in under two names."""
    return lambda *args, **kwargs: None


def _patch_cuda_namespace():
    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.synchronize = _noop()
    cuda.empty_cache = _noop()
    cuda.set_device = _noop()
    cuda.Stream = _Stream
    cuda.Event = _Event
    cuda.current_stream = lambda device=None: _Stream()
    cuda.default_stream = lambda device=None: _Stream()
    cuda.set_stream = _noop()
    cuda.stream = lambda stream=None: nullcontext()
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    # The CPU generator itself: torch.manual_seed calls cuda.manual_seed_all.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        setattr(cuda, name, lambda device=None: 0)
    cuda.reset_peak_memory_stats = _noop()
    cuda.nvtx.range_push = _noop()
    cuda.nvtx.range_pop = _noop()


def _patch_tensor_and_module():
    tensor_type = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = tensor_type(self)  # may already be rewritten: the mode re-enters this wrapper
            if self.device.type == "cpu" and not name.startswith("torch.cuda."):
                name = name.replace("torch.", "torch.cuda.", 1)
            return name
        if isinstance(dtype, str):
            dtype = dtype.replace("torch.cuda.", "torch.", 1)
        return tensor_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.nn.Module.cuda = lambda self, device=None: self


def _patch_megatron_rng():
    from megatron.core.tensor_parallel import random as mp_random

    mp_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: (
        torch.get_rng_state()
    )
    mp_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: (
        torch.set_rng_state(new_state)
    )
    # The tracker warns when the CPU RNG moves inside a CUDA-RNG fork; here the two
    # generators are the same one, so every dropout in a fork would trigger it.
    logging.getLogger(mp_random.__name__).addFilter(
        lambda record: "CPU RNG state changed within GPU RNG context" not in record.getMessage()
    )
