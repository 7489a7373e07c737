"""The check's results as JSON and as markdown: the stamp, one row per step, then the tables of (c), the
whole-step steps and the race with transformers; the profiled steps' summary."""

import json
from typing import Dict, List


def to_json(report: dict) -> str:
    return json.dumps(report, indent=2, default=str)


def _number(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _one_line(text: str, limit: int = 240) -> str:
    text = " ".join(str(text).split()).replace("|", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _header(report: dict) -> str:
    s = report["stamp"]
    versions = s.get("versions", {})
    return (f"## GPU check ({report['mode']} mode): {s.get('device', '?')} · torch {s.get('torch', '?')} "
            f"(CUDA {s.get('cuda') or '-'}) · Python {s.get('python', '?')} · transformers "
            f"{versions.get('transformers', '?')} · triton {versions.get('triton', '?')} · {s.get('date', '?')} · "
            f"commit {s.get('commit', '?')} · {report['total_s']:.0f} s")


def _steps_table(steps: List[dict]) -> List[str]:
    lines = ["| step | what | status | s (budget) | result |", "|---|---|---|---|---|"]
    for s in steps:
        budget = "-" if s["budget_s"] is None else f"{s['budget_s']}"
        result = s["summary"]
        if s.get("output_tail") and s["status"] != "ok":
            last = [line for line in s["output_tail"].splitlines() if line.strip()][-1:]
            result += f" [last output: {last[0] if last else '-'}]"
        lines.append(f"| {s['key']} | {s['title']} | {s['status']} | {s['seconds']:.0f} ({budget}) "
                     f"| {_one_line(result)} |")
    return lines


def _fused_ce_table(step: dict) -> List[str]:
    shape = step.get("shape", {})
    lines = [f"(c) fused CE, N={shape.get('rows')} D={shape.get('depths')} V={shape.get('vocab')} "
             f"E={shape.get('embed')} {shape.get('dtype')}, no bias, forward + backward (tools/gpu_check/fused_ce.py). "
             f"Memory figures:", ""] + [f"- {d}" for d in step.get("definitions", [])] + [
             "", "| method | E | chunk MiB | status | fwd+bwd ms | time / naive | held MiB | held / naive | peak MiB "
             "| peak / naive | beyond MiB | beyond / naive | loss rel err | grad_h rel err | grad_h rel err vs naive |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in step.get("methods", []):
        label = r["method"] + (f" (hidden x{r['hidden_scale']:g})" if r.get("hidden_scale", 1) != 1 else "")
        status = _one_line(r["status"] + (": " + r["error"] if "error" in r else ""), 80)
        lines.append(f"| {label} | {r.get('embed')} | {r.get('chunk_mib') or '-'} | {status} "
                     f"| {_number(r.get('median_ms'), '.2f')} | {_number(r.get('time_over_naive'), '.3f')} "
                     f"| {_number(r.get('held_mib'), '.0f')} | {_number(r.get('held_over_naive'), '.4f')} "
                     f"| {_number(r.get('peak_mib'), '.0f')} | {_number(r.get('peak_over_naive'), '.4f')} "
                     f"| {_number(r.get('beyond_mib'), '.0f')} | {_number(r.get('beyond_over_naive'), '.4f')} "
                     f"| {_number(r.get('loss_rel_err'), '.1e')} | {_number(r.get('grad_hidden_rel_err'), '.1e')} "
                     f"| {_number(r.get('grad_hidden_rel_err_naive'), '.1e')} |")
    if step.get("targets"):
        lines += ["", "| target (issue 22) | value | limit | met |", "|---|---|---|---|"]
        lines += [f"| {t['target']} | {_number(t['value'], '.4g')} | {t['limit']:g} | "
                  f"{'-' if t['met'] is None else 'yes' if t['met'] else 'NO'} |" for t in step["targets"]]
    return lines


THROUGHPUT_STEPS = ("d", "d12", "dmax")


def ours_vs_transformers(steps: Dict[str, dict]) -> dict:
    """Our steps against transformers' of the same model and batch (step d-hf's pairs): time ratios per pair
    and step kind, and transformers' TFLOP/s and MFU from our step's FLOP count; empty unless both ran."""
    hf = steps.get("d-hf", {})
    ours = {r["name"]: r for r in hf.get("ours", [])}
    out = {}
    for row in hf.get("runs", []):
        mine = ours.get(f"{row['kind']}-{row['pair']}")
        if mine is None or not row.get("step_time_s"):
            continue
        tflops = mine["flops_per_step"] / row["step_time_s"] / 1e12
        peak = mine.get("gpu_peak_tflops")
        out[f"pair {row['pair']}, {row['kind']}"] = {
            "ours_over_transformers_step_time": mine["step_time_s"] / row["step_time_s"],
            "ours_peak_gib": mine["peak_memory_gib"], "transformers_peak_gib": row.get("peak_memory_gib"),
            "transformers_tflops": tflops, "transformers_mfu": tflops / peak if peak else None}
    return out


def profile_summary(steps: Dict[str, dict]) -> dict:
    """The profiled runs of the throughput steps: ms by kernel class and the top kernels, per step and run."""
    return {f"{key}/{r['name']}": r["profile"] for key in THROUGHPUT_STEPS
            for r in steps.get(key, {}).get("runs", []) if r.get("profile")}


def _throughput_table(key: str, ours: dict) -> List[str]:
    settings = ours.get("settings", {})
    lines = [f"({key}) whole step: {ours.get('llm_layers')} LLM layers, micro-batch {settings.get('micro_batch')} / "
             f"global {settings.get('global_batch')} x sequence {settings.get('seq_length')}, "
             f"{settings.get('precision')}, {settings.get('transformer_impl')} layer specs. Targets (>= 12 layers): "
             f"MFU >= 40%; ASVR/LLaVA step <= FLOP ratio x 1.05; planned peak within 5% of measured.", "",
             "| run | step s (median) | fwd+bwd s | optimizer s | tokens/s | TFLOP/s | MFU | peak GiB | planned GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in ours.get("runs", []):
        lines.append(f"| {r['name']} | {r['step_time_s']:.4f} | {r['forward_backward_s']:.4f} "
                     f"| {r['optimizer_s']:.4f} | {r['tokens_per_s_per_gpu']:,.0f} | {r['tflops_per_gpu']:.4g} "
                     f"| {_number(r['mfu'], '.1%')} | {r['peak_memory_gib']:.2f} | {r['planned_gib']:.2f} |")
    for name, c in ours.get("comparisons", {}).items():
        if name.startswith("asvr"):
            lines += ["", f"{name}: ASVR / LLaVA step time {c['asvr_over_baseline_step_time']:.3f} "
                          f"(FLOP ratio {c['flops_ratio']:.3f})"]
        elif name.startswith("fast_paths"):
            lines += ["", f"{name}: unfused step time / fast step time {c['speedup']:.3f}"]
    for r in ours.get("runs", []):
        if r.get("profile"):
            classes = ", ".join(f"{k} {v:.1f}" for k, v in r["profile"]["by_class_ms"].items())
            lines += ["", f"{r['name']}, one profiled step, ms by kernel class: {classes}"]
    return lines


def _race_table(hf: dict, versus: dict) -> List[str]:
    lines = ["(d-hf) fair race with transformers, same layers, batch, data, SDPA backend and loss rows. Pair A: bf16 "
             "weights + fp32 master weights, fused AdamW, clip 1.0 on both sides; pair B: pure bf16, clip 1.0. "
             "Targets: ours / transformers <= 0.85 (A), <= 0.9 (B).", "",
             "| pair, step | ours s | transformers s | ours / transformers | ours peak GiB | transformers peak GiB |",
             "|---|---|---|---|---|---|"]
    ours = {r["name"]: r for r in hf.get("ours", [])}
    for row in hf.get("runs", []):
        key = f"pair {row['pair']}, {row['kind']}"
        mine, v = ours.get(f"{row['kind']}-{row['pair']}", {}), versus.get(key, {})
        lines.append(f"| {key} | {_number(mine.get('step_time_s'), '.4f')} "
                     f"| {_number(row.get('step_time_s'), '.4f')} "
                     f"| {_number(v.get('ours_over_transformers_step_time'), '.3f')} "
                     f"| {_number(mine.get('peak_memory_gib'), '.2f')} "
                     f"| {_number(row.get('peak_memory_gib'), '.2f')} |")
    return lines


def render_markdown(report: dict) -> str:
    steps: Dict[str, dict] = {s["key"]: s for s in report["steps"]}
    lines = [_header(report), ""] + _steps_table(report["steps"])
    if steps.get("c", {}).get("methods"):
        lines += [""] + _fused_ce_table(steps["c"])
    for key in THROUGHPUT_STEPS:
        if steps.get(key, {}).get("runs"):
            lines += [""] + _throughput_table(key, steps[key])
    if steps.get("d-hf", {}).get("runs"):
        lines += [""] + _race_table(steps["d-hf"], report.get("ours_vs_transformers", {}))
    return "\n".join(lines) + "\n"
