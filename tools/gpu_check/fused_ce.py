"""The fused multi-depth CE benchmark: step (c) of the GPU check, and tools/bench_fused_ce.py on CPU.

    python3 -m tools.gpu_check.fused_ce [--cpu] --result R --work W      (step (c); run.py runs it)

Every method sums the cross entropy per depth of D classifiers (no bias: Cut Cross-Entropy takes
none) over hidden [D, N, E] with random targets, forward + backward, on the same seeded inputs:

    naive               materialised logits + F.cross_entropy per depth (TP: megatron's vocab-parallel CE)
    ours                megatron_asvr.kernels, gradients made in the forward (grads_in_forward)
    ours-main-grad      the same as in training: the classifiers' gradients accumulate into fp32
                        main_grad buffers (which exist before, as megatron's DDP buffers do)
    ours-recompute      megatron_asvr.kernels, mode recompute (row statistics kept, logits recomputed)
    liger               Liger-Kernel's LigerFusedLinearCrossEntropyLoss per depth (CUDA only)
    cce                 Cut Cross-Entropy's linear_cross_entropy per depth (CUDA only)

Memory, of one forward + backward after a warm-up one, from the moment the inputs exist (CUDA:
torch.cuda's allocation counters; CPU: held from malloc's bytes in use, the peak from the process's
resident set, with blocks of 128 KiB and more returned to the system when freed). Methods on the same
inputs run in one process (CPU: one per TP rank), one after the other:
    held    allocated when the forward has returned: what the method keeps for its backward
            (for ours: the gradients it already made)
    peak    the most allocated at any time during forward + backward (total peak)
    beyond  peak minus the gradients the method returns (of hidden, and of the classifiers unless
            they go to pre-existing main_grad buffers): its working memory beyond the result
Time: the median forward + backward (CUDA: triton.testing.do_bench; CPU: wall clock of a few runs,
the methods taken in turn so that other load on the machine falls on all of them alike, and the
process's CPU time of the same runs, which load from other processes disturbs least).
Agreement: relative errors (2-norm) of the summed loss and of grad_h against an fp32 naive run on
the same inputs, grad_h's taken after rounding the reference to the method's dtype (0: the method
returns the exact gradient, correctly rounded).
"""

import ctypes
import gc
import io
import os
import queue
import statistics
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_asvr.kernels import multi_depth_cross_entropy
from megatron_asvr.kernels.multi_depth_ce import DEFAULT_CHUNK_BYTES, chunk_rows_for
from megatron_asvr.kernels.reference import naive_multi_depth_cross_entropy
from megatron_asvr.runtime.ports import free_port
from tools.gpu_check.shapes import head_shape
from tools.gpu_check.step_io import FAILED, OK, main

MIB = 2**20
METHODS = {
    "naive": "materialised logits + F.cross_entropy per depth (TP: megatron's vocab-parallel CE)",
    "ours": "fused, gradients made in the forward",
    "ours-main-grad": "fused, gradients made in the forward, weight gradients into fp32 main_grad (training)",
    "ours-recompute": "fused, row statistics kept, logits recomputed in backward",
    "liger": "Liger-Kernel LigerFusedLinearCrossEntropyLoss per depth",
    "cce": "Cut Cross-Entropy linear_cross_entropy per depth",
}
OURS = {"ours": ("grads_in_forward", False), "ours-main-grad": ("grads_in_forward", True),
        "ours-recompute": ("recompute", False)}
CUDA_ONLY = ("liger", "cce")
M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8  # glibc mallopt parameters


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
    repeats: int = 3  # timed runs on CPU
    chunk_mib: Optional[int] = None  # ours: logits buffer per chunk (default: the op's)
    hidden_scale: float = 1.0  # > 1: peaked logits (Cut Cross-Entropy skips negligible blocks)
    seed: int = 0

    @property
    def inputs_key(self) -> tuple:
        """Cases with the same key get the same inputs."""
        return self.rows, self.depths, self.vocab, self.embed, self.tp, self.dtype, self.hidden_scale, self.seed


