"""CPU emulation of the CUDA calls megatron-core makes, so its real TP/PP/DP code runs on CPU.

This is the only module in the project that knows about it. ``install()`` is a
no-op when CUDA is available; on a CPU-only machine it makes, for the whole
process:

- ``torch.cuda.current_device()`` return ``"cpu"`` (megatron passes it as a
  ``device=`` argument in layers, buffers and p2p communication);
- any ``device="cuda"`` / ``cuda:N`` / device-index argument of a torch
  function, and ``Tensor.to("cuda")``, mean the CPU (a ``TorchFunctionMode``);
  ``Tensor.cuda()`` / ``Module.cuda()`` are ``.to("cuda")``, ``pin_memory`` a no-op;
- streams, events and ``synchronize`` / ``empty_cache`` no-ops;
- the CUDA RNG be the CPU default generator, so megatron's
  ``CudaRNGStatesTracker`` (model-parallel seeds, dropout forks, recompute)
  works unchanged and stays reproducible;
- ``Tensor.type()`` report ``torch.cuda.*Tensor`` strings for CPU tensors (the
  optimizers and grad clipping check those strings).

The device rewrite only happens while the mode is on the torch-function stack
of the thread that called ``install()`` (the main thread, which also runs
autograd for CPU tensors).

**Strict device mode** (``install(strict=True)`` or MEGATRON_ASVR_STRICT_DEVICE=1)
makes the CPU keep CUDA's placement rules, so that code which would fail on a
GPU fails here too. Every tensor carries a virtual placement: *host* when a
factory made it without a ``device`` argument (``torch.tensor(...)``,
``torch.zeros(...)``, ``from_numpy``) or ``.cpu()`` moved it; *device* when it
was made on or moved to a CUDA device (``device="cuda"``, ``.to(device)`` with
the runtime device, which the emulation names ``cuda``, ``.cuda()``; a module's
parameters by ``Module.to``); unknown when the CPU is named explicitly (under the
emulation ``x.device`` says ``cpu`` for device tensors too); otherwise it
inherits from its inputs. Then, as NCCL and CUDA
kernels would:

- an op that mixes a device tensor with a host tensor of one or more dimensions
  raises ``StrictDeviceError`` (0-dim host tensors are allowed, as on CUDA;
  copies, moves and indexing with host indices are allowed, as on CUDA);
- a collective on a host tensor raises, except on groups created with
  ``backend="gloo"`` (megatron's CPU-side groups, gloo on a GPU cluster too).
"""

import functools
import logging
import os
import threading
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

_INSTALLED = False
_STRICT = False
_LOCK = threading.Lock()
STRICT_ENV = "MEGATRON_ASVR_STRICT_DEVICE"


class StrictDeviceError(RuntimeError):
    """A tensor on the wrong (virtual) device: the same code would fail on a GPU."""


def is_active() -> bool:
    """True when the emulation has been installed in this process."""
    return _INSTALLED


