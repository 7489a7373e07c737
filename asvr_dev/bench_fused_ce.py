"""Benchmark of the multi-depth cross-entropy: naive vs chunked plain torch vs fused kernels.

The machinery of tools/bench_fused_ce.py (kept out of the library, in the dev package).

Each case runs in a fresh spawned process (one per rank for TP > 1) so that its
memory is its own. Peak memory is measured, not computed: on CPU it is the peak
resident set size (VmHWM, reset through /proc/self/clear_refs after the inputs
exist) minus the resident size at that moment; on CUDA it is
torch.cuda.max_memory_allocated minus the allocation at that moment. It covers one
forward + backward with the parameters' .grad unset (as after zero_grad), so the
returned gradients count (their size is shown); the peak at the end of the
forward pass (what is held until backward) is shown too. Time is the median of
several forward + backward runs after that first one.
"""

import gc
import os
import queue
import socket
import statistics
import time
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_asvr.kernels.multi_depth_ce import multi_depth_cross_entropy
from megatron_asvr.kernels.reference import naive_multi_depth_cross_entropy

MIB = 2**20
METHODS = {
    "naive": "materialised logits + F.cross_entropy per depth (TP: megatron vocab-parallel CE)",
    "torch": "chunked, plain-torch kernels",
    "cpu": "chunked, fused CPU kernels (csrc)",
    "cuda": "chunked, fused CUDA kernels (csrc)",
}


@dataclass(frozen=True)
class Case:
    method: str  # a key of METHODS
    rows: int  # N
    depths: int  # D
    vocab: int  # V per depth
    embed: int  # E
    tp: int = 1
    dtype: str = "float32"
    device: str = "cpu"
    repeats: int = 3
    seed: int = 0


def _inputs(case: Case, rank: int):
    """hidden [N, D, E], this rank's weights [V/tp, E] and biases per depth, targets [N, D]."""
    gen = torch.Generator().manual_seed(case.seed)
    dtype = getattr(torch, case.dtype)
    local = case.vocab // case.tp
    hidden = torch.randn(case.rows, case.depths, case.embed, generator=gen)
    targets = torch.randint(0, case.vocab, (case.rows, case.depths), generator=gen)
    weights, biases = [], []
    for _ in range(case.depths):
        w = torch.randn(case.vocab, case.embed, generator=gen)[rank * local : (rank + 1) * local]
        weights.append((w * case.embed**-0.5).to(case.device, dtype).requires_grad_())
        biases.append(torch.zeros(local, device=case.device, dtype=dtype).requires_grad_())
    hidden = hidden.to(case.device, dtype).requires_grad_()
    return hidden, weights, biases, targets.to(case.device)


