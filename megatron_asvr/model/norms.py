"""Normalisation layers for the local (non-Transformer-Engine) specs.

megatron's torch-norm fallback refuses sequence parallelism; these mark their
parameters ``sequence_parallel`` so that megatron's ``finalize_model_grads``
all-reduces their gradients over the tensor-parallel group, as TE's norms do.
"""

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.Module):
    """RMSNorm with the variance in fp32, as HF LLaMA computes it."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., h]
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


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
