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


@pytest.fixture(scope="session")
def fault_reference(tiny_root, tmp_path_factory):
    """The uninterrupted torchrun job that the fault and preemption tests must end equal to (its save
    directory; tests/support/fault_jobs.py). Nobody changes it: copy it to resume from it."""
    from tests.support.fault_jobs import run_reference

    return run_reference(tiny_root, tmp_path_factory.mktemp("reference"))


# Files whose tests take the longest (the longest first): xdist (-n 2 --dist loadfile in
# scripts/test.sh) hands files to its workers in collection order, so these start first and the short
# ones fill in around them. An order only: a file missing here runs after these.
LONGEST_FIRST = [
    "test_fault_tolerance.py",  # the faulty job: four attempts, a 20 s hang guard
    "test_preemption.py",  # four torchrun jobs in a row
    "test_training_loop.py",
    "test_demo_learns.py",
    "test_eval_model.py",
    "test_convert_llava.py",
    "test_parallel_features.py",
    "test_multinode.py",
    "test_convert_qwen.py",
    "test_asvr_model.py",
]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order
