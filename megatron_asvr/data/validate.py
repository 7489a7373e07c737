"""The validation pass: every record comes out written (perhaps fixed), skipped or an error.

Each problem gets a :class:`~megatron_asvr.data.llava.Reason` and an
:class:`Outcome`; :class:`ValidationReport` counts them per source and per reason
and lists the records concerned (capped). ``assumed`` names a deviation from the
LLaVA format that was read one way (a numeric id, extra fields, a path written
otherwise, a tag placed as LLaVA places it); ``fixed`` problems leave the record in
(the loader decodes images by content and converts them to RGB); ``skipped``
records are left out and counted; ``error`` records fail the run after the pass
(``strict`` turns every skip into an error).
"""

import hashlib
import json
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
from PIL import Image

from megatron_asvr.config.tools import ValidationConfig
from megatron_asvr.data.llava import (
    RawRecord,
    Reason,
    RecordError,
    TokenizedSample,
    normalize_image_path,
    parse_record,
    record_id,
    record_source,
)
from megatron_asvr.tokenizers.templates import (
    GPT,
    HUMAN,
    IMAGE_PLACEHOLDER,
    IMAGE_TAG,
    ConversationTemplate,
    TokenizationMismatch,
    Turn,
    place_image_tags,
)
from megatron_asvr.tokenizers.text import TextTokenizer


class Outcome(str, Enum):
    """What happened to a record because of a problem."""

    ASSUMED = "assumed"
    FIXED = "fixed"
    SKIPPED = "skipped"
    ERROR = "error"


@dataclass(frozen=True)
class Problem:
    """One named problem of one record."""

    reason: Reason
    outcome: Outcome
    detail: str


@dataclass(frozen=True)
class RecordResult:
    """The verdict on one record: a sample to write, or None, and its problems."""

    file: str
    location: str
    id: str
    source: str
    sample: TokenizedSample | None
    problems: tuple[Problem, ...]


@dataclass(frozen=True)
class DuplicateCheck:
    """The main process's verdict on a record's id: nothing, a skip, or a rename."""

    problem: Problem | None = None
    new_id: str | None = None


class DuplicateIds:
    """Finds repeated ids; must see the records in input order (main process).

    A repeat with identical content is skipped; one with different content is
    kept under ``<id>#<k>``.
    """

    def __init__(self):
        self._seen: dict[str, tuple[bytes, str]] = {}

    def check(self, raw: RawRecord) -> DuplicateCheck:
        rid = record_id(raw.value)
        if rid is None:
            return DuplicateCheck()
        digest = hashlib.blake2b(json.dumps(raw.value, sort_keys=True).encode(), digest_size=16).digest()
        where = f"{Path(raw.file).name}{raw.location}"
        if rid not in self._seen:
            self._seen[rid] = (digest, where)
            return DuplicateCheck()
        first_digest, first_where = self._seen[rid]
        if digest == first_digest:
            return DuplicateCheck(Problem(Reason.DUPLICATE_ID, Outcome.SKIPPED, f"identical to {first_where}"))
        k = 2
        while f"{rid}#{k}" in self._seen:
            k += 1
        new_id = f"{rid}#{k}"
        self._seen[new_id] = (digest, where)
        detail = f"id also used by {first_where} for other content; renamed to {new_id}"
        return DuplicateCheck(Problem(Reason.DUPLICATE_ID, Outcome.FIXED, detail), new_id)