def install(strict: bool = False) -> bool:
    """Install the emulation if no GPU is present; return whether it is active.

    ``strict`` (or MEGATRON_ASVR_STRICT_DEVICE=1) also turns on the strict device
    mode; once on, it stays on for the process.
    """
    global _INSTALLED, _STRICT
    if torch.cuda.is_available():
        return False
    with _LOCK:
        if not _INSTALLED:
            _patch_cuda_namespace()
            _patch_tensor_and_module()
            _patch_megatron_rng()
            _CudaToCpuMode().__enter__()  # stays on the stack for the process lifetime
            _INSTALLED = True
        if (strict or os.environ.get(STRICT_ENV) == "1") and not _STRICT:
            _patch_collectives()
            _STRICT = True
    return True


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of every torch call to the CPU (and, in strict mode,
    tracks and checks every tensor's virtual placement)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch._C._nn._parse_to:  # Module.to's argument parser: its Tensor.to calls rewrite
            return func(*args, **kwargs)
        placement = _placement_of_call(func, args, kwargs) if _STRICT else None
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to:
            args = tuple("cpu" if i > 0 and _is_cuda_device(a) else a for i, a in enumerate(args))
        elif func is torch.Tensor.pin_memory:
            return args[0]
        out = func(*args, **kwargs)
        if _STRICT and placement is not None:
            if func is torch.Tensor.to and isinstance(args[0], torch.nn.Parameter):
                _set_placement(args[0], placement)  # Module.to moves its parameters in place (.data)
            elif func is torch.Tensor.to and out is args[0] and _placement(out) != placement:
                out = out.view_as(out)  # a moved tensor is a new tensor, as on a GPU
            _set_placement(out, placement)
        return out


# -- strict device mode -----------------------------------------------------------------------

HOST, DEVICE, UNKNOWN = "host", "device", "unknown"
_TAG = "_emulated_placement"
_MOVES = {torch.Tensor.to, torch.Tensor.copy_, torch.Tensor.__getitem__, torch.Tensor.__setitem__,
          torch.Tensor.index_put_, torch.Tensor.pin_memory}  # may cross placements, as on CUDA


def _placement(t: torch.Tensor):
    return getattr(t, _TAG, None)


def _set_placement(out, placement: str) -> None:
    for t in out if isinstance(out, (tuple, list)) else (out,):
        if isinstance(t, torch.Tensor):
            setattr(t, _TAG, placement)


def _is_device_like(value) -> bool:
    """A ``Tensor.to`` argument naming where to go (a device, its name or index, or another tensor)."""
    return isinstance(value, (str, torch.device, torch.Tensor)) or (
        isinstance(value, int) and not isinstance(value, bool))


def _tensor_args(args, kwargs):
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from (v for v in value if isinstance(v, torch.Tensor))


def _named_placement(target):
    """Where a device argument puts a tensor: DEVICE for CUDA; UNKNOWN for the CPU, which under
    the emulation is also what ``x.device`` of a device tensor reports."""
    if isinstance(target, torch.Tensor):
        return _placement(target) or UNKNOWN
    return DEVICE if _is_cuda_device(target) else UNKNOWN


def _placement_of_call(func, args, kwargs):
    """Check the call's inputs; return the placement of its outputs (None: as its inputs say nothing)."""
    if func is torch.Tensor.cpu:
        return HOST
    if func is torch.Tensor.to:
        target = kwargs.get("device", next((a for a in args[1:] if _is_device_like(a)), None))
        return _placement(args[0]) if target is None else _named_placement(target)
    if kwargs.get("device") is not None:
        return _named_placement(kwargs["device"])
    inputs = list(_tensor_args(args, kwargs))
    if not inputs:
        return HOST  # a factory without a device: host memory, as on a GPU machine
    placements = [_placement(t) for t in inputs]
    if DEVICE in placements and func not in _MOVES:
        host = [t for t, p in zip(inputs, placements) if p == HOST and t.dim() > 0]
        if host:
            raise StrictDeviceError(
                f"{getattr(func, '__name__', func)} mixes a host tensor {tuple(host[0].shape)} "
                f"{host[0].dtype} with device tensors: it was never moved to the device, or was created "
                f"without device=; on a GPU this raises 'Expected all tensors to be on the same device'")
    return DEVICE if DEVICE in placements else HOST if HOST in placements else None


_COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
                "reduce_scatter_tensor", "reduce", "send", "recv", "all_to_all_single", "batch_isend_irecv")
_GLOO_GROUPS = set()  # ids of the groups created with backend="gloo"


def _patch_collectives():
    """Collectives refuse host tensors, as NCCL does, except on explicitly gloo groups."""
    new_group = dist.new_group

    @functools.wraps(new_group)
    def recording_new_group(*args, **kwargs):
        group = new_group(*args, **kwargs)
        if kwargs.get("backend") == "gloo":
            _GLOO_GROUPS.add(id(group))
        return group

    dist.new_group = recording_new_group
    for name in _COLLECTIVES:
        setattr(dist, name, _device_only(name, getattr(dist, name)))


def _device_only(name, collective):
    @functools.wraps(collective)
    def checked(*args, **kwargs):
        group = kwargs.get("group")
        if group is None or id(group) not in _GLOO_GROUPS:
            tensors = list(_tensor_args(args, kwargs))
            if name == "batch_isend_irecv":
                tensors = [op.tensor for op in args[0] if id(op.group) not in _GLOO_GROUPS]
            for t in tensors:
                if _placement(t) == HOST:
                    raise StrictDeviceError(
                        f"torch.distributed.{name} on a host tensor {tuple(t.shape)} {t.dtype}: NCCL takes "
                        f"device tensors only (create it with device= or move it with .to(device))")
        return collective(*args, **kwargs)

    return checked


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
    torch.Tensor.cuda = lambda self, device=None, non_blocking=False, **kwargs: (
        self if self.is_meta else self.to("cuda", non_blocking=non_blocking))
    torch.nn.Module.cuda = lambda self, device=None: self.to("cuda")


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
