"""Dispatch of the fused cross-entropy kernels: CUDA extension, CPU extension or plain torch.

The extensions are built from csrc/ by setup.py (``megatron_asvr._fused_ce_cpu``
always, ``megatron_asvr._fused_ce_cuda`` where nvcc and a CUDA torch exist). An
extension is imported only when tensors on its device ask for it, so a CPU
machine never loads the CUDA one. ``backend="auto"`` falls back to plain torch
when an extension does not import and logs once which implementation runs.
"""

import functools
import importlib
import logging
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from megatron_asvr.kernels import torch_kernels

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "cuda", "cpu", "torch")
EXTENSION_MODULES = {"cuda": "megatron_asvr._fused_ce_cuda", "cpu": "megatron_asvr._fused_ce_cpu"}


@dataclass(frozen=True)
class Kernels:
    """One implementation of the kernels (signatures of megatron_asvr.kernels.torch_kernels)."""

    name: str  # "cuda" | "cpu" | "torch"
    origin: str  # the extension's file, or "plain torch"
    row_stats: Callable
    softmax_grad_: Callable
    ce_rows_: Callable


TORCH_KERNELS = Kernels("torch", "plain torch", torch_kernels.row_stats, torch_kernels.softmax_grad_,
                        torch_kernels.ce_rows_)


@functools.cache
def load_extension(kind: str) -> Tuple[Optional[Kernels], str]:
    """(kernels, "") for the "cpu" or "cuda" extension, or (None, why it is unavailable)."""
    module_name = EXTENSION_MODULES[kind]
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        return None, (
            f"{module_name} does not import ({err}); build it with "
            "`pip install --no-build-isolation -e .`"
        )
    return Kernels(kind, module.__file__, module.row_stats, module.softmax_grad_, module.ce_rows_), ""


@functools.cache
def _log_once(level: int, message: str) -> None:
    logger.log(level, message)


def select_kernels(device: torch.device, backend: str = "auto") -> Kernels:
    """The kernels that run tensors on ``device`` for ``backend`` ("auto", "cuda", "cpu", "torch").

    An explicit "cuda" or "cpu" raises when that extension is unavailable or does not
    match the device; "auto" falls back to plain torch with a warning.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return TORCH_KERNELS
    kind = device.type if device.type in EXTENSION_MODULES else None
    if backend != "auto" and backend != kind:
        raise ValueError(f"backend={backend!r} cannot run tensors on device {device}")
    if kind is None:
        _log_once(logging.INFO, f"fused cross-entropy on {device.type}: plain torch kernels")
        return TORCH_KERNELS
    kernels, why_not = load_extension(kind)
    if kernels is None:
        if backend == kind:
            raise RuntimeError(f"backend={backend!r} requested but {why_not}")
        _log_once(logging.WARNING, f"fused cross-entropy on {kind}: {why_not}; using plain torch")
        return TORCH_KERNELS
    _log_once(logging.INFO, f"fused cross-entropy on {kind}: {kind} extension {kernels.origin}")
    return kernels


def backend_report() -> Dict[str, str]:
    """Per implementation, where it comes from or why it is unavailable."""
    report = {}
    for kind in EXTENSION_MODULES:
        kernels, why_not = load_extension(kind)
        report[kind] = kernels.origin if kernels is not None else f"unavailable: {why_not}"
    report["torch"] = TORCH_KERNELS.origin
    return report
