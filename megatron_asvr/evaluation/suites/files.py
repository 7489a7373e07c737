"""Reading benchmark files with errors that name the file, the record and the problem."""

import json
from pathlib import Path
from typing import Any, Iterator, Tuple

from megatron_asvr.evaluation.items import BenchmarkError


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise BenchmarkError(f"{path}: cannot read: {err}") from err
    except ValueError as err:
        raise BenchmarkError(f"{path}: not valid JSON: {err}") from err


def read_jsonl(path: Path) -> Iterator[Tuple[int, dict]]:
    """(line number, record) of each non-empty line of a JSON-lines file."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise BenchmarkError(f"{path}: cannot read: {err}") from err
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            raise BenchmarkError(f"{path}:{number}: not valid JSON: {err}") from err
        if not isinstance(record, dict):
            raise BenchmarkError(f"{path}:{number}: a record must be a JSON object")
        yield number, record


def field(record: dict, name: str, where: str) -> Any:
    """``record[name]``, or an error naming the record and the missing field."""
    if name not in record:
        raise BenchmarkError(f"{where}: no {name!r} field (has {', '.join(sorted(record))})")
    return record[name]


def image_file(root: Path, name: str, where: str) -> Path:
    """``root / name``, which must be a file."""
    path = Path(root) / str(name)
    if not path.is_file():
        raise BenchmarkError(f"{where}: image {path} does not exist")
    return path