def _inputs(case: Case, rank: int, dev: torch.device):
    """hidden [D, N, E], this rank's weights D x [V/tp, E], targets [N, D]: seeded, never zeros."""
    gen = torch.Generator(device=dev).manual_seed(case.seed)
    dtype = getattr(torch, case.dtype)
    local = case.vocab // case.tp
    hidden = torch.randn(case.depths, case.rows, case.embed, device=dev, generator=gen) * case.hidden_scale
    weights = []
    for _ in range(case.depths):
        w = torch.randn(case.vocab, case.embed, device=dev, generator=gen)[rank * local : (rank + 1) * local]
        weights.append((w * case.embed**-0.5).to(dtype).requires_grad_())
    targets = torch.randint(0, case.vocab, (case.rows, case.depths), device=dev, generator=gen)
    return hidden.to(dtype).requires_grad_(), weights, targets


def _naive_tp(hidden, weights, targets) -> torch.Tensor:
    """Megatron's layout: copy-to-TP-region, local logits, vocab-parallel cross entropy."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

    h = copy_to_tensor_model_parallel_region(hidden)
    return torch.stack([vocab_parallel_cross_entropy(F.linear(h[d], w).float(), targets[:, d]).sum()
                        for d, w in enumerate(weights)])


def _method(case: Case, group) -> Callable:
    """The loss function hidden, weights, targets -> per-depth sums [D] of ``case.method``."""
    vocab = [case.vocab] * case.depths
    if case.method == "naive":
        if case.tp > 1:
            return _naive_tp
        return lambda h, w, t: naive_multi_depth_cross_entropy(h, w, None, t, vocab)[0]
    if case.method in OURS:
        mode, main_grad = OURS[case.method]
        chunk_rows = None
        if case.chunk_mib:
            itemsize = getattr(torch, case.dtype).itemsize
            chunk_rows = chunk_rows_for(case.chunk_mib * MIB, case.vocab // case.tp, itemsize)
        ones = torch.ones(case.depths, device=case.device)  # loss.sum().backward(): grad_output 1 per depth
        return lambda h, w, t: multi_depth_cross_entropy(
            h, w, None, t, vocab, group=group, chunk_rows=chunk_rows, backend=case.device, mode=mode,
            grad_scale=ones if main_grad else None, main_grad=main_grad)[0]
    if case.method == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")
        return lambda h, w, t: torch.stack([loss(w[d], x, t[:, d]).float() for d, x in enumerate(h.unbind(0))])
    if case.method == "cce":
        from cut_cross_entropy import linear_cross_entropy

        return lambda h, w, t: torch.stack([linear_cross_entropy(x, w[d], t[:, d], reduction="sum").float()
                                            for d, x in enumerate(h.unbind(0))])
    raise ValueError(f"unknown method {case.method!r}; one of {list(METHODS)}")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _heap_in_use() -> int:
    """Bytes malloc has handed out and not had back (glibc's mallinfo2: heap chunks in use plus mmapped
    blocks), exact where the resident set is not: freed pages a heap keeps still count in VmRSS."""
    mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return info.uordblks + info.hblkhd


class _Memory:
    """Bytes allocated since ``start``, now and at the peak: torch.cuda's counters, or on CPU malloc's
    bytes in use now (mallinfo2) and the resident set's high-water mark (VmHWM, reset through
    /proc/self/clear_refs) for the peak."""

    def __init__(self, cuda: bool):
        self.cuda, self.base, self.heap_base = cuda, 0, 0

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"/proc/self/status has no {field}")

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base, self.heap_base = self._status("VmRSS"), _heap_in_use()
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")  # VmHWM := VmRSS

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return (torch.cuda.memory_allocated() - self.base) / MIB
        return (_heap_in_use() - self.heap_base) / MIB

    def peak(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / MIB
        return (self._status("VmHWM") - self.base) / MIB


def _times_ms(cases: List[Case], steps: List[Optional[Callable[[], None]]], params: List[torch.Tensor],
              group) -> List[Tuple[List[float], List[float]]]:
    """Forward + backward (wall, CPU) times in ms per case. CUDA: the median of triton's do_bench,
    case by case (no CPU times). CPU: ``repeats`` runs, the cases taken in turn, so that load from
    other processes on the machine falls on all of them alike; the CPU time of this process (all
    its threads) is the figure such load disturbs least."""
    times: List[Tuple[List[float], List[float]]] = [([], []) for _ in cases]
    if cases[0].device == "cuda":
        import triton.testing

        for i, step in enumerate(steps):
            if step is not None:
                times[i][0].append(triton.testing.do_bench(step, warmup=50, rep=300, grad_to_none=params,
                                                           return_mode="median"))
        return times
    for _ in range(cases[0].repeats):
        for i, step in enumerate(steps):
            if step is None:
                continue
            for p in params:
                p.grad = None
            if group is not None:
                dist.barrier(group)
            wall, cpu = time.perf_counter(), time.process_time()
            step()
            times[i][0].append((time.perf_counter() - wall) * 1e3)
            times[i][1].append((time.process_time() - cpu) * 1e3)
    return times


def measure_group(cases: List[Case], rank: int = 0, group=None) -> List[dict]:
    """Cases with the same inputs, in this process. Per case one warm-up forward + backward (kernels
    load or compile, libraries allocate their workspaces) and one measured for memory, kept for
    agreement; then the times. A method that does not import or run is recorded, not fatal."""
    dev = torch.device(cases[0].device)
    hidden, weights, targets = _inputs(cases[0], rank, dev)
    params = [hidden, *weights]
    if any(OURS.get(c.method, (None, False))[1] for c in cases):  # megatron DDP's buffers, before the base
        for w in weights:
            w.main_grad = torch.zeros(w.shape, dtype=torch.float32, device=dev)
    results, steps = [], []
    memory = _Memory(dev.type == "cuda")
    for case in cases:
        step = None
        try:
            fn = _method(case, group)

            def step(fn=fn):
                fn(hidden, weights, targets).sum().backward()

            step()
            for p in params:
                p.grad = None
            memory.start()
            loss = fn(hidden, weights, targets)
            held = memory.now()
            loss.sum().backward()
            peak = memory.peak()
            returned = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None) / MIB
            results.append({"status": "ok", "held_mib": held, "peak_mib": peak, "returned_mib": returned,
                            "beyond_mib": peak - returned, "loss": loss.detach().double(),
                            "grad_hidden": hidden.grad.detach()})
            del loss
        except ImportError as err:
            step = None
            results.append({"status": "not available", "error": f"{type(err).__name__}: {err}"[:300]})
        except Exception as err:  # recorded with the others' results
            step = None
            results.append({"status": "failed", "error": f"{type(err).__name__}: {err}"[:300]})
        finally:
            for p in params:
                p.grad = None
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        steps.append(step)
    for result, (wall, cpu) in zip(results, _times_ms(cases, steps, params, group)):
        if wall:
            result.update(median_ms=statistics.median(wall), min_ms=min(wall), max_ms=max(wall))
        if cpu:
            result["cpu_ms"] = statistics.median(cpu)
    return results


def reference(case: Case) -> dict:
    """fp32 naive loss and grad_h on ``case``'s inputs (weights gathered over TP): the agreement reference."""
    dev = torch.device(case.device)
    full = replace(case, tp=1)
    hidden, weights, targets = _inputs(full, 0, dev)
    hidden = hidden.detach().float().requires_grad_()
    loss = naive_multi_depth_cross_entropy(hidden, [w.detach().float() for w in weights], None, targets,
                                           [case.vocab] * case.depths)[0]
    loss.sum().backward()
    return {"loss": loss.detach().double(), "grad_hidden": hidden.grad}


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def agreement(result: dict, ref: dict) -> dict:
    """Relative errors of the loss and of grad_h (against the reference rounded to grad_h's dtype)."""
    grad = result["grad_hidden"]
    return {"loss_rel_err": _relative(result["loss"], ref["loss"]),
            "grad_hidden_rel_err": _relative(grad, ref["grad_hidden"].to(grad.dtype))}


