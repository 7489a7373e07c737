"""Step (c): the visual head's loss at the real head shape, four ways: time, peak memory, agreement.

Methods, each summing the cross entropy per depth of D classifiers over hidden [N, D, E]:
naive (materialised logits + F.cross_entropy per depth, megatron_asvr.kernels.reference), ours
(megatron_asvr.kernels.multi_depth_cross_entropy on the CUDA extension; the CPU one with --cpu),
Liger's LigerFusedLinearCrossEntropyLoss per depth and Cut Cross-Entropy's linear_cross_entropy
per depth (Triton: CUDA only; a library that does not import is "not available"). No classifier
bias: Cut Cross-Entropy takes none. Every method gets the same fresh random inputs (seeded, never
zeros). Peak memory: torch.cuda.max_memory_allocated over one forward + backward, minus the
allocation once the inputs exist (it includes the gradients of hidden and weights, the same for
every method). Time: the median forward + backward of triton.testing.do_bench (CUDA events, after
its warm-up); with --cpu, the median of a few wall-clock runs. Agreement with naive: relative error
of the summed loss and of grad hidden, so that a fast wrong method cannot win.
"""

import gc
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

from megatron_asvr.kernels import multi_depth_cross_entropy
from megatron_asvr.kernels.reference import naive_multi_depth_cross_entropy
from tools.gpu_check.shapes import HeadShape, head_shape
from tools.gpu_check.step_io import FAILED, NOT_AVAILABLE, OK, device, main

MIB = 2**20
LOSS_RTOL = {"float32": 1e-5, "bfloat16": 1e-2}  # summed loss vs naive; grad_hidden gets 5x that


def _liger() -> Callable:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")
    return lambda hidden, weights, targets: torch.stack(
        [loss(w, hidden[:, d].contiguous(), targets[:, d]).float() for d, w in enumerate(weights)])


def _cce() -> Callable:
    from cut_cross_entropy import linear_cross_entropy

    return lambda hidden, weights, targets: torch.stack(
        [linear_cross_entropy(hidden[:, d].contiguous(), w, targets[:, d], reduction="sum").float()
         for d, w in enumerate(weights)])


def _methods(cpu: bool) -> Dict[str, Optional[Callable[[], Callable]]]:
    """name -> a factory of the loss function hidden, weights, targets -> per-depth sums [D] (None: needs CUDA)."""
    backend = "cpu" if cpu else "cuda"

    def naive():
        return lambda h, w, t: naive_multi_depth_cross_entropy(h, w, None, t, [x.shape[0] for x in w])[0]

    def ours():
        return lambda h, w, t: multi_depth_cross_entropy(h, w, None, t, [x.shape[0] for x in w], backend=backend)[0]

    return {"naive": naive, "ours": ours, "liger": None if cpu else _liger, "cce": None if cpu else _cce}


def _inputs(shape: HeadShape, dev: torch.device):
    """hidden [N, D, E], weights D x [V, E] (trainable), targets [N, D]: random, the same for every method."""
    gen = torch.Generator(device=dev).manual_seed(0)
    dtype = getattr(torch, shape.dtype)
    hidden = torch.randn(shape.rows, shape.depths, shape.embed, device=dev, generator=gen).to(dtype)
    weights = [(torch.randn(shape.vocab, shape.embed, device=dev, generator=gen) * shape.embed**-0.5).to(dtype)
               for _ in range(shape.depths)]
    targets = torch.randint(0, shape.vocab, (shape.rows, shape.depths), device=dev, generator=gen)
    return hidden.requires_grad_(), [w.requires_grad_() for w in weights], targets


