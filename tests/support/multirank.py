"""Run a function on N CPU ranks (gloo) from pytest and collect what each returns.

Ranks are forked from one forkserver that has torch and megatron-core imported
already, so a launch costs a fork, not an interpreter start (the cost that
dominates multi-rank tests on a 2-core machine). Each rank gets torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), one
intra-op thread and the fork start method for its own helpers, as a torchrun
worker has; the function then calls ``megatron_asvr.runtime.initialize`` like a
real entry point would.

A rank that raises fails the launch with that rank's traceback; a launch that
does not finish within ``timeout`` seconds is killed and reported as a hang,
naming the ranks that had not finished. Each rank leads its own process group,
so processes it started (dist_checkpointing's writers) are killed with it.
"""

import io
import multiprocessing as mp
import os
import queue
import signal
import time
import traceback
from typing import Any, Callable, List

from megatron_asvr.runtime.ports import free_port

# megatron_asvr first: it defers megatron-core's torch.compile of its fused kernels to their first call
# (its __init__). Ranks that test the fused paths call them, so TorchDynamo and Inductor are preloaded.
_PRELOAD = ["megatron_asvr", "torch", "torch.distributed", "megatron.core", "megatron_asvr.runtime",
            "torch._dynamo", "torch._inductor.compile_fx"]
_CTX = None


class MultiRankError(RuntimeError):
    """A rank failed or the launch timed out."""


def _context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(_PRELOAD)
    return _CTX


def _dumps(obj) -> bytes:
    """Serialise with torch.save: tensors travel as bytes, not as shared-memory handles
    (those die with the rank that made them)."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _loads(data: bytes):
    import torch

    return torch.load(io.BytesIO(data), weights_only=False)


def _rank_main(fn, rank, world_size, port, payload, results):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    os.setpgrp()  # this rank leads a process group: killing the group also ends its helpers
    # A forkserver's children inherit its start method; a torchrun worker forks its helpers (DataLoader
    # workers), and so does this rank (else each helper is a fresh interpreter: seconds per worker).
    mp.set_start_method("fork", force=True)
    import torch

    torch.set_num_threads(1)
    try:
        args, kwargs = _loads(payload)
        results.put((rank, "ok", _dumps(fn(*args, **kwargs))))
    except BaseException:  # reported to the parent, which fails the test with it
        results.put((rank, "error", traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(
    fn: Callable[..., Any], world_size: int, *args, timeout: float = 300.0, **kwargs
) -> List[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` ranks; return the results by rank.

    ``fn`` must be importable (a module-level function) and its return value picklable.
    """
    if not 1 <= world_size <= 8:
        raise ValueError(f"world_size must be in 1..8, got {world_size}")
    ctx = _context()
    results = ctx.Queue()
    port, payload = free_port(), _dumps((args, kwargs))
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(fn, rank, world_size, port, payload, results),
            daemon=False,  # dist_checkpointing's writer forks; the finally below reaps ranks
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    outputs, deadline = {}, time.monotonic() + timeout
    try:
        while len(outputs) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(outputs))
                raise MultiRankError(
                    f"{fn.__name__} on {world_size} ranks hung: ranks {missing} did not "
                    f"finish within {timeout:.0f} s"
                )
            try:
                rank, status, payload = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                dead = [r for r in dead if r not in outputs]
                if dead:
                    raise MultiRankError(
                        f"{fn.__name__}: rank {dead[0]} died with exit code "
                        f"{procs[dead[0]].exitcode} before reporting"
                    )
                continue
            if status == "error":
                raise MultiRankError(f"{fn.__name__} failed on rank {rank}:\n{payload}")
            outputs[rank] = _loads(payload)
    finally:
        for p in procs:
            p.join(timeout=5 if len(outputs) == world_size else 0)
            if p.is_alive():
                p.kill()
                p.join()
            _kill_group(p.pid)  # e.g. dist_checkpointing's writer processes of a killed rank
    return [outputs[r] for r in range(world_size)]


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
