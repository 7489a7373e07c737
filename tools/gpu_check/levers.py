"""Step (k): each fast path's lever in milliseconds, on its own, without a model build.

One process, device events, the median of a few repetitions after a warm-up (first calls timed apart:
a torch.compile'd megatron fusion pays its compile there). Shapes are one Vicuna-7B layer's at
micro-batch 2 x 2048 (with --cpu, tiny ones through the same code):

    wgrad      weight gradient into an fp32 main_grad: mm + add_ (megatron unfused) vs the shim's addmm
               with an fp32 output (runtime/fast_paths.WgradAccumulation) -- does torch's out_dtype work here?
    rms_norm   forward + backward: the reference (fp32 variance), torch's F.rms_norm, Liger's Triton kernel
    swiglu     forward + backward: unfused silu * x vs megatron's bias_swiglu_impl (compiled on first call)
    attention  SDPA forward + backward, causal, [b, heads, s, 128]: math, efficient, flash, cuDNN
    adamw      torch AdamW over ~0.5 B fp32 parameters: foreach (megatron's fallback) vs fused
    grad_norm  megatron's local l2 norm (a host sync per tensor) vs the foreach norm (none)
    head_mlps  forward + backward of one head layer's 8 per-depth MLPs (E 2048 -> 4096 -> 2048, 1458 image
               rows: micro-batch 2 x 729): 8 pairs of GEMMs vs two batched ones (model/depth_mlps.py)
"""

import statistics
import time
from typing import Callable, Dict

import torch
import torch.nn.functional as F

from tools.gpu_check.step_io import FAILED, OK, device, main

REPEATS, WARMUP = 5, 2


def _timer(dev: torch.device) -> Callable[[Callable[[], object], int], float]:
    def measure(fn: Callable[[], object], repeats: int = REPEATS) -> float:
        """Median ms of ``fn`` over ``repeats`` runs."""
        times = []
        for _ in range(repeats):
            if dev.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                begin = time.perf_counter()
                fn()
                times.append((time.perf_counter() - begin) * 1e3)
        return statistics.median(times)

    return measure


def _warm_then_time(measure, fn) -> Dict[str, float]:
    """{"first_call_ms", "ms"}: the first call on its own (compiles, autotuning), then the median."""
    first = measure(fn, 1)
    for _ in range(WARMUP - 1):
        fn()
    return {"first_call_ms": first, "ms": measure(fn)}


def _fwd_bwd(fn, *inputs):
    def run():
        out = fn(*inputs)
        out.backward(torch.ones_like(out))
    return run


def wgrad(dev, dtype, measure, tokens, width) -> dict:
    from megatron_asvr.runtime.fast_paths import WgradAccumulation

    inp, gout = (torch.randn(tokens, width, device=dev, dtype=dtype) for _ in range(2))
    main_grad = torch.zeros(width, width, device=dev, dtype=torch.float32)
    out = {"unfused (mm + add_)": measure(lambda: main_grad.add_(gout.t() @ inp))}
    try:
        out["shim (addmm into fp32)"] = measure(lambda: WgradAccumulation.wgrad_gemm_accum_fp32(inp, gout, main_grad))
        if dev.type == "cuda":
            reference = main_grad.clone().zero_()
            reference.add_((gout.t() @ inp).float())
            check = torch.zeros_like(main_grad)
            WgradAccumulation.wgrad_gemm_accum_fp32(inp, gout, check)
            out["shim max rel err"] = ((check - reference).abs().max() / reference.abs().max()).item()
        out["mixed-dtype addmm (out_dtype) works"] = WgradAccumulation.mixed_addmm.get("addmm")
    except (TypeError, RuntimeError) as err:
        out["shim error"] = str(err).splitlines()[0][:200]
    return out


def rms_norm(dev, dtype, measure, tokens, width) -> dict:
    from megatron_asvr.model.norms import RMS_NORM_KERNELS
    from megatron_asvr.runtime.fast_paths import have_liger

    x = torch.randn(tokens, width, device=dev, dtype=dtype, requires_grad=True)
    w = torch.ones(width, device=dev, dtype=dtype, requires_grad=True)
    names = ["reference", "torch"] + (["liger"] if dev.type == "cuda" and have_liger() else [])
    return {name: _warm_then_time(measure, _fwd_bwd(RMS_NORM_KERNELS[name], x, w, 1e-5)) for name in names}


def swiglu(dev, dtype, measure, tokens, width) -> dict:
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl

    x = torch.randn(tokens, 2 * width, device=dev, dtype=dtype, requires_grad=True)

    def unfused(t):
        a, b = t.chunk(2, dim=-1)
        return F.silu(a) * b

    out = {"unfused": _warm_then_time(measure, _fwd_bwd(unfused, x))}
    if dev.type == "cuda":  # megatron's is torch.compile'd: inductor on CPU costs ~45 s, not timed here
        out["megatron bias_swiglu_impl"] = _warm_then_time(
            measure, _fwd_bwd(lambda t: bias_swiglu_impl(t, None, False, False), x))
    return out


