"""megatron_asvr: a megatron-core 3D-parallel trainer for LLaVA-style VLMs with ASVR.

Importing the package defers megatron-core's ``torch.compile`` of its fused kernels to their first
call. megatron.core.jit sets ``jit_fuser = torch.compile`` and 41 functions are decorated with it as
megatron-core is imported; each decoration imports TorchDynamo and Inductor, 1.9 CPU-s of the 4.2 s
that ``import megatron.core`` costs every process (each rank, each tool), whether or not it ever
calls one. Decorated here instead, a function compiles (the same ``torch.compile(fn)``) when first
called. This works only when megatron_asvr is imported before megatron.core; later, it changes nothing.
"""

import functools
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

_JIT_MODULE = "megatron.core.jit"


def lazy_compile(fn):
    """``torch.compile(fn)``, built at the first call rather than at decoration."""
    compiled = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal compiled
        if compiled is None:
            import torch

            compiled = torch.compile(fn)
        return compiled(*args, **kwargs)

    return call


class _DeferJitFuser(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Loads megatron.core.jit as usual, then makes its ``jit_fuser`` lazy if it is torch.compile."""

    def find_spec(self, name, path, target=None):
        if name != _JIT_MODULE:
            return None
        sys.meta_path.remove(self)  # once: the real finders locate the module
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            self._loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        import torch

        if module.jit_fuser is torch.compile:
            module.jit_fuser = lazy_compile


if _JIT_MODULE not in sys.modules and not any(isinstance(f, _DeferJitFuser) for f in sys.meta_path):
    sys.meta_path.insert(0, _DeferJitFuser())
