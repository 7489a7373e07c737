"""ASVR versus LLaVA on the demo data: both arms trained with the same recipes, seed and steps
(stage 1 then stage 2; LLaVA with the visual loss off in both stages), the held-out questions
scored on both (greedy answers and answer likelihood), a table and a loss-curve plot.

    out/<arm>/stage1, out/<arm>/stage2     training runs (TensorBoard logs inside)
    out/<arm>/eval_<method>/results.json   evaluation tool output
    out/logs/*.log                         every subprocess's output
    out/experiment.md, experiment.json, curves.png

Every step runs the project's tools as subprocesses (torchrun for training and
evaluation); a finished training run is not repeated, so the command resumes.
"""

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from megatron_asvr.evaluation.answerer import METHODS
from megatron_asvr.evaluation.plot import Panel, save_chart
from megatron_asvr.training.checkpoint import checkpoint_dir, find_latest

ARMS = {  # name -> (label, overrides for both stages)
    "llava": ("LLaVA (no visual loss)", ["model.asvr.visual_loss=false"]),
    "asvr": ("ASVR", []),
}
DEMO_INPUTS = ("data/eval.jsonl", "data/images", "tokenizer", "shards/pretrain", "shards/instruct",
               "targets/pretrain", "targets/instruct")
FINAL_WINDOW = 10  # final losses are the mean of the last logged steps


class ExperimentError(RuntimeError):
    """A step of the experiment failed; the message names it and its log."""


@dataclass
class ExperimentConfig:
    demo_dir: Path  # launch/demo.sh's output: data, tokenizer, shards, targets
    out_dir: Path
    stage1_config: Path = Path("configs/demo_stage1.yaml")
    stage2_config: Path = Path("configs/demo_stage2.yaml")
    stage1_steps: int = 40
    stage2_steps: int = 150
    eval_interval: int = 25  # stage-2 steps between in-training held-out scores
    seed: int = 1234
    nproc: int = 2
    master_port: int = 29620
    # Recipe overrides for both arms. The demo's stage-2 rate (2e-4) leaves the from-scratch
    # tiny LLM at text loss ~3.2 after 150 steps; 1e-3 reaches ~1.2.
    stage1_overrides: Tuple[str, ...] = ()
    stage2_overrides: Tuple[str, ...] = ("train.lr=1.0e-3",)

    def validate(self) -> None:
        missing = [p for p in DEMO_INPUTS if not (self.demo_dir / p).exists()]
        if missing:
            raise ExperimentError(f"{self.demo_dir} lacks {', '.join(missing)}: run launch/demo.sh "
                                  f"(DEMO_DIR={self.demo_dir}) first")
        for path in (self.stage1_config, self.stage2_config):
            if not path.is_file():
                raise ExperimentError(f"recipe {path} does not exist")


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


def train_command(config: ExperimentConfig, arm: str, stage: int) -> List[str]:
    """torchrun tools/train.py for ``arm``'s stage 1 or 2."""
    demo, out = config.demo_dir, config.out_dir / arm
    name = "pretrain" if stage == 1 else "instruct"
    sets = [
        f"data.image_root={demo / 'data/images'}", f"data.shards={demo / 'shards' / name}",
        f"data.targets={demo / 'targets' / name}", f"train.visual_tokenizer={demo / 'tokenizer'}",
        f"train.save_dir={out / f'stage{stage}'}", f"train.seed={config.seed}", "train.log_interval=1",
        f"train.steps={config.stage1_steps if stage == 1 else config.stage2_steps}", "train.save_interval=0",
        *(config.stage1_overrides if stage == 1 else config.stage2_overrides), *ARMS[arm][1],
    ]
    if stage == 2:
        sets += [f"train.load={out / 'stage1'}", f"train.eval_interval={config.eval_interval}",
                 f"train.eval_data={demo / 'data/eval.jsonl'}", f"train.eval_tokenizer={demo / 'data'}"]
    recipe = config.stage1_config if stage == 1 else config.stage2_config
    args = ["--config", str(recipe)]
    for item in sets:
        args += ["--set", item]
    return _torchrun(config, "tools/train.py", args)


