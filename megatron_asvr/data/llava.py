"""LLaVA JSON records: reading the files, parsing one record, the tokenized sample.

A record is ``{"id", "image"?, "conversations": [{"from": "human"|"gpt", "value": str}, ...]}``
where ``image`` is a path relative to the image root. Files are a JSON list or JSON
Lines. Invalid UTF-8 bytes do not stop the reading: they reach the record as lone
surrogates, and that record alone is refused (``non_utf8_text``). Deviations that
still have one reading (a numeric id, a list of images, fields LLaVA does not have)
are read so, and each is named (``LlavaRecord.assumptions``).
"""

import json
import posixpath
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Iterator

import numpy as np

from megatron_asvr.tokenizers.templates import GPT, HUMAN, Turn


class Reason(str, Enum):
    """The name of a problem found in a record."""

    MALFORMED_RECORD = "malformed_record"
    MISSING_ID = "missing_id"
    NON_UTF8_TEXT = "non_utf8_text"
    DUPLICATE_ID = "duplicate_id"
    ROLES_OUT_OF_ORDER = "roles_out_of_order"
    EMPTY_TURN = "empty_turn"
    IMAGE_TAG_COUNT_MISMATCH = "image_tag_count_mismatch"
    IMAGE_WITHOUT_TAG = "image_without_tag"
    IMAGE_TAG_IN_ANSWER = "image_tag_in_answer"
    UNSUPPORTED_BY_TEMPLATE = "unsupported_by_template"
    PATH_ESCAPES_ROOT = "path_escapes_root"
    MISSING_IMAGE = "missing_image"
    ZERO_BYTE_IMAGE = "zero_byte_image"
    UNDECODABLE_IMAGE = "undecodable_image"
    FORMAT_MISMATCH = "format_mismatch"
    CONVERTED_MODE = "converted_mode"
    IMAGE_TOO_SMALL = "image_too_small"
    IMAGE_TOO_LARGE = "image_too_large"
    TOKENIZATION_MISMATCH = "tokenization_mismatch"
    TOO_LONG = "too_long"
    # Deviations from the LLaVA format that are read one way, and named (outcome "assumed").
    NUMERIC_ID = "numeric_id"
    IMAGE_LIST = "image_list"
    EMPTY_IMAGE_FIELD = "empty_image_field"
    UNKNOWN_FIELDS = "unknown_fields"
    IMAGE_PATH_NORMALIZED = "image_path_normalized"
    IMAGE_TAG_MOVED = "image_tag_moved"


class RecordError(ValueError):
    """A record that cannot be used; ``reason`` names the problem."""

    def __init__(self, reason: Reason, detail: str):
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


class DataFileError(ValueError):
    """An input file that cannot be read as LLaVA records at all."""


@dataclass(frozen=True)
class RawRecord:
    """One record as read from its file, before any checking."""

    file: str  # the input file, as given
    location: str  # "[12]" in a JSON list, "line 13" in JSON Lines
    value: object  # the parsed JSON value; None when `error` is set
    error: str | None = None  # why a JSON Lines line did not parse
    source: str | None = None  # the source name given to the file, if any


@dataclass(frozen=True)
class LlavaRecord:
    """A structurally valid record."""

    id: str | None  # None when the record has none
    images: tuple[str, ...]  # as written in the record
    turns: tuple[Turn, ...]
    assumptions: tuple[tuple[Reason, str], ...] = ()  # how it deviates from the format, read as said


RECORD_FIELDS = ("id", "image", "conversations")
MESSAGE_FIELDS = ("from", "value")


@dataclass(frozen=True)
class TokenizedSample:
    """A record ready for training: what a shard stores per sample."""

    id: str
    source: str
    input_ids: np.ndarray  # [n] int32, IMAGE_PLACEHOLDER (-200) where an image goes
    loss_mask: np.ndarray  # [n] uint8, 1 = supervised
    images: tuple[str, ...]  # paths relative to the image root
    image_sizes: tuple[tuple[int, int], ...]  # (width, height) per image
    num_positions: int  # sequence length once each image is expanded to its visual positions


_WHITESPACE = re.compile(r"[ \t\n\r]*")


_HEAD_BYTES = 1 << 16  # read to tell a JSON list from JSON Lines


def _decode_line(data: bytes) -> str:
    """UTF-8 text; invalid bytes become lone surrogates so that one bad record stays one."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="surrogateescape")


def _decode(data: bytes) -> str:
    """The text at a file's start: UTF-8 as :func:`_decode_line`, without a byte order mark."""
    return _decode_line(data).removeprefix("\ufeff")


