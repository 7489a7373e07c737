import os

# Multi-rank tests fork many ranks onto few cores: one intra-op thread each.
os.environ.setdefault("OMP_NUM_THREADS", "1")
