"""The evaluation suites by name: how each benchmark file format is read and its predictions scored."""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

from megatron_asvr.evaluation.items import BenchmarkError, EvalItem, ReadResult
from megatron_asvr.evaluation.suites.choice import read_mmbench, read_mmvp, read_seed, score_choice, score_mmvp
from megatron_asvr.evaluation.suites.jsonl import read_jsonl_benchmark, score_jsonl
from megatron_asvr.evaluation.suites.short_answer import read_gqa, read_textvqa, score_gqa, score_textvqa
from megatron_asvr.evaluation.suites.yes_no import read_mme, read_pope, score_mme, score_pope


@dataclass(frozen=True)
class Benchmark:
    read: Callable[[Path, Optional[Path]], ReadResult]
    score: Callable[[List[EvalItem], Dict[str, str]], Dict[str, float]]
    headline: str  # the metric its table row quotes


BENCHMARKS: Dict[str, Benchmark] = {
    "pope": Benchmark(read_pope, score_pope, "f1"),
    "mme": Benchmark(read_mme, score_mme, "total"),
    "mmbench": Benchmark(read_mmbench, score_choice, "accuracy"),
    "seed": Benchmark(read_seed, score_choice, "accuracy"),
    "mmvp": Benchmark(read_mmvp, score_mmvp, "pair_accuracy"),
    "textvqa": Benchmark(read_textvqa, score_textvqa, "accuracy"),
    "gqa": Benchmark(read_gqa, score_gqa, "accuracy"),
    # AI2D, RealWorldQA and the demo's eval.jsonl in the generic JSON-lines shape.
    "jsonl": Benchmark(read_jsonl_benchmark, score_jsonl, "accuracy"),
}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise BenchmarkError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]
