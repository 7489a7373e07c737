"""The evaluation suites by name: how each benchmark file format is read and its predictions scored."""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

from megatron_asvr.evaluation.items import BenchmarkError, EvalItem, ReadResult
from megatron_asvr.evaluation.suites.ai2d_realworldqa import read_ai2d, read_realworldqa, score_realworldqa
from megatron_asvr.evaluation.suites.choice import read_mmbench, read_mmvp, read_seed, score_choice, score_mmvp
from megatron_asvr.evaluation.suites.documents import (
    read_chartqa,
    read_docvqa,
    read_ocrbench,
    score_chartqa,
    score_docvqa,
    score_ocrbench,
)
from megatron_asvr.evaluation.suites.hallusion import read_hallusionbench, score_hallusionbench
from megatron_asvr.evaluation.suites.jsonl import read_jsonl_benchmark, score_jsonl
from megatron_asvr.evaluation.suites.mmmu import read_mmmu, score_mmmu
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
    "docvqa": Benchmark(read_docvqa, score_docvqa, "anls"),
    "chartqa": Benchmark(read_chartqa, score_chartqa, "relaxed_accuracy"),
    "ocrbench": Benchmark(read_ocrbench, score_ocrbench, "total"),
    "mmmu": Benchmark(read_mmmu, score_mmmu, "accuracy"),
    "ai2d": Benchmark(read_ai2d, score_choice, "accuracy"),
    "realworldqa": Benchmark(read_realworldqa, score_realworldqa, "accuracy"),
    "hallusionbench": Benchmark(read_hallusionbench, score_hallusionbench, "aAcc"),
    # The demo's eval.jsonl and other sets converted to the generic JSON-lines shape.
    "jsonl": Benchmark(read_jsonl_benchmark, score_jsonl, "accuracy"),
}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise BenchmarkError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]
