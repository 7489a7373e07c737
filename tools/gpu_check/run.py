"""Run the GPU check's steps, each in its own process group under its own time budget.

    python3 -m tools.gpu_check.run [--cpu] [--out DIR]      (scripts/gpu_check.sh)

On the device: install the carried wheels into /tmp/site (never torch), build the csrc extensions
in place for sm_90, then steps (a)-(e). With --cpu: the same steps at tiny shapes, no install or
build (the environment has them). A step that fails or runs out of time is recorded with the tail
of its output and the rest still run; the whole check keeps to a deadline (6 minutes on GPU).
Writes gpu_check.json, gpu_check.md and gpu_check.log (every step's output) to the out directory
(--out, else $OUT, else ./gpu_check_out) and prints the markdown last. Exit status: with --cpu,
1 when a step failed; on GPU always 0, so the results come back.
"""

import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from tools.gpu_check.report import ours_vs_transformers, render_markdown, to_json
from tools.gpu_check.step_io import FAILED, OK, REPO

SITE = "/tmp/site"  # where the carried wheels go on the device
WHEELS = REPO / ".gpu_wheels"
DEADLINE_S = {"gpu": 330, "cpu": 900}  # the steps; with the stamp (at most 30 s) within the device's 6 minutes
BUILD_ENV = {"TORCH_CUDA_ARCH_LIST": "9.0", "MAX_JOBS": "16"}  # Hopper, 16 cores
TIMEOUT, OUT_OF_TIME, SKIPPED = "timeout", "out of time", "skipped"
TAIL_CHARS = 2500


@dataclass(frozen=True)
class Step:
    key: str
    title: str
    gpu_budget_s: int
    cpu_budget_s: Optional[int]  # None: not run with --cpu
    module: Optional[str] = None  # tools.gpu_check.<module>, run with --result and --work


STEPS = [
    Step("install", "wheels from .gpu_wheels into /tmp/site", 30, None),
    Step("build", "csrc extensions in place (sm_90)", 150, None),
    Step("a", "fused CE kernels vs reference", 45, 90, "kernels"),
    Step("b", "tools/train.py: 20 steps, kill + resume", 150, 180, "train_resume"),
    Step("c", "fused CE at the real head shape", 90, 90, "fused_ce"),
    Step("d", "throughput: ours (tools/benchmark.py)", 100, 150, "throughput"),
    Step("d-hf", "throughput: transformers LLaVA + plain head", 70, 120, "hf_baseline"),
    Step("e", "FP8 through Transformer Engine", 20, 60, "fp8"),
]


def _argv(step: Step, cpu: bool, result: Path, work: Path) -> List[str]:
    if step.key == "install":
        return [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                "--no-cache-dir", "--upgrade", "--target", SITE, *sorted(glob.glob(str(WHEELS / "*.whl")))]
    if step.key == "build":
        return [sys.executable, "setup.py", "build_ext", "--inplace"]
    return [sys.executable, "-m", f"tools.gpu_check.{step.module}", "--result", str(result), "--work", str(work)] + (
        ["--cpu"] if cpu else [])


