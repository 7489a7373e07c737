"""Distributed start-up, device choice, seeding, named waits on other ranks (their watchdog), helper
processes that end with their rank, and the CPU emulation of megatron's CUDA calls."""

from megatron_asvr.runtime.distributed import RankInfo, current_device, destroy, initialize, set_seed

__all__ = ["RankInfo", "current_device", "destroy", "initialize", "set_seed"]
