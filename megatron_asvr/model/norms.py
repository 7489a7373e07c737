"""Normalisation layers for the local (non-Transformer-Engine) specs.

megatron's torch-norm fallback refuses sequence parallelism; these mark their
parameters ``sequence_parallel`` so that megatron's ``finalize_model_grads``
all-reduces their gradients over the tensor-parallel group, as TE's norms do.

RMSNorm's kernel is chosen when it is built (``train.fast_paths.rms_norm``, read through
``runtime.fast_paths.kernel_choice``): the reference below (CPU), torch's fused ``F.rms_norm``, or
Liger's Triton kernel with HF LLaMA's casting (the reference's rounding, one kernel each way).
"""

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_asvr.runtime.fast_paths import kernel_choice


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # [..., h]
    """HF LLaMA's RMSNorm: the variance in fp32, the normalised input cast back before the weight."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """torch's fused RMSNorm (fp32 inside, one rounding to x's dtype after the weight: with bf16 inputs
    within a bf16 ulp of the reference, equal in fp32)."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def rms_norm_liger(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Liger's Triton RMSNorm (CUDA), casting as HF LLaMA: the reference's math in one kernel each way."""
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    # (X, W, eps, offset, casting_mode, in_place): in_place=False keeps the incoming gradient intact.
    return LigerRMSNormFunction.apply(x.contiguous(), weight, eps, 0.0, "llama", False)


RMS_NORM_KERNELS = {"reference": rms_norm_reference, "torch": rms_norm_torch, "liger": rms_norm_liger}


class RMSNorm(torch.nn.Module):
    """RMSNorm with the variance in fp32, as HF LLaMA computes it."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)
        self.kernel = RMS_NORM_KERNELS[kernel_choice().rms_norm]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., h]
        return self.kernel(x, self.weight, self.eps)


class LayerNorm(torch.nn.LayerNorm):
    """torch LayerNorm whose parameters follow sequence parallelism."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        for param in self.parameters():
            setattr(param, "sequence_parallel", config.sequence_parallel)


class Norm:
    """The norm ``config.normalization`` names ("RMSNorm" or "LayerNorm").

    A class, not a function: megatron's ``build_module`` instantiates classes but
    returns plain functions unchanged.
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **kwargs):
        if config.normalization == "RMSNorm":
            return RMSNorm(config, hidden_size, eps, **kwargs)
        if config.normalization == "LayerNorm":
            return LayerNorm(config, hidden_size, eps, **kwargs)
        raise ValueError(f"unsupported normalization {config.normalization!r}")
