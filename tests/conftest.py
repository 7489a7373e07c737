import os

# Multi-rank tests fork many ranks onto few cores: one intra-op thread each.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Every rank keeps CUDA's placement rules on the CPU (runtime/cpu_emulation.py, strict device
# mode): a tensor that would reach a GPU kernel or NCCL from the host fails the test here.
os.environ.setdefault("MEGATRON_ASVR_STRICT_DEVICE", "1")
