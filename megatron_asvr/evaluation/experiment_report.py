"""The ASVR-versus-LLaVA experiment's report: one flat record per (arm, seed), mean ± std over
seeds, the markdown tables, and the figures (loss / accuracy curves, accuracy bars).

A record's keys: ``stage1_text_loss``, ``stage2_text_loss``, ``stage2_visual_loss`` (mean of
the last FINAL_WINDOW logged steps), ``greedy/<metric>`` (the held-out jsonl scores of greedy
answers: ``accuracy``, ``chance``, ``majority``, ``<category>/...``), ``in_training/<name>``
(stage 2's last in-training likelihood score), ``questions``, ``train_seconds``, ``eval_seconds``.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_asvr.evaluation.plot import DDOF, Band, Panel, bars_figure, curves_figure, seed_band, std

Points = List[Tuple[int, float]]  # (step, value) of one TensorBoard tag
FINAL_WINDOW = 10  # final losses are the mean of the last logged steps
IN_TRAINING = ("accuracy", "true_choice_prob", "chance")  # eval/<name> scalars kept from stage 2
SPREAD = f"mean ± std over seeds (std: sample, ddof={DDOF})"


@dataclass
class Results:
    labels: Dict[str, str]  # arm -> its name in tables and legends
    curves: Dict[str, Dict[int, Dict[int, Dict[str, Points]]]]  # arm -> seed -> stage -> tag -> points
    records: Dict[str, Dict[int, dict]]  # arm -> seed -> seed_record

    def summary(self) -> Dict[str, Dict[str, dict]]:
        """arm -> key -> {"mean", "std", "n"} over its seeds."""
        return {arm: mean_std(list(seeds.values())) for arm, seeds in self.records.items()}


def final_loss(points: Points) -> Optional[float]:
    tail = [value for _, value in points[-FINAL_WINDOW:]]
    return sum(tail) / len(tail) if tail else None


def seed_record(scalars: Dict[int, Dict[str, Points]], evaluation: dict, seconds: Dict[str, float]) -> dict:
    """One (arm, seed): its two stages' TensorBoard scalars, its results.json benchmark entry
    (``metrics``, ``questions``) and its wall times (``stage1``, ``stage2``, ``eval``) -> a record."""
    stage1, stage2 = scalars[1], scalars[2]
    return {
        "stage1_text_loss": final_loss(stage1.get("loss/text", [])),
        "stage2_text_loss": final_loss(stage2.get("loss/text", [])),
        "stage2_visual_loss": final_loss(stage2.get("loss/visual_semantic", [])),
        **{f"greedy/{name}": value for name, value in evaluation["metrics"].items()},
        **{f"in_training/{name}": stage2[f"eval/{name}"][-1][1] for name in IN_TRAINING if stage2.get(f"eval/{name}")},
        "questions": evaluation["questions"],
        "train_seconds": seconds.get("stage1", 0.0) + seconds.get("stage2", 0.0),
        "eval_seconds": seconds.get("eval", 0.0),
    }


def mean_std(records: Sequence[dict]) -> Dict[str, dict]:
    """Per key: mean and std (ddof=DDOF; None for one value) over the records holding a value, and their count."""
    summary = {}
    for key in dict.fromkeys(k for record in records for k in record):
        values = np.array([r[key] for r in records if r.get(key) is not None], dtype=np.float64)  # [seeds]
        if len(values):
            spread = float(std(values))
            summary[key] = {"mean": float(values.mean()), "std": None if np.isnan(spread) else spread,
                            "n": len(values)}
    return summary


def categories(summary: Dict[str, dict]) -> List[str]:
    """The question categories of the greedy scores, sorted."""
    return sorted(k[len("greedy/"):-len("/accuracy")] for k in summary
                  if k.startswith("greedy/") and k.endswith("/accuracy") and k != "greedy/accuracy")


def groups(summary: Dict[str, dict]) -> List[Tuple[str, str]]:
    """(name, key prefix) of all questions, then of each category: ("all", "greedy/"), ("color", "greedy/color/")."""
    return [("all", "greedy/")] + [(c, f"greedy/{c}/") for c in categories(summary)]


def _cell(stat: Optional[dict], form: str = "{:.4f}", spread: bool = True) -> str:
    """"mean ± std" of a mean_std entry; the mean alone for one seed or ``spread=False``; "-" for none."""
    if stat is None:
        return "-"
    mean = form.format(stat["mean"])
    return mean if stat["std"] is None or not spread else f"{mean} ± {form.format(stat['std'])}"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    return [_row(header), "|" + "---|" * len(header), *map(_row, rows)]


def accuracy_table(results: Results) -> List[str]:
    """Greedy accuracy per category: chance, majority, and each arm's mean ± std."""
    summary = results.summary()
    arms = list(results.labels)
    first = summary[arms[0]]
    header = ["category", "chance", "majority", *(results.labels[a] for a in arms)]
    rows = [[name, *(_cell(first.get(prefix + level), spread=False) for level in ("chance", "majority")),
             *(_cell(summary[a].get(prefix + "accuracy")) for a in arms)] for name, prefix in groups(first)]
    questions = int(first["questions"]["mean"])
    return [f"Held-out greedy accuracy ({questions} questions), {SPREAD}; chance and majority do not "
            "depend on the model", "", *_table(header, rows)]


