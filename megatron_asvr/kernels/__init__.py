"""Fused kernels from csrc/ and their Python face: autograd functions and dispatch."""

from megatron_asvr.kernels.backends import backend_report, select_kernels
from megatron_asvr.kernels.multi_depth_ce import MODES, default_mode, multi_depth_cross_entropy

__all__ = ["MODES", "backend_report", "default_mode", "multi_depth_cross_entropy", "select_kernels"]
