"""ASVR versus LLaVA on the demo data: both arms trained with the same recipes, steps and
overrides for each seed (stage 1 from the demo's import, then stage 2; LLaVA with
the visual loss off in both stages), the held-out questions answered greedily, and a report
over seeds (experiment_report).

    out/<arm>/seed<k>/stage1, stage2    training runs (TensorBoard logs inside)
    out/<arm>/seed<k>/eval/results.json evaluation tool output (greedy answers)
    out/logs/<arm>_seed<k>_*.log        every subprocess's output
    out/timings.json                    wall time of every run, kept across calls
    out/experiment.md, experiment.json, curves.png, accuracy.png

Every step runs the project's tools as torchrun subprocesses. It resumes: a finished
training stage is not repeated, nor an evaluation whose results.json exists (unless its
model was trained again in this call).
"""

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from megatron_asvr.checkpoint.directory import checkpoint_dir, find_latest
from megatron_asvr.config import load_run_config
from megatron_asvr.config.errors import section
from megatron_asvr.config.schema import Positive
from megatron_asvr.evaluation.experiment_report import Results, accuracy_png, curves_png, format_report, seed_record
from megatron_asvr.evaluation.plot import save_figure
from megatron_asvr.evaluation.report import RESULTS_JSON

ARMS = {  # name -> (label, overrides for both stages)
    "llava": ("LLaVA (no visual loss)", ["model.asvr.visual_loss=false"]),
    "asvr": ("ASVR", []),
}
DEMO_INPUTS = ("data/eval.jsonl", "data/images", "tokenizer", "shards/pretrain", "shards/instruct",
               "targets/train", "init")
STAGE_DATA = {1: "pretrain", 2: "instruct"}  # shards/ of each stage (targets/train serves both)
IN_TRAINING_SCORES = 4  # default: stage 2 scores the held-out questions this many times
MAX_NEW_TOKENS = 6  # greedy answers are a word or two (as launch/demo.sh evaluates)


class ExperimentError(RuntimeError):
    """A step of the experiment failed; the message names it and its log."""


