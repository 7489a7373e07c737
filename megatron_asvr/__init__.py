"""megatron_asvr: a megatron-core 3D-parallel trainer for LLaVA-style VLMs with ASVR."""

__version__ = "0.1.0"
