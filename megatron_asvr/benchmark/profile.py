"""One training step under torch's profiler, its time summed by kernel class.

On a GPU the device kernels are classified by name (cuBLAS / CUTLASS GEMMs, flash / cuDNN attention,
the optimizer's multi-tensor kernels, copies, the rest elementwise and reductions); on CPU the
operators that ran (``aten::mm`` ...), by the same rules, so the code path is tested.
"""

import re
from typing import Callable, Dict, List, Tuple

# First match wins: the order matters (an optimizer kernel name may contain "copy").
KERNEL_CLASSES: List[Tuple[str, re.Pattern]] = [
    ("attention", re.compile(r"flash|fmha|cudnn.*(attn|attention|sdpa)|scaled_dot_product|_efficient_attention"
                             r"|attention", re.I)),
    ("gemm", re.compile(r"gemm|nvjet|cutlass|xmma|cublas|aten::(mm|addmm|bmm|matmul|linear|baddbmm)$", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor|foreach|_fused_adamw", re.I)),
    ("copies", re.compile(r"memcpy|memset|copy|aten::(to|_to_copy|cat|stack|clone|contiguous|index_select"
                          r"|gather|scatter)$|catarraybatched", re.I)),
]
OTHER = "elementwise"  # activations, norms, reductions, casts, softmax: what is left
TOP_KERNELS = 15


def kernel_class(name: str) -> str:
    for label, pattern in KERNEL_CLASSES:
        if pattern.search(name):
            return label
    return OTHER


def summarise(times_us: Dict[str, float]) -> dict:
    """{"by_class_ms", "total_ms", "top": [(name, class, ms), ...]} from per-kernel total microseconds."""
    by_class = {label: 0.0 for label, _ in KERNEL_CLASSES}
    by_class[OTHER] = 0.0
    for name, us in times_us.items():
        by_class[kernel_class(name)] += us / 1e3
    top = sorted(times_us.items(), key=lambda item: -item[1])[:TOP_KERNELS]
    return {"by_class_ms": by_class, "total_ms": sum(by_class.values()),
            "top": [(name[:120], kernel_class(name), us / 1e3) for name, us in top]}


def profile_step(step: Callable[[], object], clock) -> dict:
    """Run ``step`` once under the profiler; its kernels (GPU) or leaf operators (CPU) by class."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if clock.cuda else [ProfilerActivity.CPU]
    clock.synchronize()
    with profile(activities=activities) as prof:
        step()
        clock.synchronize()
    times: Dict[str, float] = {}
    for event in prof.key_averages():
        if clock.cuda:
            # the kernels themselves (device events), not the operators that launched them (counted twice)
            if not str(getattr(event, "device_type", "")).endswith("CUDA"):
                continue
            us = getattr(event, "self_device_time_total", None)
            us = event.self_cuda_time_total if us is None else us  # torch < 2.4 names it cuda
        elif event.key.startswith("aten::"):
            us = event.self_cpu_time_total
        else:
            continue
        if us > 0:
            times[event.key] = times.get(event.key, 0.0) + us
    return {"device": "cuda" if clock.cuda else "cpu", **summarise(times)}