@section
class ExperimentConfig:
    """The experiment's settings (tools/experiment_asvr_vs_llava.py)."""

    demo_dir: Path  # launch/demo.sh's output: data, tokenizer, shards, targets, init (the import)
    out_dir: Path
    stage1_config: Path = Path("configs/demo_stage1.yaml")
    stage2_config: Path = Path("configs/demo_stage2.yaml")
    stage1_steps: Optional[Positive] = None  # None: the recipe's train.steps
    stage2_steps: Optional[Positive] = None
    eval_interval: Optional[Positive] = None  # stage-2 steps between in-training scores; None: steps / 4
    seeds: Tuple[int, ...] = (1, 2, 3)  # train.seed of each run; every arm trains every seed
    nproc: Positive = 2
    master_port: Positive = 29620
    stage1_overrides: Tuple[str, ...] = ()  # recipe overrides, the same for both arms
    stage2_overrides: Tuple[str, ...] = ()

    def recipe(self, stage: int) -> Path:
        return self.stage1_config if stage == 1 else self.stage2_config

    def steps(self, stage: int) -> int:
        return self.stage1_steps if stage == 1 else self.stage2_steps

    def resolved(self) -> "ExperimentConfig":
        """Step counts read from the recipes (with the overrides) where not given, and the eval interval."""
        steps = {stage: self.steps(stage) or load_run_config(self.recipe(stage), self.overrides(stage)).train.steps
                 for stage in (1, 2)}
        interval = self.eval_interval or max(1, steps[2] // IN_TRAINING_SCORES)
        return dataclasses.replace(self, stage1_steps=steps[1], stage2_steps=steps[2], eval_interval=interval)

    def overrides(self, stage: int) -> Tuple[str, ...]:
        return self.stage1_overrides if stage == 1 else self.stage2_overrides

    def run_dir(self, arm: str, seed: int) -> Path:
        return self.out_dir / arm / f"seed{seed}"

    def validate(self) -> None:
        missing = [p for p in DEMO_INPUTS if not (self.demo_dir / p).exists()]
        if missing:
            raise ExperimentError(f"{self.demo_dir} lacks {', '.join(missing)}: run launch/demo.sh "
                                  f"(DEMO_DIR={self.demo_dir}) first")
        for path in (self.stage1_config, self.stage2_config):
            if not path.is_file():
                raise ExperimentError(f"recipe {path} does not exist")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ExperimentError(f"seeds must be distinct and at least one, got {list(self.seeds)}")

    def describe(self) -> str:
        overrides = ", ".join([*self.stage1_overrides, *self.stage2_overrides]) or "none"
        return (f"ASVR vs LLaVA on the demo data ({self.demo_dir}): seeds {', '.join(map(str, self.seeds))} per arm; "
                f"stage 1 from the import, {self.stage1_steps} steps ({self.stage1_config}); "
                f"stage 2 {self.stage2_steps} "
                f"steps ({self.stage2_config}), held-out scores every {self.eval_interval}; {self.nproc} processes; "
                f"recipe overrides for both arms: {overrides}")


def _run(command: List[str], log: Path) -> float:
    """Run ``command`` with its output in ``log``; its wall time in seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode
    if code:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise ExperimentError(f"{' '.join(command[:4])} ... failed with exit code {code}; log {log}:\n{tail}")
    return time.perf_counter() - start


def _torchrun(config: ExperimentConfig, tool: str, args: List[str]) -> List[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(config.nproc),
            "--master_port", str(config.master_port), tool, *args]


def train_command(config: ExperimentConfig, arm: str, seed: int, stage: int) -> List[str]:
    """torchrun tools/train.py for ``arm``'s stage 1 (from the demo's import) or 2 (from its stage 1)."""
    demo, run_dir = config.demo_dir, config.run_dir(arm, seed)
    data = STAGE_DATA[stage]
    sets = [
        f"data.image_root={demo / 'data/images'}", f"data.shards={demo / 'shards' / data}",
        f"data.targets={demo / 'targets/train'}", f"train.visual_tokenizer={demo / 'tokenizer'}",
        f"train.save_dir={run_dir / f'stage{stage}'}", f"train.seed={seed}", "train.log_interval=1",
        f"train.steps={config.steps(stage)}", "train.save_interval=0", *config.overrides(stage), *ARMS[arm][1],
    ]
    if stage == 1:
        sets.append(f"train.load={demo / 'init'}")
    else:
        sets += [f"train.load={run_dir / 'stage1'}", f"train.eval_interval={config.eval_interval}",
                 f"train.eval_data={demo / 'data/eval.jsonl'}", f"train.eval_tokenizer={demo / 'data'}"]
    args = ["--config", str(config.recipe(stage))]
    for item in sets:
        args += ["--set", item]
    return _torchrun(config, "tools/train.py", args)


def evaluate_command(config: ExperimentConfig, arm: str, seed: int) -> List[str]:
    """torchrun tools/evaluate.py (greedy answers) on the run's stage-2 checkpoint; questions split over the ranks."""
    demo, run_dir = config.demo_dir, config.run_dir(arm, seed)
    return _torchrun(config, "tools/evaluate.py", [
        "--checkpoint", str(run_dir / "stage2"), "--tokenizer", str(demo / "data"),
        "--benchmark", f"jsonl={demo / 'data/eval.jsonl'}", "--image-root", f"jsonl={demo / 'data/images'}",
        "--method", "generate", "--max-new-tokens", str(MAX_NEW_TOKENS), "--out", str(run_dir / "eval"),
    ])


def _finished(save_dir: Path, steps: int) -> bool:
    latest = find_latest(save_dir) if save_dir.is_dir() else None
    return latest is not None and latest == checkpoint_dir(save_dir, steps)