_FORMATS_BY_EXTENSION = {
    ".jpg": ("JPEG", "MPO"),
    ".jpeg": ("JPEG", "MPO"),
    ".png": ("PNG",),
    ".gif": ("GIF",),
    ".bmp": ("BMP",),
    ".webp": ("WEBP",),
    ".tif": ("TIFF",),
    ".tiff": ("TIFF",),
}
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def inspect_image(path: Path, name: str, config: ValidationConfig) -> tuple[tuple[int, int], list[Problem]]:
    """(width, height) of the image at ``path`` and the fixes it needs; raises :class:`RecordError`."""
    if not path.is_file():
        raise RecordError(Reason.MISSING_IMAGE, f"{name} not found under the image root")
    if path.stat().st_size == 0:
        raise RecordError(Reason.ZERO_BYTE_IMAGE, f"{name} is empty")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
        except Image.DecompressionBombError as e:
            raise RecordError(Reason.IMAGE_TOO_LARGE, f"{name}: {e}") from None
        except _DECODE_ERRORS as e:
            raise RecordError(Reason.UNDECODABLE_IMAGE, f"{name}: {e}") from None
        with image:
            (width, height), image_format, mode = image.size, image.format, image.mode
            if min(width, height) < config.min_image_side:
                raise RecordError(
                    Reason.IMAGE_TOO_SMALL, f"{name} is {width}x{height}, below {config.min_image_side} px"
                )
            if width * height > config.max_image_pixels:
                raise RecordError(
                    Reason.IMAGE_TOO_LARGE, f"{name} is {width}x{height}, above {config.max_image_pixels} pixels"
                )
            if config.verify_images:
                try:
                    if image_format == "JPEG":
                        image.draft(None, (max(1, width // 8), max(1, height // 8)))
                    image.load()
                except _DECODE_ERRORS as e:
                    raise RecordError(Reason.UNDECODABLE_IMAGE, f"{name}: {e}") from None
    fixes = []
    expected = _FORMATS_BY_EXTENSION.get(path.suffix.lower())
    if expected and image_format not in expected:
        fixes.append(
            Problem(Reason.FORMAT_MISMATCH, Outcome.FIXED, f"{name} holds {image_format} data (decoded by content)")
        )
    if mode != "RGB":
        fixes.append(Problem(Reason.CONVERTED_MODE, Outcome.FIXED, f"{name}: {mode} -> RGB"))
    return (width, height), fixes


class RecordValidator:
    """Checks, fixes and tokenizes one record; runs in the worker processes."""

    def __init__(self, config: ValidationConfig, template: ConversationTemplate, tokenizer: TextTokenizer):
        self.config = config
        self.template = template
        self.tokenizer = tokenizer

    def __call__(self, raw: RawRecord, duplicate: DuplicateCheck) -> RecordResult:
        rid = duplicate.new_id or record_id(raw.value) or f"{Path(raw.file).name}{raw.location}"
        fixes = [duplicate.problem] if duplicate.problem else []
        source = record_source(raw)
        try:
            if raw.error is not None:
                raise RecordError(Reason.MALFORMED_RECORD, raw.error)
            if duplicate.problem and duplicate.problem.outcome is Outcome.SKIPPED:
                raise RecordError(duplicate.problem.reason, duplicate.problem.detail)
            record = parse_record(raw.value)
            fixes.extend(Problem(reason, Outcome.ASSUMED, detail) for reason, detail in record.assumptions)
            if record.id is None:
                fixes.append(Problem(Reason.MISSING_ID, Outcome.FIXED, f"no id; named {rid}"))
            sample = self._sample(record.turns, record.images, rid, source, fixes)
        except RecordError as e:
            outcome = Outcome.ERROR if self._is_error(e.reason) else Outcome.SKIPPED
            return RecordResult(raw.file, raw.location, rid, source, None, (Problem(e.reason, outcome, e.detail),))
        return RecordResult(raw.file, raw.location, rid, source, sample, tuple(fixes))

    def _is_error(self, reason: Reason) -> bool:
        return self.config.strict or (reason is Reason.TOO_LONG and self.config.too_long == "error")

    def _sample(self, turns, images, rid, source, fixes) -> TokenizedSample:
        turns = self._ordered_turns(turns, fixes)
        for i, turn in enumerate(turns):
            if not turn.text.strip():
                raise RecordError(Reason.EMPTY_TURN, f"turn {i} ({turn.role}) is empty")
        for i, (turn, placed) in enumerate(zip(turns, place_image_tags(turns))):
            if turn.text != placed.text:
                fixes.append(Problem(Reason.IMAGE_TAG_MOVED, Outcome.ASSUMED,
                                     f"turn {i}: {IMAGE_TAG} put at the turn's start, the rest stripped, "
                                     "as LLaVA-1.5 does"))
        turns = self._tagged_turns(turns, len(images), fixes)
        unsupported = self.template.unsupported(turns, len(images))
        if unsupported:
            raise RecordError(Reason.UNSUPPORTED_BY_TEMPLATE, unsupported)
        paths = tuple(normalize_image_path(p) for p in images)
        fixes.extend(Problem(Reason.IMAGE_PATH_NORMALIZED, Outcome.ASSUMED, f"image path {p!r} read as {n!r}")
                     for p, n in zip(images, paths) if p != n)
        sizes = []
        for path in paths:
            size, image_fixes = inspect_image(self.config.image_root / path, path, self.config)
            sizes.append(size)
            fixes.extend(image_fixes)
        try:
            tokens = self.template.tokenize(place_image_tags(turns), self.tokenizer)
        except TokenizationMismatch as e:
            raise RecordError(Reason.TOKENIZATION_MISMATCH, f"{self.template.name}: {e}") from None
        input_ids, loss_mask, num_positions = self._fit_length(tokens.input_ids, tokens.loss_mask, sizes, fixes)
        return TokenizedSample(rid, source, input_ids, loss_mask, paths, tuple(sizes), num_positions)

    @staticmethod
    def _ordered_turns(turns: tuple[Turn, ...], fixes: list[Problem]) -> tuple[Turn, ...]:
        """human, gpt, human, gpt, ...; a leading gpt turn is dropped as LLaVA does."""
        if turns[0].role == GPT and len(turns) > 1:
            turns = turns[1:]
            fixes.append(Problem(Reason.ROLES_OUT_OF_ORDER, Outcome.FIXED, "leading gpt turn dropped"))
        for i, turn in enumerate(turns):
            expected = HUMAN if i % 2 == 0 else GPT
            if turn.role != expected:
                raise RecordError(Reason.ROLES_OUT_OF_ORDER, f"turn {i} is from {turn.role}, expected {expected}")
        if turns[-1].role != GPT:
            raise RecordError(Reason.ROLES_OUT_OF_ORDER, "the last turn is a question without an answer")
        return turns

    @staticmethod
    def _tagged_turns(turns: tuple[Turn, ...], num_images: int, fixes: list[Problem]) -> tuple[Turn, ...]:
        """Checks ``<image>`` tags against the images; untagged images go to the first question."""
        for i, turn in enumerate(turns):
            if turn.role == GPT and IMAGE_TAG in turn.text:
                raise RecordError(Reason.IMAGE_TAG_IN_ANSWER, f"turn {i} (gpt) holds {IMAGE_TAG}")
        num_tags = sum(turn.text.count(IMAGE_TAG) for turn in turns)
        if num_images and not num_tags:
            fixes.append(
                Problem(Reason.IMAGE_WITHOUT_TAG, Outcome.FIXED, f"{num_images} image(s) tagged at the first question")
            )
            first = Turn(HUMAN, IMAGE_TAG * num_images + turns[0].text)
            return (first,) + turns[1:]
        if num_tags != num_images:
            detail = f"{num_tags} {IMAGE_TAG} tag(s) for {num_images} image(s)"
            raise RecordError(Reason.IMAGE_TAG_COUNT_MISMATCH, detail)
        return turns

    def _fit_length(self, input_ids, loss_mask, sizes, fixes):
        """The sample within ``max_seq_length`` visual-expanded positions, by the too_long policy."""
        widths = np.ones(len(input_ids), dtype=np.int64)  # [n] positions each token becomes
        image_at = np.flatnonzero(input_ids == IMAGE_PLACEHOLDER)
        widths[image_at] = self.config.image_tokens  # a fixed-grid encoder: every image alike
        ends = np.cumsum(widths)  # [n]
        limit = self.config.max_seq_length
        if ends[-1] <= limit:
            return input_ids, loss_mask, int(ends[-1])
        too_long = f"{int(ends[-1])} positions, max_seq_length is {limit}"
        if self.config.too_long != "truncate":
            raise RecordError(Reason.TOO_LONG, too_long)
        keep = int(np.searchsorted(ends, limit, side="right"))
        if len(image_at) and image_at[-1] >= keep:
            raise RecordError(Reason.TOO_LONG, f"{too_long}; truncating would cut an image")
        if not loss_mask[:keep].any():
            raise RecordError(Reason.TOO_LONG, f"{too_long}; truncating would leave no answer")
        fixes.append(Problem(Reason.TOO_LONG, Outcome.FIXED, f"{too_long}; truncated to {int(ends[keep - 1])}"))
        return input_ids[:keep], loss_mask[:keep], int(ends[keep - 1])


class ValidationReport:
    """Counts per source and per reason, with the records concerned (at most ``id_list_cap`` per reason)."""

    def __init__(self, id_list_cap: int = 1000):
        self.id_list_cap = id_list_cap
        self.total = 0
        self.status = Counter()  # written / skipped / error
        self.by_source = defaultdict(Counter)
        self.by_reason = defaultdict(Counter)
        self.records = defaultdict(list)

    @property
    def skipped(self) -> int:
        return self.status["skipped"]

    @property
    def errors(self) -> int:
        return self.status["error"]

    def add(self, result: RecordResult) -> None:
        self.total += 1
        outcomes = {p.outcome for p in result.problems}
        status = (
            "written" if result.sample is not None else "error" if Outcome.ERROR in outcomes else "skipped"
        )
        self.status[status] += 1
        counts = self.by_source[result.source]
        counts["records"] += 1
        counts[status] += 1
        if result.sample is not None:
            for outcome in {Outcome.FIXED, Outcome.ASSUMED} & outcomes:
                counts[outcome.value] += 1
        details = defaultdict(list)
        for problem in result.problems:
            details[(problem.reason, problem.outcome)].append(problem.detail)
        for (reason, outcome), texts in details.items():
            self.by_reason[reason.value][outcome.value] += 1
            listed = self.records[reason.value]
            if len(listed) < self.id_list_cap:
                listed.append(
                    {
                        "id": result.id,
                        "file": result.file,
                        "location": result.location,
                        "outcome": outcome.value,
                        "detail": "; ".join(texts),
                    }
                )

    def to_dict(self) -> dict:
        """The JSON report."""
        by_reason = {}
        for reason in sorted(self.by_reason):
            counts = self.by_reason[reason]
            listed = self.records[reason]
            by_reason[reason] = {
                "count": sum(counts.values()),
                **{outcome.value: counts[outcome.value] for outcome in Outcome},
                "records": listed,
                "records_truncated": sum(counts.values()) > len(listed),
            }
        return {
            "total_records": self.total,
            "written": self.status["written"],
            "skipped": self.skipped,
            "errors": self.errors,
            "written_with_fixes": sum(c["fixed"] for c in self.by_source.values()),
            "written_with_assumptions": sum(c["assumed"] for c in self.by_source.values()),
            "skip_fraction": self.skipped / self.total if self.total else 0.0,
            "records_listed_per_reason": f"at most {self.id_list_cap}",
            "by_source": {
                source: {key: counts[key] for key in ("records", "written", "fixed", "assumed", "skipped", "error")}
                for source, counts in sorted(self.by_source.items())
            },
            "by_reason": by_reason,
        }
