"""The evaluation tool's work: read the benchmarks, open the model, answer, score, print the
table and write the results (rank 0)."""

from typing import Dict, List

from megatron_asvr.config import ConfigError
from megatron_asvr.config.tools import EvalBenchmarkConfig, EvalConfig
from megatron_asvr.evaluation.items import ReadResult
from megatron_asvr.evaluation.loading import LoadedModel, open_model
from megatron_asvr.evaluation.paper_table import check_suite, format_suite_table, suite_summary
from megatron_asvr.evaluation.report import BenchmarkResult, format_table, write_results
from megatron_asvr.evaluation.suites import get_benchmark


def read_benchmark(spec: EvalBenchmarkConfig) -> ReadResult:
    """The items of one benchmark file (its images under ``image_root``, default: beside it)."""
    if not spec.path.exists():
        raise ConfigError(f"benchmark {spec.name}: {spec.path} does not exist")
    root = spec.image_root or (spec.path if spec.path.is_dir() else spec.path.parent)
    return get_benchmark(spec.name).read(spec.path, root)


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
    config.validate()
    if config.suite:
        check_suite(config.suite, [spec.name for spec in config.benchmarks])
    read = {spec.name: read_benchmark(spec) for spec in config.benchmarks}  # bad files fail before the model loads
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