def _environment(cpu: bool) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")
    paths = ([] if cpu else [SITE]) + [str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def _command_result(step: Step, rc: int) -> dict:
    """install / build: the exit status and what they left."""
    if step.key == "install":
        count = len(glob.glob(str(WHEELS / "*.whl")))
        if rc == 0:
            return {"status": OK, "summary": f"{count} wheels into {SITE}"}
        return {"status": FAILED, "summary": f"pip exited {rc}" + ("" if count else
                ": .gpu_wheels holds no wheels (run scripts/gpu_wheels.sh here and carry .gpu_wheels)")}
    built = sorted(Path(p).name for p in glob.glob(str(REPO / "megatron_asvr" / "_fused_ce_*.so")))
    cuda = any(name.startswith("_fused_ce_cuda") for name in built)
    ok = rc == 0 and cuda
    return {"status": OK if ok else FAILED, "summary": (", ".join(built) or "nothing built") +
            ("" if rc == 0 else f"; setup.py exited {rc}") + ("" if cuda else "; no CUDA extension (nvcc?)")}


def _run_one(step: Step, cpu: bool, timeout: float, work: Path, log, env: dict) -> dict:
    """Run one step in a new process group; on timeout kill the group. Returns its result."""
    result_path = work / f"{step.key}.json"
    argv = _argv(step, cpu, result_path, work / step.key)
    log.write(f"\n===== step {step.key}: {step.title} (budget {timeout:.0f} s) =====\n$ {' '.join(argv)}\n")
    log.flush()
    start_offset = os.path.getsize(log.name)  # the log is opened for appending: the step writes at its end
    env = dict(env, **BUILD_ENV) if step.key == "build" else env
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the step and every process it started
        rc, timed_out = proc.wait(), True
    log.flush()
    with open(log.name, errors="replace") as reader:
        reader.seek(start_offset)
        tail = reader.read()[-TAIL_CHARS:]
    if timed_out:
        result = {"status": TIMEOUT, "summary": f"ran past its {timeout:.0f} s budget"}
    elif step.module is None:
        result = _command_result(step, rc)
    elif result_path.is_file():
        result = json.loads(result_path.read_text())
    else:
        result = {"status": FAILED, "summary": f"exited {rc} without a result"}
    if result["status"] in (FAILED, TIMEOUT):
        result["output_tail"] = tail
    return result


def _stamp(cpu: bool, work: Path, env: dict) -> dict:
    path = work / "stamp.json"
    argv = [sys.executable, "-m", "tools.gpu_check.stamp", "--result", str(path), "--work", str(work)]
    try:
        subprocess.run(argv + (["--cpu"] if cpu else []), cwd=REPO, env=env, timeout=30, capture_output=True)
    except subprocess.TimeoutExpired:
        pass
    return json.loads(path.read_text()) if path.is_file() else {"device": "unknown (stamp failed)"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on CPU (CI)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "gpu_check_out"))
    parser.add_argument("--only", help="comma-separated step keys to run (e.g. install,b for a rerun)")
    args = parser.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    mode = "cpu" if args.cpu else "gpu"
    args.out.mkdir(parents=True, exist_ok=True)
    env = _environment(args.cpu)
    begin = time.monotonic()
    print(f"[gpu_check] {mode} mode; results to {args.out}", flush=True)
    steps = []
    (args.out / "gpu_check.log").write_text("")
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp, open(args.out / "gpu_check.log", "a") as log:
        work = Path(tmp)
        for step in STEPS:
            budget = step.cpu_budget_s if args.cpu else step.gpu_budget_s
            left = DEADLINE_S[mode] - (time.monotonic() - begin)
            start = time.monotonic()
            if only is not None and step.key not in only:
                result = {"status": SKIPPED, "summary": "not asked for (--only)"}
            elif budget is None:
                result = {"status": SKIPPED, "summary": "device only (the CPU environment has it)"}
            elif left < 10:
                result = {"status": OUT_OF_TIME, "summary": f"not started: the check's {DEADLINE_S[mode]} s deadline"}
            else:
                result = _run_one(step, args.cpu, min(budget, left), work, log, env)
            seconds = time.monotonic() - start
            steps.append({"key": step.key, "title": step.title, "budget_s": budget, "seconds": round(seconds, 1),
                          **result})
            print(f"[gpu_check {time.monotonic() - begin:5.0f} s] {step.key} {step.title}: {result['status']} "
                  f"({seconds:.1f} s) {result['summary']}", flush=True)
        stamp = _stamp(args.cpu, work, env)  # after the install: the versions of what was installed
    report = {"mode": mode, "stamp": stamp, "total_s": round(time.monotonic() - begin, 1), "steps": steps,
              "ours_vs_transformers": ours_vs_transformers({s["key"]: s for s in steps})}
    (args.out / "gpu_check.json").write_text(to_json(report))
    markdown = render_markdown(report)
    (args.out / "gpu_check.md").write_text(markdown)
    print("\n" + markdown, flush=True)
    failed = any(s["status"] in (FAILED, TIMEOUT, OUT_OF_TIME) for s in steps)
    return 1 if args.cpu and failed else 0


if __name__ == "__main__":
    sys.exit(main())
