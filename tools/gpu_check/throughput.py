"""Steps (d), (d12), (dmax), ours: the whole training step through tools/benchmark.py on
configs/bench_vicuna7b_1gpu.yaml (shapes.py) at ``--layers`` 6, 12 or max (the most the device's memory
holds by the planner).

``--mode compare-fast-paths`` times the LLaVA and the ASVR step with every fast path off, then as the
recipe sets them (auto: on with CUDA), in one process; ``compare-asvr`` the two steps as set; ``single``
the ASVR step. Reports per run step time, tokens/s, TFLOP/s, MFU, the optimizer's share of the step,
the measured peak beside the planner's, and (``--profile``) one profiled step by kernel class.
"""

import json
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

from tools.gpu_check.shapes import llm_layers, recipe, throughput_overrides
from tools.gpu_check.step_io import FAILED, OK, REPO, main

GIB = 2**30


def run_benchmark(cpu: bool, overrides: List[str], work: Path, launcher: Optional[List[str]] = None) -> dict:
    """Run tools/benchmark.py on the check's recipe with ``overrides`` (its output goes to this step's log),
    in one process or under ``launcher`` (torchrun's command); its JSON, or RuntimeError."""
    mode = next((o.split("=", 1)[1] for o in overrides if o.startswith("bench.mode=")), "recipe")
    json_path = work / f"benchmark_{mode}.json"
    argv = (launcher or [sys.executable]) + ["tools/benchmark.py", "--config", str(recipe(cpu))]
    for override in [*overrides, f"bench.json={json_path}"]:
        argv += ["--set", override]
    work.mkdir(parents=True, exist_ok=True)
    print("$ " + " ".join(argv), flush=True)
    code = subprocess.run(argv, cwd=REPO).returncode
    if code or not json_path.is_file():
        raise RuntimeError(f"tools/benchmark.py --set bench.mode={mode} exited {code}"
                           + ("" if code else " without its JSON"))
    return json.loads(json_path.read_text())


def run_rows(data: dict, planned: float) -> List[dict]:
    """One row per run of a benchmark JSON: the derived rates, the phases, the peak beside the plan."""
    return [{"name": r["name"], "precision": r["settings"]["precision"], **r["derived"],
             "peak_memory_gib": r["peak_memory_bytes"] / GIB, "planned_gib": planned,
             "peak_over_planned": r["peak_memory_bytes"] / GIB / planned, "flops_per_step": r["flops"]["total"],
             "gpu_peak_tflops": r["gpu_peak_tflops"], "fast_paths": r["settings"].get("fast_paths"),
             "profile": r.get("profile")}
            for r in data["runs"]]


def add_arguments(parser) -> None:
    parser.add_argument("--layers", default="6", help="6, 12 or max (the planner's most for this device)")
    parser.add_argument("--mode", default="compare-asvr", help="bench.mode: compare-fast-paths, compare-asvr, single")
    parser.add_argument("--profile", action="store_true", help="one more step per run under the profiler")


def run(args) -> dict:
    layers, planned = llm_layers(args.cpu, args.layers)
    print(f"LLM layers: {layers} (planner: {planned:.1f} GiB)", flush=True)
    overrides = throughput_overrides(args.cpu, layers) + [f"bench.mode={args.mode}",
                                                          f"bench.profile={str(args.profile).lower()}"]
    data = run_benchmark(args.cpu, overrides, args.work)
    rows = run_rows(data, planned)
    asvr = next(r for r in rows if r["name"] == "asvr")
    mfu = f", MFU {asvr['mfu']:.1%}" if asvr["mfu"] is not None else ""
    comparisons = data["comparisons"]
    summary = (f"{layers} LLM layers: ASVR step {asvr['step_time_s']:.3f} s (optimizer {asvr['optimizer_share']:.0%}), "
               f"{asvr['tflops_per_gpu']:.4g} TFLOP/s{mfu}, peak {asvr['peak_memory_gib']:.2f} GiB (planned "
               f"{planned:.2f})")
    if "asvr" in comparisons:
        c = comparisons["asvr"]
        summary += f"; ASVR/LLaVA step {c['asvr_over_baseline_step_time']:.3f} vs FLOPs {c['flops_ratio']:.3f}"
    if "fast_paths_asvr" in comparisons:
        summary += f"; fast paths: ASVR step x{comparisons['fast_paths_asvr']['speedup']:.3f} faster"
    ok = all(r["step_time_s"] > 0 for r in rows)
    return {"status": OK if ok else FAILED, "summary": summary, "llm_layers": layers, "planned_gib": planned,
            "settings": data["runs"][0]["settings"], "runs": rows, "comparisons": comparisons,
            "comparison": comparisons.get("asvr", {})}


if __name__ == "__main__":
    main(run, __doc__, add_arguments)
