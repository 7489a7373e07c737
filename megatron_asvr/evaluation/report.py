"""Benchmark results as a printed table, ``results.json`` and one predictions file per benchmark."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence

from megatron_asvr.evaluation.answerer import Answer
from megatron_asvr.evaluation.items import EvalItem

RESULTS_JSON = "results.json"
TABLE = "results.txt"


@dataclass
class BenchmarkResult:
    name: str
    source: str  # the benchmark file or directory
    headline: str  # the metric the table leads with
    metrics: Dict[str, float]
    skipped: Dict[str, int]  # records not evaluated, by reason
    items: List[EvalItem]
    answers: Dict[str, Answer]

    def methods(self) -> Dict[str, int]:
        counts = {}
        for answer in self.answers.values():
            counts[answer.method] = counts.get(answer.method, 0) + 1
        return counts

    def summary(self) -> dict:
        return {
            "source": self.source, "headline": self.headline, "value": self.metrics[self.headline],
            "questions": len(self.items), "methods": self.methods(), "skipped": self.skipped, "metrics": self.metrics,
        }


def format_table(results: Sequence[BenchmarkResult], title: str) -> str:
    """One block per benchmark: its headline metric first, the other totals, then the per-category ones."""
    rows = [("benchmark", "questions", "metric", "value")]
    for result in results:
        others = sorted((k for k in result.metrics if k != result.headline), key=lambda k: ("/" in k, k))
        names = [result.headline] + others
        for i, name in enumerate(names):
            first = i == 0
            rows.append((result.name if first else "", str(len(result.items)) if first else "", name,
                         f"{result.metrics[name]:.4f}"))
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(rows[0], widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(cell.ljust(w) if c < 3 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths)))
              for row in rows[1:]]
    for result in results:
        if result.skipped:
            counts = ", ".join(f"{n} {why}" for why, n in sorted(result.skipped.items()))
            lines.append(f"{result.name}: skipped {counts}")
    return "\n".join(lines)


def _prediction(item: EvalItem, answer: Answer) -> dict:
    row = {"question_id": item.question_id, "category": item.category, "answer_type": item.answer_type,
           "prediction": answer.text, "method": answer.method, "answer": item.answer}
    if answer.logprobs:
        row["logprobs"] = dict(zip(item.choices, answer.logprobs))
    return row


def write_results(results: Sequence[BenchmarkResult], out_dir: Path, table: str, meta: dict) -> Path:
    """``results.txt`` (the table), ``results.json`` and ``predictions_<name>.jsonl``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / TABLE).write_text(table + "\n", encoding="utf-8")
    for result in results:
        lines = [json.dumps(_prediction(item, result.answers[item.question_id]), default=list) for item in result.items]
        (out_dir / f"predictions_{result.name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary = {**meta, "benchmarks": {r.name: r.summary() for r in results}}
    path = out_dir / RESULTS_JSON
    path.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return path