def evaluate_command(config: ExperimentConfig, arm: str, method: str) -> List[str]:
    """torchrun tools/evaluate.py on ``arm``'s stage-2 checkpoint; questions split over the ranks."""
    demo = config.demo_dir
    return _torchrun(config, "tools/evaluate.py", [
        "--checkpoint", str(config.out_dir / arm / "stage2"), "--tokenizer", str(demo / "data"),
        "--benchmark", f"jsonl={demo / 'data/eval.jsonl'}", "--image-root", f"jsonl={demo / 'data/images'}",
        "--method", method, "--out", str(config.out_dir / arm / f"eval_{method}"),
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


def _final(points: List[Tuple[int, float]]) -> Optional[float]:
    tail = [v for _, v in points[-FINAL_WINDOW:]]
    return sum(tail) / len(tail) if tail else None


def _shifted(points, offset: int):
    return [(step + offset, value) for step, value in points]


def summarize(config: ExperimentConfig, curves: Dict[str, Dict[int, dict]], evaluations: Dict[str, dict],
              timings: Dict[str, float]) -> dict:
    """Per arm: final losses, held-out scores of both methods, in-training scores, wall times."""
    summary = {}
    for arm in ARMS:
        stage1, stage2 = curves[arm][1], curves[arm][2]
        generate = evaluations[arm]["generate"]["benchmarks"]["jsonl"]
        likelihood = evaluations[arm]["likelihood"]["benchmarks"]["jsonl"]
        letters = [k for k in ("choice/accuracy", "yes/no/accuracy") if k in likelihood["metrics"]]
        summary[arm] = {
            "label": ARMS[arm][0],
            "stage1_text_loss": _final(stage1.get("loss/text", [])),
            "stage2_text_loss": _final(stage2.get("loss/text", [])),
            "stage2_visual_loss": _final(stage2.get("loss/visual_semantic", [])),
            "generate": generate["metrics"],
            "generate_questions": generate["questions"],
            "likelihood": {k: likelihood["metrics"][k] for k in letters},
            "in_training": {tag.split("/", 1)[1]: stage2[tag][-1][1] for tag in
                            ("eval/accuracy", "eval/true_choice_prob") if stage2.get(tag)},
            "train_seconds": timings.get(f"{arm}_stage1", 0.0) + timings.get(f"{arm}_stage2", 0.0),
        }
    return summary


def format_summary(config: ExperimentConfig, summary: dict) -> str:
    """The experiment's table (markdown)."""
    arms = list(ARMS)

    def row(name: str, values, form: str = "{:.4f}") -> str:
        return f"| {name} | " + " | ".join("-" if v is None else form.format(v) for v in values) + " |"

    categories = sorted(k for k in summary[arms[0]]["generate"] if k != "accuracy")
    overrides = ", ".join([*config.stage1_overrides, *config.stage2_overrides]) or "none"
    lines = [
        f"ASVR vs LLaVA on the demo data: seed {config.seed}, stage 1 {config.stage1_steps} steps, "
        f"stage 2 {config.stage2_steps} steps, {config.nproc} processes; recipe overrides: {overrides}",
        "",
        "| | " + " | ".join(summary[a]["label"] for a in arms) + " |",
        "|---|" + "---|" * len(arms),
        row(f"stage-1 text loss (mean of last {FINAL_WINDOW} steps)", [summary[a]["stage1_text_loss"] for a in arms]),
        row(f"stage-2 text loss (mean of last {FINAL_WINDOW} steps)", [summary[a]["stage2_text_loss"] for a in arms]),
        row("stage-2 visual loss", [summary[a]["stage2_visual_loss"] for a in arms]),
        row(f"held-out accuracy, greedy ({summary[arms[0]]['generate_questions']} questions)",
            [summary[a]["generate"]["accuracy"] for a in arms]),
        *[row(f"  {c}", [summary[a]["generate"].get(c) for a in arms]) for c in categories],
        *[row(f"held-out {k}, likelihood", [summary[a]["likelihood"].get(k) for a in arms])
          for k in sorted(summary[arms[0]]["likelihood"])],
        row("in-training held-out true-choice probability (last)",
            [summary[a]["in_training"].get("true_choice_prob") for a in arms]),
        row("training wall time (s)", [summary[a]["train_seconds"] for a in arms], "{:.1f}"),
    ]
    return "\n".join(lines)


def curve_panels(config: ExperimentConfig, curves: Dict[str, Dict[int, dict]]) -> List[Panel]:
    boundary = [(config.stage1_steps + 0.5, "stage 2")]

    def joined(arm: str, tag: str):
        return curves[arm][1].get(tag, []) + _shifted(curves[arm][2].get(tag, []), config.stage1_steps)

    return [
        Panel("text loss", "step (stage 1, then stage 2)", "loss", {ARMS[a][0]: joined(a, "loss/text") for a in ARMS},
              boundary),
        Panel("visual loss (ASVR, mean over depths)", "step", "loss",
              {ARMS[a][0]: joined(a, "loss/visual_semantic") for a in ARMS if joined(a, "loss/visual_semantic")},
              boundary),
        Panel("held-out letter + yes/no accuracy (likelihood)", "stage-2 step", "accuracy",
              {ARMS[a][0]: curves[a][2].get("eval/accuracy", []) for a in ARMS}),
    ]


def run_experiment(config: ExperimentConfig) -> dict:
    """Train both arms, evaluate them, write the table, the plot and the JSON; return the summary."""
    config.validate()
    logs, timings_path = config.out_dir / "logs", config.out_dir / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}  # runs of earlier calls
    for arm in ARMS:
        for stage, steps in ((1, config.stage1_steps), (2, config.stage2_steps)):
            if not _finished(config.out_dir / arm / f"stage{stage}", steps):
                print(f"[experiment] training {arm} stage {stage} ({steps} steps)", flush=True)
                name = f"{arm}_stage{stage}"
                timings[name] = _run(train_command(config, arm, stage), logs / f"{name}.log")
                timings_path.write_text(json.dumps(timings, indent=1) + "\n")
    evaluations = {arm: {} for arm in ARMS}
    for arm in ARMS:
        for method in METHODS:
            print(f"[experiment] evaluating {arm} ({method})", flush=True)
            name = f"{arm}_eval_{method}"
            timings[name] = _run(evaluate_command(config, arm, method), logs / f"{name}.log")
            evaluations[arm][method] = json.loads((config.out_dir / arm / f"eval_{method}/results.json").read_text())
    curves = {arm: {s: read_scalars(config.out_dir / arm / f"stage{s}/tensorboard") for s in (1, 2)} for arm in ARMS}
    summary = summarize(config, curves, evaluations, timings)
    table = format_summary(config, summary)
    (config.out_dir / "experiment.md").write_text(table + "\n", encoding="utf-8")
    plot = save_chart(curve_panels(config, curves), config.out_dir / "curves.png")
    record = {"config": {k: str(v) for k, v in asdict(config).items()}, "arms": summary, "timings_s": timings}
    (config.out_dir / "experiment.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(table, flush=True)
    print(f"wrote {config.out_dir / 'experiment.md'}, {config.out_dir / 'experiment.json'} and {plot}", flush=True)
    return record
