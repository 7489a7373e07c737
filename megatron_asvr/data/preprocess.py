"""One preprocessing pass: LLaVA JSON + images -> validated, tokenized shards and a report.

The main process reads the records in order, finds repeated ids and writes the
shards; worker processes (forked) validate and tokenize chunks of records. Results
are consumed in input order, so the output is byte-identical for any number of
workers.
"""

import json
import multiprocessing
from collections import deque
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

from tqdm import tqdm

from megatron_asvr.config.tools import PreprocessConfig
from megatron_asvr.data.llava import DataFileError, read_records
from megatron_asvr.data.shards import ShardWriter
from megatron_asvr.data.validate import (
    DuplicateIds,
    RecordResult,
    RecordValidator,
    ValidationReport,
)
from megatron_asvr.tokenizers.templates import get_template
from megatron_asvr.tokenizers.text import load_text_tokenizer

REPORT = "report.json"
_CHUNK = 64  # records per task sent to a worker


class PreprocessFailed(RuntimeError):
    """The run cannot go on or its result is refused; the message is one line for the user."""


_VALIDATOR: RecordValidator | None = None


def _init_worker(validator: RecordValidator) -> None:
    global _VALIDATOR
    _VALIDATOR = validator


def _validate_chunk(chunk: list) -> list[RecordResult]:
    return [_VALIDATOR(raw, duplicate) for raw, duplicate in chunk]


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    items = iter(items)
    while chunk := list(islice(items, size)):
        yield chunk


def _checked_records(inputs) -> Iterator[tuple]:
    duplicates = DuplicateIds()
    for source, path in inputs:
        for raw in read_records(path, source):
            yield raw, duplicates.check(raw)


def _results(validator: RecordValidator, chunks: Iterator[list], workers: int) -> Iterator[list[RecordResult]]:
    """Validated chunks in input order, with at most ``4 * workers`` chunks in flight."""
    if workers == 1:
        _init_worker(validator)
        yield from map(_validate_chunk, chunks)
        return
    with multiprocessing.get_context("fork").Pool(workers, _init_worker, (validator,)) as pool:
        pending = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_validate_chunk, (chunk,)))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _failure(report: ValidationReport, max_skip_fraction: float, report_path: Path) -> str | None:
    if report.errors:
        return f"{report.errors} of {report.total} records have errors; see {report_path}"
    if report.total and report.skipped / report.total > max_skip_fraction:
        return (
            f"{report.skipped} of {report.total} records skipped ({report.skipped / report.total:.2%}), "
            f"above --max-skip-fraction {max_skip_fraction:.2%}; see {report_path}"
        )
    return None


def preprocess(config: PreprocessConfig) -> dict:
    """Runs the pass; returns the report. Raises :class:`PreprocessFailed` with a one-line reason.

    The report is always written to ``output_dir/report.json``; the shards are kept
    (with their manifest) only when the run succeeds.
    """
    if not config.validation.image_root.is_dir():
        raise PreprocessFailed(f"image root {config.validation.image_root} is not a directory")
    for _, path in config.inputs:
        if not Path(path).is_file():
            raise PreprocessFailed(f"{path}: data file not found")
    try:
        template = get_template(config.template)
        tokenizer = load_text_tokenizer(config.tokenizer, config.legacy)
        writer = ShardWriter(config.output_dir, config.samples_per_shard)
    except (ValueError, OSError) as e:
        raise PreprocessFailed(str(e)) from e
    validator = RecordValidator(config.validation, template, tokenizer)
    report = ValidationReport(config.id_list_cap)
    metadata = {
        "inputs": [{"file": str(path), "source": source} for source, path in config.inputs],
        "image_root": str(config.validation.image_root),
        "template": template.name,
        "tokenizer": tokenizer.describe(),
        "max_seq_length": config.validation.max_seq_length,
        "image_tokens": config.validation.image_tokens,
        "too_long": config.validation.too_long,
    }
    chunks = _chunks(_checked_records(config.inputs), _CHUNK)
    try:
        with tqdm(unit="rec", desc="preprocess", disable=not config.progress) as bar:
            for results in _results(validator, chunks, config.workers):
                for result in results:
                    report.add(result)
                    if result.sample is not None:
                        writer.add(result.sample)
                bar.update(len(results))
                bar.set_postfix(skipped=report.skipped, errors=report.errors, refresh=False)
    except DataFileError as e:
        writer.abort()
        raise PreprocessFailed(str(e)) from e
    report_dict = {**report.to_dict(), "metadata": metadata}
    report_path = config.output_dir / REPORT
    report_path.write_text(json.dumps(report_dict, indent=1) + "\n", encoding="utf-8")
    failure = _failure(report, config.max_skip_fraction, report_path)
    if failure:
        writer.abort()
        raise PreprocessFailed(f"{failure}; no shards kept")
    writer.finalize(metadata)
    return report_dict
