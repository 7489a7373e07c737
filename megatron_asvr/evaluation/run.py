"""The evaluation tool's work: read the benchmarks, open the model, answer, score, print the
table and write the results (rank 0); or time the greedy answers with and without the KV cache
side by side (``compare_kv_cache``)."""

import json
import os
import time
from typing import Dict, List

import torch.distributed as dist

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


def _timed_answers(loaded: LoadedModel, items, kv_cache: bool):
    """(seconds, question_id -> answer text) of every rank's greedy answers to ``items``."""
    loaded.answerer.runner.kv_cache = kv_cache
    if dist.is_initialized():
        dist.barrier()  # every rank starts the clock together
    start = time.perf_counter()
    answers = loaded.answerer.answer(items, "generate")  # ends with a gather over data-parallel replicas
    if dist.is_initialized():
        dist.barrier()
    return time.perf_counter() - start, {qid: a.text for qid, a in answers.items()}


def format_comparison(rows: List[dict], header: str) -> str:
    lines = [header, f"{'benchmark':<12} {'questions':>9} {'uncached s':>10} {'kv cache s':>10} {'speed-up':>8} "
                     f"{'same answers':>12}"]
    for r in rows:
        lines.append(f"{r['benchmark']:<12} {r['questions']:>9} {r['uncached_s']:>10.2f} {r['cached_s']:>10.2f} "
                     f"{r['speedup']:>7.2f}x {r['same_answers']:>6}/{r['questions']}")
    return "\n".join(lines)


def compare_kv_cache(config: EvalConfig) -> List[dict]:
    """Greedy answers of each benchmark twice on one loaded model, by the uncached reference and with
    the KV cache (after one warm-up question each): seconds, speed-up and how many answers agree.
    Rank 0 prints the table and writes ``kv_cache_comparison.json`` to ``out_dir``."""
    config.validate()
    if config.model.checkpoint is None:
        raise ConfigError("the KV cache comparison runs our checkpoints (--checkpoint), not an HF export")
    read = {spec.name: read_benchmark(spec) for spec in config.benchmarks}
    rows = []
    with open_model(config.model) as loaded:
        for spec in config.benchmarks:
            items = read[spec.name].items[: config.limit] if config.limit else read[spec.name].items
            for kv_cache in (False, True):
                _timed_answers(loaded, items[:1], kv_cache)  # warm-up: first-call allocations and imports
            uncached_s, uncached = _timed_answers(loaded, items, False)
            cached_s, cached = _timed_answers(loaded, items, True)
            rows.append({"benchmark": spec.name, "questions": len(items), "uncached_s": uncached_s,
                         "cached_s": cached_s, "speedup": uncached_s / cached_s,
                         "same_answers": sum(cached[qid] == text for qid, text in uncached.items())})
        if loaded.writer:
            load = os.getloadavg()[0]
            header = (f"model: {loaded.name} | max_new_tokens {config.model.max_new_tokens} | "
                      f"{dist.get_world_size() if dist.is_initialized() else 1} ranks | load average {load:.2f}")
            print(format_comparison(rows, header), flush=True)
            config.out_dir.mkdir(parents=True, exist_ok=True)
            path = config.out_dir / "kv_cache_comparison.json"
            path.write_text(json.dumps({"header": header, "rows": rows}, indent=1) + "\n", encoding="utf-8")
            print(f"wrote {path}", flush=True)
    return rows
