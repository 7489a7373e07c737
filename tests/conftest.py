import os

import pytest

# Multi-rank tests fork many ranks onto few cores: one intra-op thread each.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Every rank keeps CUDA's placement rules on the CPU (runtime/cpu_emulation.py, strict device
# mode): a tensor that would reach a GPU kernel or NCCL from the host fails the test here.
os.environ.setdefault("MEGATRON_ASVR_STRICT_DEVICE", "1")


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """The demo pipeline at test size on disk (tests/support/tiny_run.py), built once for every test
    that trains on it; none of them changes it."""
    from tests.support.multirank import run_ranks
    from tests.support.tiny_run import make_tiny_run

    root = tmp_path_factory.mktemp("tiny_run")
    run_ranks(make_tiny_run, 1, str(root), timeout=600)
    return root
