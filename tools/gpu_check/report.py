"""The check's results as JSON and as markdown: the stamp, one row per step, then the tables of (c) and (d)."""

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


def ours_vs_transformers(steps: Dict[str, dict]) -> dict:
    """Our ASVR step against the transformers step of the same model: time ratio, and its TFLOP/s and MFU
    from our step's FLOP count; empty unless both ran."""
    ours, hf = steps.get("d", {}), steps.get("d-hf", {})
    asvr = next((r for r in ours.get("runs", []) if r["name"] == "asvr"), None)
    if asvr is None or not hf.get("step_time_s"):
        return {}
    tflops = asvr["flops_per_step"] / hf["step_time_s"] / 1e12
    peak = asvr.get("gpu_peak_tflops")
    return {"ours_over_transformers_step_time": asvr["step_time_s"] / hf["step_time_s"],
            "transformers_tflops": tflops, "transformers_mfu": tflops / peak if peak else None}


def _throughput_table(ours: dict, hf: dict, versus: dict) -> List[str]:
    settings = ours.get("settings", {})
    lines = [f"(d) throughput: {ours.get('llm_layers')} LLM layers (planner: {ours.get('planned_gib', 0):.1f} GiB "
             f"planned), micro-batch {settings.get('micro_batch')} / global {settings.get('global_batch')} x "
             f"sequence {settings.get('seq_length') or 128}, {settings.get('precision')}, "
             f"{settings.get('transformer_impl')} layer specs. Targets: MFU >= 40%; ASVR/LLaVA step <= FLOP ratio "
             f"x 1.03; ours <= 0.7 x the transformers step.", "",
             "| run | step s (median) | tokens/s | TFLOP/s | MFU | peak GiB |", "|---|---|---|---|---|---|"]
    for r in ours.get("runs", []):
        lines.append(f"| ours: {'ASVR' if r['name'] == 'asvr' else 'LLaVA (no visual head)'} | {r['step_time_s']:.4f} "
                     f"| {r['tokens_per_s_per_gpu']:,.0f} | {r['tflops_per_gpu']:.4g} | {_number(r['mfu'], '.1%')} "
                     f"| {r['peak_memory_gib']:.2f} |")
    if hf.get("step_time_s"):
        lines.append(f"| transformers LLaVA + plain head | {hf['step_time_s']:.4f} | {hf['tokens_per_s']:,.0f} "
                     f"| {_number(versus.get('transformers_tflops'), '.4g')} "
                     f"| {_number(versus.get('transformers_mfu'), '.1%')} "
                     f"| {_number(hf.get('peak_memory_gib'), '.2f')} |")
    comparison = ours.get("comparison", {})
    lines += ["", f"ASVR / LLaVA step time {_number(comparison.get('asvr_over_baseline_step_time'), '.3f')} "
                  f"(FLOP ratio {_number(comparison.get('flops_ratio'), '.3f')}); our ASVR step / transformers step "
                  f"{_number(versus.get('ours_over_transformers_step_time'), '.3f')}"]
    return lines


def render_markdown(report: dict) -> str:
    steps: Dict[str, dict] = {s["key"]: s for s in report["steps"]}
    lines = [_header(report), ""] + _steps_table(report["steps"])
    if steps.get("c", {}).get("methods"):
        lines += [""] + _fused_ce_table(steps["c"])
    if steps.get("d", {}).get("runs"):
        lines += [""] + _throughput_table(steps["d"], steps.get("d-hf", {}), report.get("ours_vs_transformers", {}))
    return "\n".join(lines) + "\n"
