"""Benchmark records in the shapes their authors and LLaVA-style evaluations publish them: a JSON
file (a list, or ``{"data": [...]}`` as the RRC and ChartQA releases), JSON lines, or the
parquet shards of a HuggingFace dataset (``<split>-00000-of-00001.parquet``, images embedded as
``{"bytes": ..., "path": ...}``), and the image a record names.

Parquet shards are read with pyarrow, one record batch at a time.
"""

from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

from megatron_asvr.evaluation.items import BenchmarkError, EvalItem, ReadResult
from megatron_asvr.evaluation.suites.files import read_json, read_jsonl

PARQUET = ".parquet"


def parquet_files(path: Path, split: Optional[str]) -> list:
    """A parquet file, or the shards under a directory: those of ``split`` (``<split>-*.parquet``)
    when there are any, else all of them."""
    path = Path(path)
    if path.is_file():
        return [path]
    shards = sorted(path.rglob(f"*{PARQUET}"))
    of_split = [p for p in shards if split and p.name.startswith(f"{split}-")]
    return of_split or shards


def _parquet_rows(path: Path) -> Iterator[dict]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            yield from batch.to_pylist()
    except (OSError, pyarrow.ArrowException) as err:
        raise BenchmarkError(f"{path}: cannot read the parquet file: {err}") from err


def read_records(path: Path, split: Optional[str] = None) -> Iterator[Tuple[str, dict]]:
    """(where, record) of every record: ``where`` names the file and the record for errors."""
    path = Path(path)
    if path.is_dir() or path.suffix == PARQUET:
        files = parquet_files(path, split)
        if not files:
            raise BenchmarkError(f"{path}: no {PARQUET} files in this directory")
        for file in files:
            for number, record in enumerate(_parquet_rows(file)):
                yield f"{file}: row {number}", record
    elif path.suffix == ".jsonl":
        for number, record in read_jsonl(path):
            yield f"{path}:{number}", record
    else:
        data = read_json(path)
        records = data.get("data") if isinstance(data, dict) else data
        if not isinstance(records, list):
            raise BenchmarkError(f"{path}: expected a list of records or {{'data': [...]}}")
        for number, record in enumerate(records):
            if not isinstance(record, dict):
                raise BenchmarkError(f"{path}: record {number} is not a JSON object")
            yield f"{path}: record {number}", record


def record_image(value, root: Path, where: str, folders: Sequence[str] = ("",),
                 flat: bool = False) -> Union[Path, bytes, None]:
    """A record's image: the bytes of an embedded (parquet) image, or the first existing file of the
    name under ``root / folder`` for each of ``folders`` (with ``flat``, the file name alone is tried
    too: archives that unpack without the record's folder); None for a record without an image."""
    if value is None:
        return None
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path")
        if not value:
            raise BenchmarkError(f"{where}: the image has neither bytes nor a path")
    name = Path(str(value))
    names = (name, Path(name.name)) if flat else (name,)
    candidates = [Path(root) / folder / n for folder in folders for n in names]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise BenchmarkError(f"{where}: image {candidates[0]} does not exist")


def read_result(path: Path, items: List[EvalItem], skipped: Optional[Dict[str, int]] = None) -> ReadResult:
    """The questions read from ``path``, which must hold some, each id once (answers are keyed by it)."""
    if not items:
        raise BenchmarkError(f"{path}: no questions")
    seen = set()
    for item in items:
        if item.question_id in seen:
            raise BenchmarkError(f"{path}: question {item.question_id} appears twice")
        seen.add(item.question_id)
    return ReadResult(items, dict(skipped or {}))
