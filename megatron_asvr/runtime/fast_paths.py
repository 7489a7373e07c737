"""The step's fast paths (``train.fast_paths``): what each switch means on this device, and the few
runtime patches of megatron-core they need. None is needed for correctness: every switch off is the
path megatron-core takes without Transformer Engine or apex, and tests/test_fast_paths.py trains the
same model with each on and off.

    FastPaths.resolve(config, cuda)      each "auto" decided for the device
    paths.transformer_changes()          TransformerConfig fields to turn on: (every part's, the LLM's)
    apply_megatron_patches(paths)        clipping's norm and scale, the wgrad shim: set both ways, so the
                                         last trainer built in a process has exactly its own switches
    fuse_adam(optimizer, on)             torch's fused AdamW inside megatron's optimizer (after a resume too)
    building(paths) / kernel_choice()    what modules read when they are built: RMSNorm kernel, SDPA backends,
                                         the head's batched depth MLPs
"""

import contextvars
import importlib.util
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

from megatron_asvr.config import ConfigError, FastPathsConfig

SDPA_ORDER = ("cudnn", "flash", "efficient", "math")  # the priority with CUDA (attention="auto")


def have_liger() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


AUTO_ENV = "ASVR_FAST_PATHS"  # on | off: what every "auto" switch means, on any device


def auto_means(cuda: bool) -> bool:
    """Whether an ``auto`` switch is on: with CUDA, unless $ASVR_FAST_PATHS says otherwise (``on`` runs
    the CPU twins of every fast path, e.g. the whole test suite; ``off`` bisects a GPU run)."""
    value = os.environ.get(AUTO_ENV, "")
    if value not in ("", "on", "off"):
        raise ConfigError(f"{AUTO_ENV}={value!r}: expected on or off (unset: on with CUDA)")
    return cuda if not value else value == "on"


@dataclass(frozen=True)
class FastPaths:
    """``train.fast_paths`` decided for one device."""

    fused_adam: bool = False
    foreach_clip: bool = False
    wgrad_accumulation: bool = False
    bias_fusions: bool = False
    rms_norm: str = "reference"  # reference | torch | liger
    attention: str = "default"  # default (torch's choice) | cudnn | flash | efficient | math
    batched_head_mlp: bool = False
    cuda: bool = False

    @classmethod
    def resolve(cls, config: FastPathsConfig, cuda: bool) -> "FastPaths":
        auto = auto_means(cuda)

        def on(switch) -> bool:
            return auto if switch == "auto" else bool(switch)

        rms_norm = config.rms_norm
        if rms_norm == "auto":
            rms_norm = ("liger" if cuda and have_liger() else "torch") if auto else "reference"
        if rms_norm == "liger" and not (cuda and have_liger()):
            raise ConfigError("train.fast_paths.rms_norm=liger needs CUDA and liger-kernel installed: "
                              "set it to auto, torch or reference")
        if config.attention != "auto":
            attention = config.attention
        else:
            attention = ("cudnn" if cuda else "flash") if auto else "default"
        return cls(on(config.fused_adam), on(config.foreach_clip), on(config.wgrad_accumulation),
                   on(config.bias_fusions), rms_norm, attention, on(config.batched_head_mlp), cuda)

    def transformer_changes(self) -> Tuple[dict, dict]:
        """(fields for every part's TransformerConfig, fields for the LLM's alone): only what a switch
        turns on, so a backend that fuses already (Transformer Engine) keeps its own settings. The head and
        the encoder keep their unfused exact / tanh GELU: megatron's fused bias-GELU is the tanh form."""
        every = {"gradient_accumulation_fusion": True} if self.wgrad_accumulation else {}
        if self.bias_fusions:
            every["bias_dropout_fusion"] = True
        return every, ({"bias_activation_fusion": True} if self.bias_fusions else {})

    def sdpa_backends(self) -> List:
        """SDPA's backends in priority order for ``attention`` (empty: torch's own choice). A named backend
        goes first, the others follow as fallbacks for shapes it does not take; ``math`` alone is the
        reference."""
        from torch.nn.attention import SDPBackend

        names = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
        if self.attention == "default":
            return []
        if self.attention == "math":
            return [names["math"]]
        return [names[self.attention]] + [names[n] for n in SDPA_ORDER if n != self.attention]


# -- what modules read when they are built -----------------------------------------------------------

_BUILDING: contextvars.ContextVar = contextvars.ContextVar("fast_paths", default=FastPaths())


@contextmanager
def building(paths: FastPaths):
    """Modules built inside read ``paths`` (``kernel_choice``); outside, the reference kernels."""
    token = _BUILDING.set(paths)
    try:
        yield
    finally:
        _BUILDING.reset(token)


def kernel_choice() -> FastPaths:
    return _BUILDING.get()


# -- megatron-core's runtime patches ----------------------------------------------------------------


def _foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """megatron's ``multi_tensor_l2norm`` signature: the norm of all tensors as a [1] fp32 tensor, on the
    device (megatron's local fallback turns each tensor's norm into a Python float: a host sync each)."""
    norms = torch._foreach_norm(tensor_lists[0], 2, dtype=torch.float32)  # fp32 norms of bf16 grads too
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1), None