def training_table(results: Results) -> List[str]:
    """Final losses, the last in-training scores and wall times: each arm's mean ± std."""
    summary = results.summary()
    arms = list(results.labels)
    quantities = [
        (f"stage-1 text loss (mean of last {FINAL_WINDOW} steps)", "stage1_text_loss", "{:.4f}"),
        (f"stage-2 text loss (mean of last {FINAL_WINDOW} steps)", "stage2_text_loss", "{:.4f}"),
        (f"stage-2 visual loss (mean of last {FINAL_WINDOW} steps)", "stage2_visual_loss", "{:.4f}"),
        ("in-training held-out accuracy, likelihood, letter + yes/no (last)", "in_training/accuracy", "{:.4f}"),
        ("in-training chance, letter + yes/no", "in_training/chance", "{:.4f}"),
        ("in-training true-choice probability (last)", "in_training/true_choice_prob", "{:.4f}"),
        ("training wall time per seed (s)", "train_seconds", "{:.1f}"),
        ("evaluation wall time per seed (s)", "eval_seconds", "{:.1f}"),
    ]
    rows = [[name, *(_cell(summary[a].get(key), form) for a in arms)] for name, key, form in quantities]
    return [f"Training, {SPREAD}", "", *_table(["", *(results.labels[a] for a in arms)], rows)]


def seeds_table(results: Results) -> List[str]:
    """Every (arm, seed): greedy accuracy overall and per category, final losses, training time."""
    names = categories(next(iter(results.summary().values())))
    header = ["arm", "seed", "accuracy", *names, "stage-1 text", "stage-2 text", "stage-2 visual", "train s"]
    keys = ["greedy/accuracy", *(f"greedy/{c}/accuracy" for c in names), "stage1_text_loss", "stage2_text_loss",
            "stage2_visual_loss"]
    rows = [[results.labels[arm], str(seed), *("-" if record.get(k) is None else f"{record[k]:.4f}" for k in keys),
             f"{record['train_seconds']:.1f}"]
            for arm, seeds in results.records.items() for seed, record in seeds.items()]
    return ["Per seed (greedy accuracy; losses: mean of the last steps)", "", *_table(header, rows)]


def format_report(results: Results, description: str) -> str:
    """experiment.md: the description, then the accuracy, training and per-seed tables."""
    seconds = sum(r["train_seconds"] + r["eval_seconds"] for seeds in results.records.values() for r in seeds.values())
    blocks = [[description], accuracy_table(results), training_table(results), seeds_table(results),
              [f"Total wall time of training and evaluation: {seconds / 60:.1f} min"]]
    return "\n\n".join("\n".join(block) for block in blocks)


def _bands(results: Results, tag: str, stage_offsets: Dict[int, int]) -> List[Band]:
    """Each arm's seed band of ``tag`` over the stages in ``stage_offsets`` (stage -> step offset),
    for the arms that logged it."""
    bands = []
    for arm, seeds in results.curves.items():
        runs = [[(step + offset, value) for stage, offset in stage_offsets.items()
                 for step, value in scalars[stage].get(tag, [])] for scalars in seeds.values()]
        if any(runs):
            bands.append(seed_band(results.labels[arm], runs))
    return bands


def _chance(results: Results) -> List[Tuple[float, str, str]]:
    """The in-training questions' chance level (one for all runs) as a dashed line, where logged."""
    values = [r["in_training/chance"] for seeds in results.records.values() for r in seeds.values()
              if "in_training/chance" in r]
    return [(values[0], "chance", "--")] if values else []


def curve_panels(results: Results, stage1_steps: int) -> List[Panel]:
    """Text loss and visual loss over stage 1 then stage 2 (one x axis), the in-training accuracy over stage 2."""
    both = {1: 0, 2: stage1_steps}
    boundary = [(stage1_steps + 0.5, "stage 2 starts")]
    x_label = "step (stage 1, then stage 2)"
    return [
        Panel("text loss", x_label, "loss", _bands(results, "loss/text", both), boundary),
        Panel("visual loss (mean over depths)", x_label, "loss", _bands(results, "loss/visual_semantic", both),
              boundary),
        Panel("held-out accuracy in training\n(likelihood, letter + yes/no)", "stage-2 step", "accuracy",
              _bands(results, "eval/accuracy", {2: 0}), levels=_chance(results)),
    ]


def curves_png(results: Results, stage1_steps: int):
    return curves_figure(curve_panels(results, stage1_steps), f"line: mean over seeds; band: ± 1 std (ddof={DDOF})")


def accuracy_png(results: Results):
    """Bars of the greedy accuracy per category (all first) for each arm, error bars = std over seeds."""
    summary = results.summary()
    first = next(iter(summary.values()))
    names, prefixes = zip(*groups(first))

    def stat(values: Dict[str, dict], key: str, field: str = "mean") -> List[float]:
        entries = [values.get(prefix + key) for prefix in prefixes]
        return [np.nan if e is None or e[field] is None else e[field] for e in entries]

    bars = {results.labels[a]: (stat(s, "accuracy"), stat(s, "accuracy", "std")) for a, s in summary.items()}
    return bars_figure(names, bars, stat(first, "chance"), stat(first, "majority"),
                       f"held-out greedy accuracy: mean over seeds, error bar ± 1 std (ddof={DDOF})", "accuracy")
