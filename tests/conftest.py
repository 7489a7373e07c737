import fcntl
import os
import shutil
from pathlib import Path

import pytest

# Multi-rank tests fork many ranks onto few cores: one intra-op thread each.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Every rank keeps CUDA's placement rules on the CPU (runtime/cpu_emulation.py, strict device
# mode): a tensor that would reach a GPU kernel or NCCL from the host fails the test here.
os.environ.setdefault("MEGATRON_ASVR_STRICT_DEVICE", "1")
# Ranks that test megatron's fused kernels compile them (torch.compile, Inductor) in-process: a pool
# of compile workers, started by each rank, cost 34 Python start-ups in one CI run.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")


def _once_per_session(tmp_path_factory, name: str, build) -> Path:
    """``build(directory)`` once per test session: under pytest-xdist the first worker to ask builds
    it in the directory every worker shares (pytest-N/, the parent of each worker's own), holding a
    lock that the others wait on; they reuse what it built. A failed build is removed, not reused."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        directory = tmp_path_factory.mktemp(name)
        build(directory)
        return directory
    shared = tmp_path_factory.getbasetemp().parent / name
    with open(f"{shared}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (shared / ".built").exists():
            shutil.rmtree(shared, ignore_errors=True)
            shared.mkdir()
            try:
                build(shared)
            except BaseException:
                shutil.rmtree(shared, ignore_errors=True)
                raise
            (shared / ".built").touch()
    return shared


def _make_tiny_run(root: Path) -> None:
    from tests.support.multirank import run_ranks
    from tests.support.tiny_run import make_tiny_run

    run_ranks(make_tiny_run, 1, str(root), timeout=600)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """The demo pipeline at test size on disk (tests/support/tiny_run.py), built once for every test
    that trains on it; none of them changes it."""
    return _once_per_session(tmp_path_factory, "tiny_run", _make_tiny_run)


@pytest.fixture(scope="session")
def fault_reference(tiny_root, tmp_path_factory):
    """The uninterrupted torchrun job that the fault and preemption tests must end equal to (its save
    directory; tests/support/fault_jobs.py). Nobody changes it: copy it to resume from it."""
    from tests.support.fault_jobs import run_reference

    work = _once_per_session(tmp_path_factory, "reference", lambda work: run_reference(tiny_root, work))
    return work / "run"


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