def _median_ms(step: Callable[[], None], params: List[torch.Tensor], cuda: bool) -> float:
    if cuda:
        import triton.testing

        return triton.testing.do_bench(step, warmup=100, rep=500, grad_to_none=params, return_mode="median")
    times = []
    for _ in range(5):
        for p in params:
            p.grad = None
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(fn: Callable, shape: HeadShape, dev: torch.device) -> dict:
    """Peak memory of one forward + backward (CUDA only), its losses and grad hidden, then the median time."""
    cuda = dev.type == "cuda"
    hidden, weights, targets = _inputs(shape, dev)
    params = [hidden, *weights]
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    loss = fn(hidden, weights, targets)  # [D]
    loss.sum().backward()
    out = {"loss": loss.detach().double().cpu(), "grad_hidden": hidden.grad.detach().float()}
    if cuda:
        torch.cuda.synchronize()
        out["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / MIB
    out["grads_mib"] = sum(p.numel() * p.element_size() for p in params) / MIB
    out["median_ms"] = _median_ms(lambda: fn(hidden, weights, targets).sum().backward(), params, cuda)
    return out


def profile_kernels(fn: Callable, shape: HeadShape, dev: torch.device, limit: int = 10) -> List[dict]:
    """The device kernels of one forward + backward of ``fn`` by total device time: what limits it."""
    from torch.profiler import ProfilerActivity, profile

    hidden, weights, targets = _inputs(shape, dev)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(hidden, weights, targets).sum().backward()
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)[:limit]
    return [{"kernel": e.key[:100], "ms": round(e.device_time_total / 1e3, 3), "calls": e.count} for e in events]


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


def run(args) -> dict:
    dev = device(args.cpu)
    shape = head_shape(args.cpu)
    print(f"N={shape.rows} D={shape.depths} V={shape.vocab} E={shape.embed} {shape.dtype} on {dev}", flush=True)
    rows, reference, failures = [], None, []
    for name, factory in _methods(args.cpu).items():
        row = {"method": name}
        if factory is None:
            rows.append({**row, "status": "needs CUDA"})
            continue
        try:
            fn = factory()
        except Exception as err:  # a library missing or broken here is reported, not fatal
            rows.append({**row, "status": NOT_AVAILABLE, "error": f"{type(err).__name__}: {err}"[:300]})
            continue
        try:
            result = measure(fn, shape, dev)
        except Exception as err:
            failures.append(name)
            rows.append({**row, "status": FAILED, "error": f"{type(err).__name__}: {err}"[:300]})
            continue
        finally:
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        loss, grad = result.pop("loss"), result.pop("grad_hidden")
        if name == "naive":
            reference = (loss, grad)
        else:
            result["loss_rel_err"] = _relative(loss, reference[0]) if reference else None
            result["grad_hidden_rel_err"] = _relative(grad, reference[1]) if reference else None
            tol = LOSS_RTOL[shape.dtype]
            if reference and not (result["loss_rel_err"] <= tol and result["grad_hidden_rel_err"] <= 5 * tol):
                failures.append(f"{name} disagrees with naive")
        if name == "ours" and dev.type == "cuda":
            try:
                result["profile"] = profile_kernels(fn, shape, dev)
            except Exception as err:  # the profile explains the time; its absence fails nothing
                result["profile"] = f"{type(err).__name__}: {err}"[:300]
        rows.append({**row, "status": OK, **result})
        print(f"  {name}: {result}", flush=True)
    naive = next((r for r in rows if r["method"] == "naive" and r["status"] == OK), None)
    for r in rows:
        if naive and r["status"] == OK:
            r["time_over_naive"] = r["median_ms"] / naive["median_ms"]
            if "peak_mib" in r:
                r["peak_over_naive"] = r["peak_mib"] / naive["peak_mib"]
    ours = next((r for r in rows if r["method"] == "ours" and r["status"] == OK), None)
    summary = (f"ours {ours['median_ms']:.1f} ms" + (f", {ours['peak_over_naive']:.3f} x naive's peak"
                                                    if "peak_over_naive" in ours else "")
               if ours else "ours did not run")
    others = [f"{r['method']} {r['median_ms']:.1f} ms" if r["status"] == OK else f"{r['method']} {r['status']}"
              for r in rows if r["method"] != "ours"]
    summary += "; " + ", ".join(others) + (f"; FAILED: {', '.join(failures)}" if failures else "")
    return {"status": FAILED if failures or not ours else OK, "summary": summary,
            "shape": vars(shape), "methods": rows}


if __name__ == "__main__":
    main(run, __doc__)