def attention(dev, dtype, measure, batch, heads, seq, head_dim) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(batch, heads, seq, head_dim, device=dev, dtype=dtype, requires_grad=True)
               for _ in range(3))
    out = {}
    for name in ("math", "efficient", "flash", "cudnn"):
        backend = {"math": SDPBackend.MATH, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                   "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[name]

        def run():
            with sdpa_kernel([backend]):
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            o.backward(torch.ones_like(o))

        try:
            out[name] = _warm_then_time(measure, run)
        except RuntimeError as err:  # not available for this device, dtype or shape
            out[name] = {"error": str(err).splitlines()[0][:160]}
    return out


def adamw(dev, measure, tensors, numel) -> dict:
    params = [torch.zeros(numel, device=dev, requires_grad=True) for _ in range(tensors)]
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    out = {"params_b": tensors * numel / 1e9}
    for name, flags in (("foreach", {"foreach": True}), ("fused", {"fused": True})):
        optimizer = torch.optim.AdamW(params, lr=1e-5, **flags)
        out[name] = _warm_then_time(measure, optimizer.step)
        del optimizer
    return out


def grad_norm(dev, measure, tensors, numel) -> dict:
    from megatron.core.utils import local_multi_tensor_l2_norm

    from megatron_asvr.runtime import fast_paths

    grads = [torch.randn(numel, device=dev) for _ in range(tensors)]
    local = measure(lambda: local_multi_tensor_l2_norm(0, None, [grads], False))
    foreach = measure(lambda: fast_paths._foreach_l2_norm(0, None, [grads], False))
    a = local_multi_tensor_l2_norm(0, None, [grads], False)[0]
    b = fast_paths._foreach_l2_norm(0, None, [grads], False)[0]
    return {"tensors": tensors, "local (host sync per tensor)": local, "foreach": foreach,
            "rel diff": abs(a.item() - b.item()) / a.item()}


def head_mlps(dev, dtype, measure, depth, rows, width) -> dict:
    from megatron_asvr.model.depth_mlps import BatchedLinear

    x = torch.randn(depth, rows, width, device=dev, dtype=dtype, requires_grad=True)
    w1, w2 = ((0.02 * torch.randn(depth, *shape, device=dev, dtype=dtype)).requires_grad_()
              for shape in ((2 * width, width), (width, 2 * width)))

    def per_depth(t):
        return torch.stack([F.linear(F.gelu(F.linear(t[d], w1[d])), w2[d]) for d in range(depth)])

    def batched(t):
        return BatchedLinear.apply(F.gelu(BatchedLinear.apply(t, w1, False)), w2, False)

    out = {"per depth": _warm_then_time(measure, _fwd_bwd(per_depth, x)),
           "batched": _warm_then_time(measure, _fwd_bwd(batched, x))}
    with torch.no_grad():
        a, b = per_depth(x).float(), batched(x).float()
    out["max rel diff"] = ((a - b).abs().max() / a.abs().max()).item()
    return out


def run(args) -> dict:
    dev = device(args.cpu)
    if args.cpu:
        from megatron_asvr.runtime import cpu_emulation

        cpu_emulation.install()  # megatron's local norm names the "cuda" device
    dtype = torch.float32 if args.cpu else torch.bfloat16
    measure = _timer(dev)
    tokens, width = (256, 64) if args.cpu else (4096, 4096)
    levers = {
        "wgrad": lambda: wgrad(dev, dtype, measure, tokens, width),
        "rms_norm": lambda: rms_norm(dev, dtype, measure, tokens, width),
        "swiglu": lambda: swiglu(dev, dtype, measure, tokens, 11008 if not args.cpu else 96),
        "attention": lambda: attention(dev, dtype, measure, *((1, 2, 64, 16) if args.cpu else (2, 32, 2048, 128))),
        "adamw": lambda: adamw(dev, measure, *((8, 4096) if args.cpu else (64, 8_000_000))),
        "grad_norm": lambda: grad_norm(dev, measure, *((50, 1024) if args.cpu else (291, 1_000_000))),
        "head_mlps": lambda: head_mlps(dev, dtype, measure, 8, *((64, 32) if args.cpu else (1458, 2048))),
    }
    results, failed = {}, []
    for name, lever in levers.items():
        try:
            results[name] = lever()
        except Exception as err:  # one lever's failure is its result; the others still run
            results[name], _ = {"error": f"{type(err).__name__}: {err}".splitlines()[0][:300]}, failed.append(name)
        print(f"{name}: {results[name]}", flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    summary = "; ".join(f"{name}: {_short(r)}" for name, r in results.items())
    return {"status": FAILED if failed else OK, "summary": summary[:600], "levers": results, "failed": failed}


def _short(result: dict) -> str:
    """``variant ms`` pairs of one lever."""
    parts = []
    for key, value in result.items():
        ms = value.get("ms") if isinstance(value, dict) else value
        if isinstance(ms, float) and "err" not in key and "diff" not in key and key != "params_b":
            parts.append(f"{key} {ms:.3g}")
    return ", ".join(parts) or str(result)[:80]


if __name__ == "__main__":
    main(run, __doc__)