def _naive_tp(hidden, weights, biases, targets) -> torch.Tensor:
    """Megatron's layout: copy-to-TP-region, local logits, vocab-parallel cross entropy."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

    h = copy_to_tensor_model_parallel_region(hidden)
    losses = [
        vocab_parallel_cross_entropy(F.linear(h[:, d], w, b).float(), targets[:, d]).sum()
        for d, (w, b) in enumerate(zip(weights, biases))
    ]
    return torch.stack(losses)


def _forward(case: Case, inputs, group) -> torch.Tensor:
    """Per-depth loss sums [D] of ``case.method`` (autograd graph kept for backward)."""
    hidden, weights, biases, targets = inputs
    vocab_sizes = [case.vocab] * case.depths
    if case.method == "naive" and case.tp > 1:
        return _naive_tp(hidden, weights, biases, targets)
    if case.method == "naive":
        return naive_multi_depth_cross_entropy(hidden, weights, biases, targets, vocab_sizes)[0]
    return multi_depth_cross_entropy(hidden, weights, biases, targets, vocab_sizes, group=group, backend=case.method)[0]


def _sync(case: Case) -> None:
    if case.device == "cuda":
        torch.cuda.synchronize()


def _peak(case: Case) -> int:
    return torch.cuda.max_memory_allocated() if case.device == "cuda" else _resident_bytes("VmHWM")


def _resident_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(case: Case, rank: int = 0, group=None) -> Dict[str, float]:
    """Peak memory (MiB) of one forward + backward and its median time over case.repeats runs."""
    inputs = _inputs(case, rank)
    params = [inputs[0], *inputs[1], *inputs[2]]
    grad_mib = sum(p.numel() * p.element_size() for p in params) / MIB
    gc.collect()
    if case.device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _resident_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # VmHWM := VmRSS
    loss = _forward(case, inputs, group)
    _sync(case)
    forward_peak = _peak(case)
    loss.sum().backward()
    _sync(case)
    peak = _peak(case)
    del loss
    times = []
    for _ in range(case.repeats):
        for p in params:
            p.grad = None
        if group is not None:
            dist.barrier(group)
        start = time.perf_counter()
        _forward(case, inputs, group).sum().backward()
        _sync(case)
        times.append(time.perf_counter() - start)
    return {
        "forward_peak_mib": (forward_peak - base) / MIB,
        "peak_mib": (peak - base) / MIB,
        "grads_mib": grad_mib,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
    }


def _rank_main(case: Case, rank: int, port: int, threads: int, results) -> None:
    torch.set_num_threads(threads)
    group = None
    if case.tp > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(case.tp), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        backend = "nccl" if case.device == "cuda" else "gloo"
        if case.device == "cuda":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend)
        group = dist.group.WORLD
        if case.method == "naive":
            from megatron.core import parallel_state

            parallel_state.initialize_model_parallel(tensor_model_parallel_size=case.tp)
    try:
        results.put((rank, measure(case, rank, group)))
    finally:
        if group is not None:
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(case: Case, threads: int) -> Dict[str, float]:
    """``measure`` in fresh processes (``threads`` intra-op threads in all); worst rank's memory."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    per_rank = max(1, threads // case.tp)
    procs = [ctx.Process(target=_rank_main, args=(case, r, port, per_rank, results)) for r in range(case.tp)]
    for p in procs:
        p.start()
    outputs = {}
    while len(outputs) < case.tp:
        if any(p.exitcode not in (None, 0) for p in procs) and results.empty():
            raise RuntimeError(f"benchmark case {case} failed: exit codes {[p.exitcode for p in procs]}")
        try:
            rank, out = results.get(timeout=1.0)
        except queue.Empty:
            continue
        outputs[rank] = out
    for p in procs:
        p.join()
    memory = {k: max(o[k] for o in outputs.values()) for k in ("forward_peak_mib", "peak_mib", "grads_mib")}
    return {**outputs[0], **memory}


def default_cases(device: str, methods: List[str], repeats: int, tp: int = 2, dtype: str = "float32") -> List[Case]:
    """The issue's table: N in {729, 1458}, D=8, V=16384, E in {512, 2048}; with tp > 1
    also the N=1458, E=2048 rows at that tensor-parallel size."""
    cases = [
        Case(method, rows, 8, 16384, embed, dtype=dtype, device=device, repeats=repeats)
        for embed in (512, 2048)
        for rows in (729, 1458)
        for method in methods
    ]
    if tp > 1:
        cases += [replace(c, tp=tp) for c in cases if c.rows == 1458 and c.embed == 2048]
    return cases


def format_table(results: List[Dict]) -> str:
    """Markdown table; ratios are against the naive row of the same shape and TP."""
    head = (
        "| method | N | D | V | E | TP | dtype | fwd peak MiB | fwd / naive | fwd+bwd peak MiB | of which grads "
        "| peak / naive | fwd+bwd s (median) | min-max s | time / naive |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    key = ("rows", "depths", "vocab", "embed", "tp", "dtype")
    naive = {tuple(r[k] for k in key): r for r in results if r["method"] == "naive"}
    for r in results:
        ref: Optional[Dict] = naive.get(tuple(r[k] for k in key))

        def ratio(field: str) -> str:
            return f"{r[field] / ref[field]:.3f}" if ref else "-"

        lines.append(
            f"| {r['method']} | {r['rows']} | {r['depths']} | {r['vocab']} | {r['embed']} | {r['tp']} "
            f"| {r['dtype']} | {r['forward_peak_mib']:.0f} | {ratio('forward_peak_mib')} | {r['peak_mib']:.0f} "
            f"| {r['grads_mib']:.0f} | {ratio('peak_mib')} | {r['median_s']:.3f} | {r['min_s']:.3f}-{r['max_s']:.3f} "
            f"| {ratio('median_s')} |"
        )
    return "\n".join(lines)


def run(cases: List[Case], threads: int, echo=print) -> List[Dict]:
    """Run every case, echoing one line per finished case; returns the result rows."""
    results = []
    for case in cases:
        out = {**asdict(case), **run_case(case, threads)}
        echo(
            f"{case.method:>5} N={case.rows} E={case.embed} TP={case.tp} {case.dtype}: "
            f"peak {out['peak_mib']:.0f} MiB, median {out['median_s']:.3f} s"
        )
        results.append(out)
    return results
