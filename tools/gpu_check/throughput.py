"""Step (d), ours: training throughput at Vicuna-7B layer shapes through tools/benchmark.py bench.mode=compare-asvr.

The number of LLM layers is the largest the memory planner fits on one 80 GB GPU with 45% headroom
(shapes.HEADROOM, shapes.largest_llm_layers); tools/benchmark.py times a plain LLaVA step and the ASVR step (the same
step plus the visual head and its loss) and reports tokens/s, TFLOP/s and MFU from the whole-model
FLOP count, and the ASVR / LLaVA step-time ratio beside the FLOP ratio.
"""

import json
import subprocess
import sys
from pathlib import Path
from typing import List

from tools.gpu_check.shapes import largest_llm_layers, recipe, throughput_overrides
from tools.gpu_check.step_io import FAILED, OK, REPO, main

GIB = 2**30


def run_benchmark(cpu: bool, overrides: List[str], work: Path) -> dict:
    """Run tools/benchmark.py on the check's recipe with ``overrides`` (its output goes to this step's log);
    its JSON, or RuntimeError."""
    mode = next(o.split("=", 1)[1] for o in overrides if o.startswith("bench.mode="))
    json_path = work / f"benchmark_{mode}.json"
    argv = [sys.executable, "tools/benchmark.py", "--config", str(recipe(cpu))]
    for override in [*overrides, f"bench.json={json_path}"]:
        argv += ["--set", override]
    print("$ " + " ".join(argv), flush=True)
    code = subprocess.run(argv, cwd=REPO).returncode
    if code or not json_path.is_file():
        raise RuntimeError(f"tools/benchmark.py --set bench.mode={mode} exited {code}"
                           + ("" if code else " without its JSON"))
    return json.loads(json_path.read_text())


def run_rows(data: dict) -> List[dict]:
    """One row per run of a benchmark JSON: the derived rates and the peak memory."""
    return [{"name": r["name"], "precision": r["settings"]["precision"], **r["derived"],
             "peak_memory_gib": r["peak_memory_bytes"] / GIB, "flops_per_step": r["flops"]["total"],
             "gpu_peak_tflops": r["gpu_peak_tflops"]}
            for r in data["runs"]]


def run(args) -> dict:
    layers, planned_gib = largest_llm_layers(args.cpu)
    print(f"LLM layers: {layers} (planner: {planned_gib:.1f} GiB)", flush=True)
    data = run_benchmark(args.cpu, throughput_overrides(args.cpu, layers) + ["bench.mode=compare-asvr"], args.work)
    rows = run_rows(data)
    comparison = data["comparisons"]["asvr"]
    asvr = next(r for r in rows if r["name"] == "asvr")
    mfu = f", MFU {asvr['mfu']:.1%}" if asvr["mfu"] is not None else ""
    summary = (f"{layers} LLM layers: ASVR step {asvr['step_time_s']:.3f} s, {asvr['tokens_per_s_per_gpu']:,.0f} "
               f"tokens/s, {asvr['tflops_per_gpu']:.4g} TFLOP/s{mfu}; ASVR/LLaVA step "
               f"{comparison['asvr_over_baseline_step_time']:.3f} vs FLOPs {comparison['flops_ratio']:.3f}")
    ok = all(r["step_time_s"] > 0 for r in rows)
    return {"status": OK if ok else FAILED, "summary": summary, "llm_layers": layers, "planned_gib": planned_gib,
            "settings": data["runs"][0]["settings"], "runs": rows, "comparison": comparison}


if __name__ == "__main__":
    main(run, __doc__)
