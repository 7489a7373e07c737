"""The evaluation tool's work: read the benchmarks, open the model, answer, score, print the
table and write the results (rank 0)."""

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from megatron_asvr.config import ConfigError
from megatron_asvr.evaluation.answerer import METHODS
from megatron_asvr.evaluation.items import ReadResult
from megatron_asvr.evaluation.loading import LoadedModel, ModelSpec, open_model
from megatron_asvr.evaluation.paper_table import check_suite, format_suite_table, suite_summary
from megatron_asvr.evaluation.report import BenchmarkResult, format_table, write_results
from megatron_asvr.evaluation.suites import get_benchmark


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str  # a key of benchmarks.BENCHMARKS
    path: Path
    image_root: Optional[Path] = None  # default: the benchmark file's directory

    def read(self) -> ReadResult:
        if not self.path.exists():
            raise ConfigError(f"benchmark {self.name}: {self.path} does not exist")
        root = self.image_root or (self.path if self.path.is_dir() else self.path.parent)
        return get_benchmark(self.name).read(self.path, root)


@dataclass
class EvalConfig:
    model: ModelSpec
    benchmarks: List[BenchmarkSpec]
    out_dir: Path
    method: str = "generate"  # generate | likelihood (candidates' likelihood where an item has them)
    limit: Optional[int] = None  # the first N questions of each benchmark
    suite: Optional[str] = None  # paper14: the benchmarks are the paper's; add its table and average


def _score(loaded: LoadedModel, config: EvalConfig, read: Dict[str, ReadResult]) -> List[BenchmarkResult]:
    results = []
    for spec in config.benchmarks:
        benchmark, data = get_benchmark(spec.name), read[spec.name]
        items = data.items[: config.limit] if config.limit else data.items
        answers = loaded.answerer.answer(items, config.method)
        metrics = benchmark.score(items, {qid: a.text for qid, a in answers.items()})
        results.append(BenchmarkResult(spec.name, str(spec.path), benchmark.headline, metrics, data.skipped,
                                       items, answers))
    return results


def run_evaluation(config: EvalConfig) -> List[BenchmarkResult]:
    """Evaluate; rank 0 prints the table and writes ``out_dir``. Returns the results (every rank)."""
    if config.method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {config.method!r}")
    if not config.benchmarks:
        raise ConfigError("no benchmark given")
    if config.suite:
        check_suite(config.suite, [spec.name for spec in config.benchmarks])
    read = {spec.name: spec.read() for spec in config.benchmarks}  # bad files fail before the model loads
    with open_model(config.model) as loaded:
        results = _score(loaded, config, read)
        if loaded.writer:
            encoder = loaded.answerer.encoder
            table = format_table(results, f"model: {loaded.name} | method: {config.method}")
            meta = {"model": loaded.name, "method": config.method, "template": encoder.template,
                    "image_mode": encoder.image_mode, "max_new_tokens": config.model.max_new_tokens}
            if config.suite:
                meta["suite"] = suite_summary(config.suite, results)
                table = f"{table}\n\n{format_suite_table(meta['suite'])}"
            print(table, flush=True)
            print(f"wrote {write_results(results, config.out_dir, table, meta)}", flush=True)
    return results
