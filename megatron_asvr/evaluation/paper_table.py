"""Benchmark suites: the paper's table of 14 benchmarks (docs/method.md#8-evaluation-prompts), one
row each with its headline metric, and their average.

The average is over percentages. Most headline metrics are fractions (x 100). Two are not, and are
put in percent of their maximum as the paper's evaluation lineage does (ASVR evaluates with
Cambrian-1's code; Cambrian-1's tables average MME as a percentage of its maximum and give
OCRBench as a percentage):

- MME, perception + cognition (out of 2,800: acc + acc+ = 200 per subtask, 14 subtasks):
  100 x total / (200 x the subtasks present);
- OCRBench, right answers (out of 1,000): 100 x right / questions.

A benchmark whose files were not given is listed as missing; the average is then over the others
and is not the paper's.
"""

from dataclasses import dataclass
from statistics import fmean
from typing import Callable, Dict, Sequence, Tuple

from megatron_asvr.config import ConfigError

MME_SUBTASK_MAX = 200.0  # acc + acc+, both in percent


def _fraction(result) -> float:
    return 100.0 * result.metrics[result.headline]


def _mme(result) -> float:
    subtasks = result.metrics["perception_subtasks"] + result.metrics["cognition_subtasks"]
    return 100.0 * result.metrics[result.headline] / (MME_SUBTASK_MAX * subtasks)


def _per_question(result) -> float:
    return 100.0 * result.metrics[result.headline] / len(result.items)


@dataclass(frozen=True)
class PaperRow:
    name: str  # a key of suites.BENCHMARKS
    label: str  # as the paper's table names it
    percent: Callable = _fraction  # BenchmarkResult -> its headline in percent


PAPER14: Tuple[PaperRow, ...] = (
    PaperRow("textvqa", "TextVQA"),
    PaperRow("docvqa", "DocVQA"),
    PaperRow("ocrbench", "OCRBench", _per_question),
    PaperRow("chartqa", "ChartQA"),
    PaperRow("mmbench", "MMBench-en-dev"),
    PaperRow("mme", "MME (sum)", _mme),
    PaperRow("seed", "SEED-Image"),
    PaperRow("gqa", "GQA"),
    PaperRow("mmmu", "MMMU-val"),
    PaperRow("ai2d", "AI2D"),
    PaperRow("realworldqa", "RealWorldQA"),
    PaperRow("mmvp", "MMVP"),
    PaperRow("hallusionbench", "HallusionBench"),
    PaperRow("pope", "POPE"),
)
SUITES: Dict[str, Tuple[PaperRow, ...]] = {"paper14": PAPER14}


def check_suite(suite: str, names: Sequence[str]) -> None:
    """Every benchmark given belongs to ``suite``."""
    if suite not in SUITES:
        raise ConfigError(f"unknown suite {suite!r}; known: {', '.join(SUITES)}")
    known = [row.name for row in SUITES[suite]]
    for name in names:
        if name not in known:
            raise ConfigError(f"suite {suite} takes the benchmarks {', '.join(known)}; {name!r} is not one of them")


def suite_summary(suite: str, results: Sequence) -> dict:
    """The suite's rows (those given, in the paper's order), their average in percent and the
    benchmarks missing. ``results``: report.BenchmarkResult."""
    by_name = {result.name: result for result in results}
    rows = [{"benchmark": row.name, "label": row.label, "questions": len(by_name[row.name].items),
             "metric": by_name[row.name].headline, "value": by_name[row.name].metrics[by_name[row.name].headline],
             "percent": row.percent(by_name[row.name])}
            for row in SUITES[suite] if row.name in by_name]
    return {"suite": suite, "rows": rows, "average": fmean(r["percent"] for r in rows) if rows else None,
            "averaged": len(rows), "benchmarks": len(SUITES[suite]),
            "missing": [row.name for row in SUITES[suite] if row.name not in by_name]}


def format_suite_table(summary: dict) -> str:
    """The paper's table: one line per benchmark (a missing one says so), then the average."""
    given = {row["benchmark"]: row for row in summary["rows"]}
    lines = [("benchmark", "questions", "metric", "value", "percent")]
    for row in SUITES[summary["suite"]]:
        if row.name in given:
            r = given[row.name]
            lines.append((row.label, str(r["questions"]), r["metric"], f"{r['value']:.4f}", f"{r['percent']:.2f}"))
        else:
            lines.append((row.label, "-", "-", "-", "missing"))
    count = f"{summary['averaged']} of {summary['benchmarks']}"
    average = "-" if summary["average"] is None else f"{summary['average']:.2f}"
    lines.append((f"average ({count})", "", "", "", average))
    widths = [max(len(line[c]) for line in lines) for c in range(5)]
    text = [f"paper table ({summary['suite']}): {count} benchmarks",
            "  ".join(h.ljust(w) for h, w in zip(lines[0], widths)), "  ".join("-" * w for w in widths)]
    text += ["  ".join(cell.ljust(w) if c < 3 else cell.rjust(w) for c, (cell, w) in enumerate(zip(line, widths)))
             for line in lines[1:]]
    if summary["missing"]:
        text.append(f"missing (no files given): {', '.join(summary['missing'])}; "
                    f"the average is over {count}, not the paper's")
    return "\n".join(text)