def _foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """megatron's ``multi_tensor_scale``: dst = src * scale, in place when they are the same tensors."""
    src, dst = tensor_lists
    if all(s is d for s, d in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
        return
    torch._foreach_copy_(dst, src)
    if scale != 1.0:
        torch._foreach_mul_(dst, scale)


def _foreach_clip_by_total_norm(parameters, max_norm, total_norm, use_decoupled_grad=False) -> None:
    """megatron's ``clip_grad_by_total_norm_fp32``, one foreach multiply, gradients of any float dtype (megatron
    asserts fp32 ones: pure bf16 runs, ``train.master_weights=false``, clip bf16 gradients)."""
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if grads and clip_coeff < 1.0:
        torch._foreach_mul_(grads, clip_coeff)


class WgradAccumulation:
    """Stand-in for apex's ``fused_weight_gradient_mlp_cuda`` (megatron's gradient-accumulation fusion):
    the weight gradient of a linear layer, gout^T @ input, added straight into the parameter's
    ``main_grad`` with no weight-gradient tensor in between. Inputs are 2-D: input [t, in], gout [t, out],
    main_grad [out, in]; or batched (model/depth_mlps.py): [B, t, in], [B, t, out], [B, out, in]."""

    # whether out_dtype works here (torch >= 2.8 on CUDA), per op (addmm, baddbmm): tried on first use
    mixed_addmm: Dict[str, bool] = {}

    @classmethod
    def wgrad_gemm_accum_fp32(cls, inp: torch.Tensor, gout: torch.Tensor, main_grad: torch.Tensor) -> None:
        mm, addmm = (torch.bmm, torch.baddbmm) if inp.dim() == 3 else (torch.mm, torch.addmm)
        if inp.dtype == main_grad.dtype:
            addmm(main_grad, gout.mT, inp, out=main_grad)
            return
        works = cls.mixed_addmm.get(addmm.__name__)
        if main_grad.is_cuda and works is not False:
            try:  # bf16 GEMM with an fp32 accumulator and output (cuBLAS), into main_grad itself
                addmm(main_grad, gout.mT, inp, out_dtype=main_grad.dtype, out=main_grad)
                cls.mixed_addmm[addmm.__name__] = True
                return
            except (TypeError, RuntimeError):
                if works:  # it worked before: a real failure
                    raise
                cls.mixed_addmm[addmm.__name__] = False
        main_grad.add_(mm(gout.mT, inp))  # no mixed-dtype addmm: the same sum through a temporary

    wgrad_gemm_accum_fp16 = wgrad_gemm_accum_fp32  # bf16 / fp16 main_grad: same-dtype addmm_


_ORIGINALS: Dict[Tuple[object, str], object] = {}


def _set(module, name: str, value) -> None:
    """``module.name = value`` remembering the original, or the original back when ``value`` is None."""
    key = (module, name)
    if key not in _ORIGINALS:
        _ORIGINALS[key] = getattr(module, name, None)
    setattr(module, name, _ORIGINALS[key] if value is None else value)


def apply_megatron_patches(paths: FastPaths) -> None:
    """Patch (or restore) megatron-core for ``paths``; a patch only replaces megatron's local fallback, never
    Transformer Engine's or apex's kernels."""
    from megatron.core.optimizer import clip_grads, optimizer
    from megatron.core.tensor_parallel import layers
    from megatron.core.utils import local_multi_tensor_l2_norm, local_multi_tensor_scale

    clip = paths.foreach_clip
    if _ORIGINALS.get((clip_grads, "l2_norm_impl"), clip_grads.l2_norm_impl) is local_multi_tensor_l2_norm:
        _set(clip_grads, "l2_norm_impl", _foreach_l2_norm if clip else None)
    for module in (clip_grads, optimizer):
        if _ORIGINALS.get((module, "multi_tensor_scale_impl"), module.multi_tensor_scale_impl) \
                is local_multi_tensor_scale:
            _set(module, "multi_tensor_scale_impl", _foreach_scale if clip else None)
    _set(optimizer, "clip_grad_by_total_norm_fp32", _foreach_clip_by_total_norm if clip else None)
    if not _ORIGINALS.get((layers, "_grad_accum_fusion_available"), layers._grad_accum_fusion_available):
        wgrad = paths.wgrad_accumulation
        _set(layers, "fused_weight_gradient_mlp_cuda", WgradAccumulation if wgrad else None)
        _set(layers, "_grad_accum_fusion_available", True if wgrad else None)
    if not paths.cuda and hasattr(torch.compiler, "set_stance"):
        # megatron's fused bias functions are torch.compile'd (megatron.core.jit); on CPU they run eagerly,
        # the same math: inductor's CPU compile costs ~45 s per function and shape.
        torch.compiler.set_stance("force_eager" if paths.bias_fusions else "default")


def fuse_adam(optimizer, on: bool) -> None:
    """Make every torch AdamW inside megatron's ``optimizer`` fused (``on``) or foreach (off).

    megatron builds ``torch.optim.AdamW`` itself when Transformer Engine and apex are missing and passes no
    ``fused``; torch reads the group's flag at every step, so it is set here, before the first step (its
    ``state['step']`` is then born on the device) and again after a resume (a checkpoint's param groups carry
    the flags of the run that saved it; a fused AdamW needs ``step`` as an fp32 device tensor)."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        adam = getattr(inner, "optimizer", None)
        if not isinstance(adam, torch.optim.AdamW):
            continue  # Transformer Engine's or apex's fused Adam: already fused
        for group in [adam.defaults, *adam.param_groups]:
            group["fused"], group["foreach"] = (True, False) if on else (None, None)
        for group in adam.param_groups:
            for param in group["params"]:
                state = adam.state.get(param)
                if state and "step" in state and on:
                    state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(param.device)
