"""The benchmark's table, its comparisons (ASVR / baseline, A/B precision) and its JSON."""

import dataclasses
import json
from typing import Dict, List

from megatron_asvr.benchmark.runner import RunResult

GIB = 2**30


def _layout(r: RunResult) -> str:
    s = r.settings
    return f"{s['tensor_parallel']}x{s['pipeline_parallel']}x{r.data_parallel}"


def format_table(results: List[RunResult], on_gpu: bool) -> str:
    """One markdown row per run; rates use the median step time over the timed steps."""
    memory = "peak mem GiB" if on_gpu else "peak RSS GiB"
    lines = [
        f"| run | precision | batching | TPxPPxDP | micro/global x seq | step s | min step s | real tokens/s/GPU "
        f"| padding % | samples/s | TFLOP/s/GPU | MFU | {memory} | visual head % of step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s, d = r.settings, r.derived
        precision = s["precision"] + (f" ({s['fp8_recipe']})" if s["precision"] == "fp8" else "")
        mfu = f"{d['mfu']:.1%}" if d["mfu"] is not None else "-"
        lines.append(
            f"| {r.name} | {precision} | {s['batching']} | {_layout(r)} "
            f"| {s['micro_batch']}/{s['global_batch']} x {s['seq_length']} ({s['lengths']}) "
            f"| {d['step_time_s']:.4f} | {d['min_step_time_s']:.4f} | {d['tokens_per_s_per_gpu']:,.0f} "
            f"| {d['padding_share']:.1%} | {d['samples_per_s']:.2f} "
            f"| {d['tflops_per_gpu']:.4g} | {mfu} | {r.peak_memory_bytes / GIB:.2f} | {d['visual_head_share']:.1%} |"
        )
    return "\n".join(lines)


def asvr_comparison(baseline: RunResult, asvr: RunResult) -> Dict[str, float]:
    """How much the visual head costs: step-time ratio, and the head's share measured by its hooks."""
    ratio = asvr.derived["step_time_s"] / baseline.derived["step_time_s"]
    return {
        "asvr_over_baseline_step_time": ratio,
        "asvr_over_baseline_min_step_time": asvr.derived["min_step_time_s"] / baseline.derived["min_step_time_s"],
        "head_share_from_step_times": 1 - 1 / ratio,
        "head_share_from_hooks": asvr.derived["visual_head_share"],
        "flops_ratio": asvr.flops["total"] / baseline.flops["total"],
    }


def precision_comparison(first: RunResult, second: RunResult) -> dict:
    """Speed ratio (first's step time / second's) and per-step loss differences over all steps run."""
    names = sorted({k for step in first.losses for k in step if k.startswith("loss/")})
    per_step = {n: [abs(a[n] - b[n]) for a, b in zip(first.losses, second.losses) if n in a and n in b] for n in names}
    return {
        "speedup": first.derived["step_time_s"] / second.derived["step_time_s"],
        "steps_compared": len(first.losses),
        "same_initial_weights": first.initial_weights_checksum == second.initial_weights_checksum,
        **{f"max_abs_diff/{n}": max(v) for n, v in per_step.items() if v},
        **{f"last_abs_diff/{n}": v[-1] for n, v in per_step.items() if v},
    }


def packing_comparison(results: List[RunResult]) -> Dict[str, Dict[str, float]]:
    """Per batching mode: its padding share and its real tokens/s over full padding's (the first run)."""
    full = results[0].derived["tokens_per_s_per_gpu"]
    return {r.name: {"padding_share": r.derived["padding_share"],
                     "real_tokens_per_s_over_pad_full": r.derived["tokens_per_s_per_gpu"] / full} for r in results}


def format_comparison(comparison: str, first: RunResult, second: RunResult, numbers: Dict) -> str:
    if comparison == "packing":
        return "; ".join(f"{name}: padding {n['padding_share']:.1%} of computed positions, real tokens/s "
                         f"x{n['real_tokens_per_s_over_pad_full']:.2f} of pad_full's" for name, n in numbers.items())
    if comparison == "asvr":
        return (f"ASVR / baseline step time: {numbers['asvr_over_baseline_step_time']:.3f} (median), "
                f"{numbers['asvr_over_baseline_min_step_time']:.3f} (min); FLOPs ratio {numbers['flops_ratio']:.3f}; "
                f"visual head share of the ASVR step: "
                f"{numbers['head_share_from_hooks']:.1%} by its hooks, {numbers['head_share_from_step_times']:.1%} "
                f"from the step times")
    diffs = "; ".join(f"{k.split('/', 1)[1]} max |diff| {v:.3g}"
                      for k, v in numbers.items() if k.startswith("max_abs_diff/"))
    return (f"{second.name} vs {first.name}: speed ratio {numbers['speedup']:.3f} ({first.name} step time / "
            f"{second.name} step time); over {numbers['steps_compared']} steps from "
            f"{'the same' if numbers['same_initial_weights'] else 'DIFFERENT'} initial weights: {diffs or 'no losses'}")


def to_json(results: List[RunResult], comparisons: Dict[str, Dict]) -> str:
    return json.dumps({"runs": [dataclasses.asdict(r) for r in results], "comparisons": comparisons}, indent=2)


def comparisons_of(mode: str, results: List[RunResult]) -> Dict[str, Dict]:
    """The comparison a mode asks for (none for a single run)."""
    if mode == "compare-asvr":
        return {"asvr": asvr_comparison(*results)}
    if mode == "ab":
        return {"ab": precision_comparison(*results)}
    if mode == "compare-packing":
        return {"packing": packing_comparison(results)}
    return {}


def render(results: List[RunResult], comparisons: Dict[str, Dict], on_gpu: bool) -> str:
    """The table, then one line per comparison."""
    lines = [format_table(results, on_gpu)]
    for comparison, numbers in comparisons.items():
        lines.append(format_comparison(comparison, results[0], results[1], numbers))
    return "\n".join(lines)