def read_scalars(log_dir: Path) -> Dict[str, List[Tuple[int, float]]]:
    """TensorBoard scalars of a run: tag -> [(step, value)] (the last value of a repeated step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: sorted({e.step: e.value for e in accumulator.Scalars(tag)}.items())
            for tag in accumulator.Tags()["scalars"]}


class Timings(dict):
    """Wall seconds per run name (``<arm>/seed<k>/<stage1|stage2|eval>``), kept in a JSON file across calls."""

    def __init__(self, path: Path):
        super().__init__(json.loads(path.read_text()) if path.is_file() else {})
        self.path = path

    def run(self, name: str, command: List[str], logs: Path) -> None:
        print(f"[experiment] {name}", flush=True)
        self[name] = _run(command, logs / f"{name.replace('/', '_')}.log")
        self.path.write_text(json.dumps(self, indent=1) + "\n")


def train_and_evaluate(config: ExperimentConfig, arm: str, seed: int, timings: Timings) -> None:
    """The run's stages and its evaluation, each unless already done."""
    name, run_dir, logs = f"{arm}/seed{seed}", config.run_dir(arm, seed), config.out_dir / "logs"
    trained = False
    for stage in (1, 2):
        if not _finished(run_dir / f"stage{stage}", config.steps(stage)):
            timings.run(f"{name}/stage{stage}", train_command(config, arm, seed, stage), logs)
            trained = True
    if trained or not (run_dir / "eval" / RESULTS_JSON).is_file():
        timings.run(f"{name}/eval", evaluate_command(config, arm, seed), logs)


def collect(config: ExperimentConfig, timings: Timings) -> Results:
    """Every run's scalars, greedy scores and wall times."""
    curves, records = {arm: {} for arm in ARMS}, {arm: {} for arm in ARMS}
    for arm in ARMS:
        for seed in config.seeds:
            run_dir, name = config.run_dir(arm, seed), f"{arm}/seed{seed}"
            curves[arm][seed] = {s: read_scalars(run_dir / f"stage{s}/tensorboard") for s in (1, 2)}
            evaluation = json.loads((run_dir / "eval" / RESULTS_JSON).read_text())["benchmarks"]["jsonl"]
            seconds = {part: timings.get(f"{name}/{part}", 0.0) for part in ("stage1", "stage2", "eval")}
            records[arm][seed] = seed_record(curves[arm][seed], evaluation, seconds)
    return Results({arm: label for arm, (label, _) in ARMS.items()}, curves, records)


def run_experiment(config: ExperimentConfig) -> dict:
    """Train and evaluate every (arm, seed), seed by seed; write the report, the figures and the JSON."""
    config.validate()
    config = config.resolved()
    timings = Timings(config.out_dir / "timings.json")
    runs, start = [(arm, seed) for seed in config.seeds for arm in ARMS], time.perf_counter()
    for done, (arm, seed) in enumerate(runs, 1):
        train_and_evaluate(config, arm, seed, timings)
        elapsed = time.perf_counter() - start
        print(f"[experiment] {done}/{len(runs)} runs ready after {elapsed / 60:.1f} min; "
              f"about {elapsed / done * (len(runs) - done) / 60:.1f} min to go", flush=True)
    results = collect(config, timings)
    out = config.out_dir
    report = format_report(results, config.describe())
    (out / "experiment.md").write_text(report + "\n", encoding="utf-8")
    save_figure(curves_png(results, config.stage1_steps), out / "curves.png")
    save_figure(accuracy_png(results), out / "accuracy.png")
    record = {"config": dataclasses.asdict(config), "seeds": results.records, "summary": results.summary(),
              "timings_s": dict(timings)}
    (out / "experiment.json").write_text(json.dumps(record, indent=1, default=str) + "\n", encoding="utf-8")
    print(report, flush=True)
    print(f"wrote {out / 'experiment.md'}, experiment.json, curves.png and accuracy.png", flush=True)
    return record
