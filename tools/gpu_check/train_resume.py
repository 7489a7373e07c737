"""Step (b): the real trainer, tools/train.py, on a tiny config: 20 steps, a checkpoint at 10; killed and resumed.

The data is the demo pipeline at test size (tests.support.tiny_run, built on CPU in a few
seconds). Run A trains 20 steps straight. Run B, started beside it, is SIGKILLed (with every process
it started) once its step-10 checkpoint is complete, then started again: it resumes from that
checkpoint to step 20. Per-step losses come from the TensorBoard event files (float32 scalars;
run B's resumed values replace those its killed first part logged). Passes when steps 11-20 of A and
B agree (max |difference| within TOLERANCE) and text and visual losses both fall (mean of steps 1-5
against steps 16-20 of run A). bf16 on GPU, fp32 with --cpu.
"""

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict

import psutil
import yaml

from tests.support.tiny_run import tiny_run_config
from megatron_asvr.config import to_dict
from megatron_asvr.runtime.ports import free_port
from megatron_asvr.checkpoint.directory import LATEST, checkpoint_dir
from tools.gpu_check.step_io import FAILED, OK, REPO, main

STEPS, CHECKPOINT_AT = 20, 10
TAGS = {"text": "loss/text", "visual": "loss/visual_semantic"}
TOLERANCE = {"fp32": 1e-5, "bf16": 1e-2}  # max |loss A - loss B| over steps 11-20


def _prepare_data(root: Path) -> None:
    """The tiny corpus, tokenizer, shards and targets, on CPU (the GPU has no part in data preparation);
    gloo on the loopback interface (a machine's own hostname may not resolve)."""
    start = time.monotonic()
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", MASTER_PORT=str(free_port()), GLOO_SOCKET_IFNAME="lo")
    code = "import sys; from tests.support.tiny_run import make_tiny_run; make_tiny_run(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(root)], env=env, check=True)
    print(f"data prepared in {time.monotonic() - start:.1f} s", flush=True)


def _write_config(work: Path, data: Path, name: str, precision: str) -> Path:
    config = tiny_run_config(str(data), str(work / name), steps=STEPS, save_interval=CHECKPOINT_AT, log_interval=1,
                             tensorboard=True, precision=precision)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(to_dict(config)))
    return path


def _train(config: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ, MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    with open(log, "a") as out:
        return subprocess.Popen([sys.executable, "tools/train.py", "--config", str(config)], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT)


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:250] if lines else "(no output)"


def _kill_after_checkpoint(proc: subprocess.Popen, save_dir: Path, log: Path) -> None:
    """SIGKILL ``proc`` and its children as soon as ``latest`` names the step-10 checkpoint."""
    pointer, wanted = save_dir / LATEST, checkpoint_dir(save_dir, CHECKPOINT_AT).name
    start = last_report = time.monotonic()
    while proc.poll() is None:
        if time.monotonic() - last_report > 10:  # progress in the check's log, should a budget run out
            last_report = time.monotonic()
            print(f"  [{last_report - start:.0f} s] run B: {_last_line(log)}", flush=True)
        if pointer.is_file() and pointer.read_text().strip() == wanted:
            tree = psutil.Process(proc.pid)
            for process in tree.children(recursive=True) + [tree]:
                process.kill()
            proc.wait()
            return
        time.sleep(0.02)
    raise RuntimeError(f"run B: tools/train.py exited {proc.returncode} before its checkpoint {wanted} could be "
                       f"killed: {_last_line(log)}")


def _losses(save_dir: Path) -> Dict[str, Dict[int, float]]:
    """Per tag, step -> value; a later event file (a resumed run) replaces the steps an earlier one logged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {name: {} for name in TAGS}
    for events in sorted((save_dir / "tensorboard").glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for name, tag in TAGS.items():
            if tag in accumulator.Tags()["scalars"]:
                out[name].update({e.step: e.value for e in accumulator.Scalars(tag)})
    return out


def run(args) -> dict:
    precision = "fp32" if args.cpu else "bf16"
    data = args.work / "data"
    _prepare_data(data)
    configs = {name: _write_config(args.work, data, name, precision) for name in ("run_a", "run_b")}
    logs = {name: args.work / f"{name}.log" for name in configs}
    run_a, run_b = (_train(configs[name], logs[name]) for name in configs)  # side by side
    resumed = None
    try:
        _kill_after_checkpoint(run_b, args.work / "run_b", logs["run_b"])
        killed_at = max(_losses(args.work / "run_b")["text"], default=0)
        resumed = _train(configs["run_b"], logs["run_b"])
        codes = {"run_a": run_a.wait(), "run_b": resumed.wait()}
    finally:
        for proc in (run_a, run_b, resumed):
            if proc is not None and proc.poll() is None:
                proc.kill()
        for name, log in logs.items():  # into this step's output: the check's log
            print(f"----- {name} -----\n{log.read_text(errors='replace')}", flush=True)
    failed = [name for name, code in codes.items() if code]
    if failed:
        name = failed[0]
        return {"status": FAILED, "summary": f"{name}: tools/train.py exited {codes[name]}: {_last_line(logs[name])}"}
    a, b = _losses(args.work / "run_a"), _losses(args.work / "run_b")
    after = range(CHECKPOINT_AT + 1, STEPS + 1)
    missing = [f"{run} {name}" for run, losses in (("A", a), ("B", b)) for name in TAGS
               if any(s not in losses[name] for s in after)]
    if missing:
        return {"status": FAILED, "summary": f"steps {after.start}-{after.stop - 1} missing from TensorBoard: "
                + ", ".join(missing)}
    diff = {name: max(abs(a[name][s] - b[name][s]) for s in after) for name in TAGS}
    first = {name: sum(a[name][s] for s in range(1, 6)) / 5 for name in TAGS}
    last = {name: sum(a[name][s] for s in range(STEPS - 4, STEPS + 1)) / 5 for name in TAGS}
    equal = all(d <= TOLERANCE[precision] for d in diff.values())
    falls = all(last[name] < first[name] for name in TAGS)
    summary = (f"B killed after step {killed_at} (checkpoint {CHECKPOINT_AT}) and resumed; steps 11-20 max abs(A - B) "
               + ", ".join(f"{n} {d:.2e}" for n, d in diff.items()) + f" (tolerance {TOLERANCE[precision]:g}); "
               + ", ".join(f"{n} {first[n]:.3f} -> {last[n]:.3f}" for n in TAGS))
    return {"status": OK if equal and falls else FAILED, "summary": summary if equal and falls else
            summary + ("" if equal else "; RESUME DIFFERS") + ("" if falls else "; A LOSS DOES NOT FALL"),
            "precision": precision, "killed_after_step": killed_at, "max_abs_diff_steps_11_20": diff,
            "mean_steps_1_5": first, "mean_steps_16_20": last, "losses_a": a, "losses_b": b}


if __name__ == "__main__":
    main(run, __doc__)