def read_records(path: str | Path, source: str | None = None) -> Iterator[RawRecord]:
    """The records of a JSON list or JSON Lines file, in file order.

    A JSON Lines line that does not parse is yielded with ``error`` set; a JSON
    list that does not parse raises :class:`DataFileError` naming file, record and
    position. JSON Lines are read a line at a time (a 2M-record file is never held
    whole); a JSON list is read whole.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"{path}: data file not found")
    with open(path, "rb") as file:
        head = _decode(file.read(_HEAD_BYTES))
    if head.lstrip(" \t\n\r").startswith("["):
        text = _decode(path.read_bytes())
        yield from _read_json_list(path, text, _WHITESPACE.match(text).end() + 1, source)
    else:
        yield from _read_json_lines(path, source)


def _read_json_list(path: Path, text: str, pos: int, source: str | None) -> Iterator[RawRecord]:
    decoder = json.JSONDecoder()
    index = 0
    pos = _WHITESPACE.match(text, pos).end()
    if text.startswith("]", pos):
        return
    while True:
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataFileError(
                f"{path}: record [{index}]: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"
            ) from None
        yield RawRecord(str(path), f"[{index}]", value, source=source)
        index += 1
        pos = _WHITESPACE.match(text, pos).end()
        if text.startswith(",", pos):
            pos = _WHITESPACE.match(text, pos + 1).end()
        elif text.startswith("]", pos):
            break
        else:
            line = text.count("\n", 0, pos) + 1
            raise DataFileError(f"{path}: after record [{index - 1}]: expected ',' or ']' at line {line}")
    if _WHITESPACE.match(text, pos + 1).end() != len(text):
        raise DataFileError(f"{path}: unexpected text after the closing ']'")


def _read_json_lines(path: Path, source: str | None) -> Iterator[RawRecord]:
    with open(path, "rb") as file:
        for number, data in enumerate(file, start=1):
            line = _decode(data) if number == 1 else _decode_line(data)
            if not line.strip():
                continue
            try:
                value, error = json.loads(line), None
            except json.JSONDecodeError as e:
                value, error = None, f"invalid JSON at column {e.colno}: {e.msg}"
            yield RawRecord(str(path), f"line {number}", value, error, source)


def _check_utf8(value: object, where: str) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            shown = value.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
            raise RecordError(Reason.NON_UTF8_TEXT, f"{where} is not valid UTF-8: {shown[:80]!r}") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_utf8(key, where)
            _check_utf8(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_utf8(item, f"{where}[{i}]")


def _images(record: dict) -> tuple[str, ...]:
    image = record.get("image")
    if image is None:
        return ()
    images = (image,) if isinstance(image, str) else image
    if not isinstance(images, list | tuple) or not all(isinstance(p, str) and p for p in images):
        raise RecordError(Reason.MALFORMED_RECORD, "'image' must be a path or a list of paths")
    return tuple(images)


def record_id(value: object) -> str | None:
    """The record's ``id`` as a string (numbers are accepted), or None."""
    if isinstance(value, dict):
        rid = value.get("id")
        if isinstance(rid, (str, int)) and not isinstance(rid, bool) and str(rid) != "":
            return str(rid)
    return None


def parse_record(value: object) -> LlavaRecord:
    """Check the structure of one record; raises :class:`RecordError`."""
    if not isinstance(value, dict):
        raise RecordError(Reason.MALFORMED_RECORD, f"a record must be a JSON object, got {type(value).__name__}")
    _check_utf8(value, "record")
    images = _images(value)
    conversations = value.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise RecordError(Reason.MALFORMED_RECORD, "'conversations' must be a non-empty list")
    turns = []
    for i, message in enumerate(conversations):
        if not isinstance(message, dict) or not isinstance(message.get("value"), str):
            raise RecordError(Reason.MALFORMED_RECORD, f"conversations[{i}] needs a string 'value'")
        if message.get("from") not in (HUMAN, GPT):
            role = message.get("from")
            raise RecordError(Reason.MALFORMED_RECORD, f"conversations[{i}]: 'from' must be human or gpt, got {role!r}")
        turns.append(Turn(message["from"], message["value"]))
    return LlavaRecord(record_id(value), images, tuple(turns), _assumptions(value))


def _assumptions(record: dict) -> tuple[tuple[Reason, str], ...]:
    """How a record that parses deviates from the LLaVA format, and how it was read."""
    found = []
    rid = record.get("id")
    if isinstance(rid, int) and not isinstance(rid, bool):
        found.append((Reason.NUMERIC_ID, f"id {rid} is a number: read as the string {str(rid)!r}"))
    image = record.get("image")
    if "image" in record and not image:
        found.append((Reason.EMPTY_IMAGE_FIELD, f"'image' is {json.dumps(image)}: read as a text-only record"))
    elif isinstance(image, list):
        found.append((Reason.IMAGE_LIST, f"'image' is a list of {len(image)} path(s): read as the record's "
                                         f"images, in order"))
    unknown = sorted(set(record) - set(RECORD_FIELDS))
    if unknown:
        found.append((Reason.UNKNOWN_FIELDS, f"fields {unknown} ignored"))
    for i, message in enumerate(record["conversations"]):
        extra = sorted(set(message) - set(MESSAGE_FIELDS))
        if extra:
            found.append((Reason.UNKNOWN_FIELDS, f"conversations[{i}]: fields {extra} ignored"))
    return tuple(found)


def normalize_image_path(path: str) -> str:
    """``path`` normalised and relative to the image root; raises ``path_escapes_root``."""
    normalized = posixpath.normpath(path.replace("\\", "/"))
    if posixpath.isabs(normalized) or normalized == ".." or normalized.startswith("../"):
        raise RecordError(Reason.PATH_ESCAPES_ROOT, f"image path {path!r} leaves the image root")
    return normalized


def record_source(raw: RawRecord) -> str:
    """The source a record is counted under.

    The name given to its file if any; else ``text`` for a text-only record; else the
    top folder of its first image (``coco``, ``gqa``, ``ocr_vqa``, ``textvqa``, ``vg``
    in the 665K mix), or the file's stem when the image sits at the root (or outside
    it); ``unknown`` when the record's ``image`` field cannot be read.
    """
    if raw.source is not None:
        return raw.source
    if not isinstance(raw.value, dict):
        return "unknown"
    try:
        images = _images(raw.value)
    except RecordError:
        return "unknown"
    if not images:
        return "text"
    first = posixpath.normpath(images[0].replace("\\", "/"))
    if "/" not in first or posixpath.isabs(first) or first.startswith(".."):
        return Path(raw.file).stem
    return first.split("/", 1)[0]
