"""Run the GPU check's steps, each in its own process group under its own time cap.

    python3 -m tools.gpu_check.run [--cpu] [--out DIR] [--only KEYS]      (scripts/gpu_check.sh)

On the device: install the carried wheels into /tmp/site (never torch), build the CUDA extension in
place for sm_90 (the CPU one is not needed there), then the steps in the order of what they decide:
kernel checks, micro-benchmarks of each lever, the fused CE, the whole step at 6 and 12 LLM layers
(and at the most the device's memory holds, time allowing), the fair race with transformers, train +
kill + resume. Each step has a budget (what it is expected to take, process start included) and a cap
(its timeout); the whole check keeps to a deadline (DEADLINE_S: 425 s of steps on GPU, so that a
15-minute device window holds the check twice with the machine's start), and a step that needs more
than what is left (``min_left_s``) is not started. With --cpu: the same steps at tiny shapes, no
install or build (the environment has them); steps that only repeat another's code path at other sizes
are skipped. A step that fails or times out is recorded with the tail of its output and the rest still
run; rerun it alone with ``--only KEY`` (same warm machine).

Results go to ``<out>/<date>_<device>_<commit>/`` (``--out``, else $OUT, else ./gpu_check_out), the
folder to copy under docs/gpu_results/ as is: gpu_check.json and gpu_check.md rewritten after every
step (a check cut short still returns what it measured), gpu_check.log (every step's output) and
profile_summary.json (the profiled steps by kernel class). The markdown is printed last. Exit status:
with --cpu, 1 when a step failed; on GPU always 0, so the results come back.
"""

import argparse
import datetime
import glob
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from tools.gpu_check.report import ours_vs_transformers, profile_summary, render_markdown, to_json
from tools.gpu_check.step_io import FAILED, OK, REPO

SITE = "/tmp/site"  # where the carried wheels go on the device
WHEELS = REPO / ".gpu_wheels"
DEADLINE_S = {"gpu": 425, "cpu": 1200}  # the steps; with the stamp (at most 25 s) within 7.5 minutes
# Hopper, 16 cores; setup.py builds only the CUDA extension (the steps load no CPU one on the device)
BUILD_ENV = {"TORCH_CUDA_ARCH_LIST": "9.0", "MAX_JOBS": "16", "MEGATRON_ASVR_EXTENSIONS": "cuda"}
TIMEOUT, OUT_OF_TIME, SKIPPED = "timeout", "out of time", "skipped"
TAIL_CHARS = 2500
STAMP_TIMEOUT_S = 25  # it imports torch


@dataclass(frozen=True)
class Step:
    key: str
    title: str
    gpu_budget_s: Optional[int]  # expected on the device, its process start included (None: CPU only)
    gpu_cap_s: Optional[int]  # its timeout on the device
    cpu_budget_s: Optional[int]  # its timeout with --cpu (None: not run with --cpu)
    module: Optional[str] = None  # tools.gpu_check.<module>, run with --result and --work
    args: Tuple[str, ...] = ()  # more arguments of the module
    min_left_s: int = 10  # not started with less of the deadline left


STEPS = [
    Step("install", "wheels from .gpu_wheels into /tmp/site", 20, 40, None),
    Step("build", "CUDA extension in place (sm_90)", 45, 90, None),
    Step("a", "fused CE kernels vs reference", 10, 30, 90, "kernels"),
    Step("k", "micro-benchmarks: each fast path's lever in ms, no model", 35, 60, 90, "levers"),
    Step("c", "fused CE at the real head shape", 60, 90, 90, "fused_ce"),
    Step("d", "whole step, 6 LLM layers, global 16: fast paths off vs on, LLaVA and ASVR; phases; profile", 120,
         160, 240, "throughput", ("--layers", "6", "--mode", "compare-fast-paths", "--profile")),
    Step("d12", "whole step, 12 LLM layers, fast paths on: LLaVA and ASVR", 75, 110, None, "throughput",
         ("--layers", "12", "--mode", "compare-asvr")),
    Step("d-hf", "fair race with transformers: pairs A and B (LLaVA and ASVR steps)", 80, 110, 240,
         "hf_baseline"),
    Step("nccl", "2+ GPUs: TP2 / PP2 / DP2 against one process under NCCL; a TP=2 throughput row", 60, 90, None,
         "multi_gpu"),
    Step("dmax", "whole step, the most LLM layers the device's memory holds (ASVR, fast)", 60, 90, None,
         "throughput", ("--layers", "max", "--mode", "single"), min_left_s=70),
    Step("b", "tools/train.py: 20 steps, kill + resume, fast paths on", 120, 150, 240, "train_resume",
         min_left_s=150),
    Step("e", "FP8 through Transformer Engine (cannot travel to the lent machine)", None, None, 60, "fp8"),
]


def _argv(step: Step, cpu: bool, result: Path, work: Path) -> List[str]:
    if step.key == "install":
        return [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                "--no-cache-dir", "--upgrade", "--target", SITE, *sorted(glob.glob(str(WHEELS / "*.whl")))]
    if step.key == "build":
        return [sys.executable, "setup.py", "build_ext", "--inplace"]
    return [sys.executable, "-m", f"tools.gpu_check.{step.module}", "--result", str(result), "--work", str(work),
            *step.args] + (["--cpu"] if cpu else [])