# -- one process per case (CPU, TP) ---------------------------------------------------------------


def _rank_main(cases: List[Case], rank: int, port: int, threads: int, results) -> None:
    # freed blocks >= 128 KiB go back to the system, and every thread allocates from the main arena
    # (no per-thread arena keeping freed pages), so that the resident set follows the tensors
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    libc.mallopt(M_ARENA_MAX, 1)
    torch.set_num_threads(threads)
    tp, group = cases[0].tp, None
    try:
        if tp > 1:
            os.environ.update(RANK=str(rank), WORLD_SIZE=str(tp), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            dist.init_process_group("gloo")
            group = dist.group.WORLD
            from megatron.core import parallel_state  # naive's vocab-parallel CE reads its TP group

            parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        buffer = io.BytesIO()
        torch.save(measure_group(cases, rank, group), buffer)  # tensors by value: shared memory dies with us
        results.put((rank, buffer.getvalue()))
    finally:
        if group is not None:
            dist.destroy_process_group()


def run_isolated(cases: List[Case], threads: int) -> List[dict]:
    """``measure_group`` in fresh processes, one per TP rank (``threads`` intra-op threads in all).
    Memory: the worst rank's; time: rank 0's."""
    import multiprocessing as mp

    tp = cases[0].tp
    if cases[0].device != "cpu":
        raise ValueError("isolated (one process per rank) cases run on CPU")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(cases, r, port, max(1, threads // tp), results)) for r in range(tp)]
    for p in procs:
        p.start()
    outputs = {}
    while len(outputs) < tp:
        if any(p.exitcode not in (None, 0) for p in procs) and results.empty():
            raise RuntimeError(f"benchmark of {cases[0]} and others failed: exit codes {[p.exitcode for p in procs]}")
        try:
            rank, out = results.get(timeout=1.0)
        except queue.Empty:
            continue
        outputs[rank] = torch.load(io.BytesIO(out))
    for p in procs:
        p.join()
    merged = outputs[0]
    for i, result in enumerate(merged):
        if any(o[i]["status"] != "ok" for o in outputs.values()):
            merged[i] = next(o[i] for o in outputs.values() if o[i]["status"] != "ok")
            continue
        for figure in ("held_mib", "peak_mib", "beyond_mib", "returned_mib"):
            result[figure] = max(o[i][figure] for o in outputs.values())
    return merged


def run_cases(cases: List[Case], isolated: bool = True, threads: int = 1, echo=print,
              deadline: Optional[float] = None) -> List[dict]:
    """Every case, grouped by inputs (one process, or set of TP ranks, per group when ``isolated``),
    with agreement against an fp32 reference per input set and ratios against naive's row. No group
    starts after ``deadline`` (time.monotonic()): its cases are recorded "out of time"."""
    groups: Dict[tuple, List[int]] = {}
    for i, case in enumerate(cases):
        groups.setdefault(case.inputs_key, []).append(i)
    rows: List[Optional[dict]] = [None] * len(cases)
    for members in groups.values():
        if deadline is not None and time.monotonic() > deadline:
            for i in members:
                rows[i] = {**asdict(cases[i]), "status": "out of time"}
            continue
        runnable = [i for i in members if cases[i].method not in CUDA_ONLY or cases[i].device == "cuda"]
        for i in set(members) - set(runnable):
            rows[i] = {**asdict(cases[i]), "status": "needs CUDA"}
        if not runnable:
            continue
        group_cases = [cases[i] for i in runnable]
        results = run_isolated(group_cases, threads) if isolated else measure_group(group_cases)
        ref = reference(group_cases[0])
        naive = next((r for c, r in zip(group_cases, results) if c.method == "naive" and r["status"] == "ok"), None)
        for result in results:
            if result["status"] == "ok":
                result.update(agreement(result, ref))
                if naive is not None:  # the same dtype's naive gradient (the old check's reference)
                    result["grad_hidden_rel_err_naive"] = _relative(result["grad_hidden"], naive["grad_hidden"])
        for i, case, result in zip(runnable, group_cases, results):
            if result["status"] == "ok":
                del result["loss"], result["grad_hidden"]
                echo(f"{case.method:>15} N={case.rows} E={case.embed} TP={case.tp} {case.dtype}"
                     f"{f' chunk {case.chunk_mib} MiB' if case.chunk_mib else ''}"
                     f"{f' hidden x{case.hidden_scale:g}' if case.hidden_scale != 1 else ''}: "
                     f"{result['median_ms']:.1f} ms, held {result['held_mib']:.0f} MiB, peak {result['peak_mib']:.0f} "
                     f"MiB, grad_h rel err {result['grad_hidden_rel_err']:.1e}")
            else:
                echo(f"{case.method:>15}: {result['status']} {result.get('error', '')}")
            rows[i] = {**asdict(case), **result}
        del ref, naive
    _add_ratios(rows)
    return rows


def _add_ratios(rows: List[dict]) -> None:
    """time / naive and each memory figure / naive's, against naive's row of the same inputs."""
    def key(r):
        return Case(**{k: r[k] for k in Case.__dataclass_fields__}).inputs_key

    naive = {key(r): r for r in rows if r["method"] == "naive" and r["status"] == "ok"}
    for r in rows:
        ref = naive.get(key(r))
        if ref is None or r["status"] != "ok":
            continue
        r["time_over_naive"] = r["median_ms"] / ref["median_ms"]
        if "cpu_ms" in r:
            r["cpu_over_naive"] = r["cpu_ms"] / ref["cpu_ms"]
        for figure in ("held", "peak", "beyond"):
            r[f"{figure}_over_naive"] = r[f"{figure}_mib"] / ref[f"{figure}_mib"] if ref[f"{figure}_mib"] > 0 else None


DEFINITIONS = [
    "held: allocated when the forward has returned (kept for backward; for ours, the gradients it made); "
    "CPU: malloc's bytes in use (mallinfo2)",
    "peak: the most allocated during forward + backward (total peak); CPU: the resident set's high-water mark",
    "beyond: peak minus the gradients the method returns (hidden's, and the classifiers' unless accumulated "
    "into pre-existing main_grad buffers)",
    "CPU ms: the process's CPU time (all its threads; TP: rank 0's) of the same runs; "
    "ratios are against naive's row with the same inputs; grad_h rel err is against an fp32 naive run, rounded "
    "to the method's dtype, and against naive in the method's dtype",
]


def _number(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(rows: List[dict]) -> str:
    """Markdown: the definitions, then one row per case."""
    head = ("| method | N | D | V | E | TP | dtype | chunk MiB | fwd+bwd ms (median) | min-max | time / naive "
            "| CPU ms (median) | CPU / naive "
            "| held MiB | held / naive | peak MiB | peak / naive | beyond MiB | beyond / naive | returned grads MiB "
            "| loss rel err | grad_h rel err | grad_h rel err vs naive |")
    lines = [f"- {d}" for d in DEFINITIONS] + ["", head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        label = r["method"] + (f" (hidden x{r['hidden_scale']:g})" if r["hidden_scale"] != 1 else "")
        chunk = r["chunk_mib"] or (DEFAULT_CHUNK_BYTES // MIB if r["method"] in OURS else "-")
        shape = (f"| {label} | {r['rows']} | {r['depths']} | {r['vocab']} | {r['embed']} | {r['tp']} "
                 f"| {r['dtype']} | {chunk} ")
        if r["status"] != "ok":
            lines.append(shape + f"| {r['status']}{': ' + r['error'] if 'error' in r else ''} |" + " |" * 15)
            continue
        lines.append(
            shape + f"| {r['median_ms']:.1f} | {r['min_ms']:.1f}-{r['max_ms']:.1f} "
            f"| {_number(r.get('time_over_naive'), '.3f')} | {_number(r.get('cpu_ms'), '.1f')} "
            f"| {_number(r.get('cpu_over_naive'), '.3f')} | {r['held_mib']:.1f} "
            f"| {_number(r.get('held_over_naive'), '.4f')} | {r['peak_mib']:.1f} "
            f"| {_number(r.get('peak_over_naive'), '.4f')} | {r['beyond_mib']:.1f} "
            f"| {_number(r.get('beyond_over_naive'), '.4f')} | {r['returned_mib']:.1f} "
            f"| {r['loss_rel_err']:.1e} | {r['grad_hidden_rel_err']:.1e} "
            f"| {_number(r.get('grad_hidden_rel_err_naive'), '.1e')} |")
    return "\n".join(lines)


# -- step (c) --------------------------------------------------------------------------------------

AGREEMENT = {"float32": 1e-5, "bfloat16": 2e-2}  # loss and grad_h rel err a method must keep
START_BY_S = 60  # no group of cases or profile starts later than this into the step (budget: run.py's 90 s)
# (name, method, numerator field, denominator method or None, limit): issue 22's GPU acceptance
TARGETS = [
    ("ours time / liger's", "ours", "median_ms", "liger", 0.9),
    ("ours-main-grad time / liger's", "ours-main-grad", "median_ms", "liger", 0.9),
    ("ours-recompute time / liger's", "ours-recompute", "median_ms", "liger", 1.3),
    ("ours beyond / naive's", "ours", "beyond_over_naive", None, 0.05),
    ("ours-main-grad beyond / naive's", "ours-main-grad", "beyond_over_naive", None, 0.05),
    ("ours grad_h rel err (fp32 reference)", "ours", "grad_hidden_rel_err", None, 1e-4),
    ("ours grad_h rel err (naive, bf16)", "ours", "grad_hidden_rel_err_naive", None, 1e-4),
    ("liger grad_h rel err (fp32 reference)", "liger", "grad_hidden_rel_err", None, 1e-4),
]


def step_cases(cpu: bool) -> List[Case]:
    """At the head's shape: every method; E x 2 (4,096 on GPU) for naive, ours and Liger; ours with
    32 and 128 MiB chunks; peaked logits (hidden x 4) for ours and Cut Cross-Entropy."""
    shape = head_shape(cpu)
    base = Case("naive", shape.rows, shape.depths, shape.vocab, shape.embed, dtype=shape.dtype,
                device="cpu" if cpu else "cuda")
    return ([replace(base, method=m) for m in METHODS]
            + [replace(base, method=m, embed=2 * shape.embed) for m in ("naive", "ours", "liger")]
            + [replace(base, method="ours", chunk_mib=mib) for mib in (32, 128)]
            + [replace(base, method=m, hidden_scale=4.0) for m in ("ours", "cce")])


def profile_kernels(case: Case, limit: int = 12) -> List[dict]:
    """The device kernels of one forward + backward of ``case`` by total device time: what limits it."""
    from torch.profiler import ProfilerActivity, profile

    hidden, weights, targets = _inputs(case, 0, torch.device(case.device))
    fn = _method(case, None)
    fn(hidden, weights, targets).sum().backward()  # warm
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(hidden, weights, targets).sum().backward()
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)[:limit]
    return [{"kernel": e.key[:100], "ms": round(e.device_time_total / 1e3, 3), "calls": e.count} for e in events]


def _targets(rows: List[dict]) -> List[dict]:
    main = {r["method"]: r for r in rows if r["status"] == "ok" and r["embed"] == rows[0]["embed"]
            and r["hidden_scale"] == 1 and not r["chunk_mib"]}
    out = []
    for name, method, field, over, limit in TARGETS:
        value = None
        if method in main and (over is None or over in main):
            value = main[method][field] / (main[over][field] if over else 1.0)
        out.append({"target": name, "value": value, "limit": limit, "met": None if value is None else value <= limit})
    return out


def run(args) -> dict:
    deadline = time.monotonic() + START_BY_S
    cases = step_cases(args.cpu)
    shape = cases[0]
    print(f"N={shape.rows} D={shape.depths} V={shape.vocab} E={shape.embed} {shape.dtype} on {shape.device}",
          flush=True)
    rows = run_cases(cases, isolated=False, echo=lambda line: print(line, flush=True), deadline=deadline)
    failures = [f"{r['method']}: {r['error']}" for r in rows if r["status"] == "failed"]
    failures += [f"{r['method']} disagrees with fp32 naive" for r in rows if r["status"] == "ok" and not (
        r["loss_rel_err"] <= AGREEMENT[r["dtype"]] and r["grad_hidden_rel_err"] <= AGREEMENT[r["dtype"]])]
    result = {"shape": {k: getattr(shape, k) for k in ("rows", "depths", "vocab", "embed", "dtype")},
              "definitions": DEFINITIONS, "methods": rows}
    if not args.cpu:
        result["targets"] = _targets(rows)
    if not args.cpu and time.monotonic() < deadline:
        try:
            result["profile_ours"] = profile_kernels(replace(shape, method="ours"))
        except Exception as err:  # the profile explains the time; its absence fails nothing
            result["profile_ours"] = f"{type(err).__name__}: {err}"[:300]
    main_rows = [r for r in rows if r["status"] == "ok" and r["embed"] == shape.embed and r["hidden_scale"] == 1
                 and not r["chunk_mib"]]
    summary = "; ".join(f"{r['method']} {r['median_ms']:.1f} ms" for r in main_rows)
    missed = [t["target"] for t in result.get("targets", []) if t["met"] is False]
    late = sum(r["status"] == "out of time" for r in rows)
    summary += (f"; targets missed: {', '.join(missed)}" if missed else "") + (
        f"; {late} cases out of time" if late else "") + (
        f"; FAILED: {'; '.join(failures)}" if failures else "")
    return {"status": FAILED if failures or not main_rows else OK, "summary": summary, **result}


if __name__ == "__main__":
    main(run, __doc__)