def _environment(cpu: bool) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")
    # One compile cache for every step: megatron's torch.compile'd fusions compile once (step k, then d).
    cache = os.path.join(tempfile.gettempdir(), "gpu_check_compile_cache")
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(cache, "inductor"))
    env.setdefault("TRITON_CACHE_DIR", os.path.join(cache, "triton"))
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
    log.write(f"\n===== step {step.key}: {step.title} (cap {timeout:.0f} s) =====\n$ {' '.join(argv)}\n")
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
        result = {"status": TIMEOUT, "summary": f"ran past its {timeout:.0f} s cap"}
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
        subprocess.run(argv + (["--cpu"] if cpu else []), cwd=REPO, env=env, timeout=STAMP_TIMEOUT_S,
                       capture_output=True)
    except subprocess.TimeoutExpired:
        pass
    return json.loads(path.read_text()) if path.is_file() else {"device": "unknown (stamp failed)"}


def _device_name(cpu: bool) -> str:
    """The GPU's model for the results folder ("h100", "h200", ...; "cpu" with --cpu), without importing torch."""
    if cpu:
        return "cpu"
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=10).stdout.split("\n")
    except (OSError, subprocess.TimeoutExpired):
        return "gpu"
    model = next((w for w in names[0].lower().replace("-", " ").split() if re.fullmatch(r"[a-z]\d{2,4}\w*", w)),
                 "gpu")
    count = sum(1 for name in names if name.strip())
    return model + (f"x{count}" if count > 1 else "")


def results_folder(out: Path, cpu: bool) -> Path:
    """``out/<date>_<device>_<commit>``: one run's folder, named as docs/gpu_results/README.md says."""
    from tools.gpu_check.stamp import commit

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    return out / f"{date}_{_device_name(cpu)}_{commit(cpu).replace('-dirty', 'd')}"


def _write(folder: Path, mode: str, stamp: dict, begin: float, steps: List[dict]) -> str:
    """gpu_check.json, gpu_check.md and profile_summary.json of the steps so far; returns the markdown."""
    by_key = {s["key"]: s for s in steps}
    report = {"mode": mode, "stamp": stamp, "total_s": round(time.monotonic() - begin, 1), "steps": steps,
              "ours_vs_transformers": ours_vs_transformers(by_key)}
    (folder / "gpu_check.json").write_text(to_json(report))
    profiles = profile_summary(by_key)
    if profiles:
        (folder / "profile_summary.json").write_text(to_json(profiles))
    markdown = render_markdown(report)
    (folder / "gpu_check.md").write_text(markdown)
    return markdown


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on CPU (CI)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "gpu_check_out"))
    parser.add_argument("--only", help="comma-separated step keys to run (e.g. install,build,d for a rerun)")
    args = parser.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    unknown = sorted((only or set()) - {s.key for s in STEPS})
    if unknown:
        parser.error(f"--only: unknown step keys {', '.join(unknown)} (known: {', '.join(s.key for s in STEPS)})")
    mode = "cpu" if args.cpu else "gpu"
    folder = results_folder(args.out, args.cpu)
    folder.mkdir(parents=True, exist_ok=True)
    env = _environment(args.cpu)
    begin = time.monotonic()
    print(f"[gpu_check] {mode} mode; results to {folder}", flush=True)
    steps: List[dict] = []
    stamp = {"device": _device_name(args.cpu), "note": "versions follow when the check ends"}
    (folder / "gpu_check.log").write_text("")
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp, open(folder / "gpu_check.log", "a") as log:
        work = Path(tmp)
        for step in STEPS:
            budget = step.cpu_budget_s if args.cpu else step.gpu_budget_s
            cap = step.cpu_budget_s if args.cpu else step.gpu_cap_s
            left = DEADLINE_S[mode] - (time.monotonic() - begin)
            start = time.monotonic()
            if only is not None and step.key not in only:
                result = {"status": SKIPPED, "summary": "not asked for (--only)"}
            elif cap is None:
                result = {"status": SKIPPED, "summary": "device only (the CPU environment has it, or another step "
                          "runs its code path at tiny shapes)" if args.cpu else
                          "not run on the device: what it needs cannot travel there"}
            elif left < step.min_left_s:
                result = {"status": OUT_OF_TIME, "summary": f"not started: {left:.0f} s of the check's "
                                                            f"{DEADLINE_S[mode]} s left, it needs {step.min_left_s}"}
            else:
                result = _run_one(step, args.cpu, min(cap, left), work, log, env)
            seconds = time.monotonic() - start
            steps.append({"key": step.key, "title": step.title, "budget_s": budget, "cap_s": cap,
                          "seconds": round(seconds, 1), **result})
            print(f"[gpu_check {time.monotonic() - begin:5.0f} s] {step.key} {step.title}: {result['status']} "
                  f"({seconds:.1f} s) {result['summary']}", flush=True)
            _write(folder, mode, stamp, begin, steps)  # each step's result is on disk before the next starts
        stamp = _stamp(args.cpu, work, env)  # after the install: the versions of what was installed
    markdown = _write(folder, mode, stamp, begin, steps)
    print("\n" + markdown, flush=True)
    failed = any(s["status"] in (FAILED, TIMEOUT, OUT_OF_TIME) for s in steps)
    return 1 if args.cpu and failed else 0


if __name__ == "__main__":
    sys.exit(main())
