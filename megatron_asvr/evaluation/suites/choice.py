"""Multiple-choice letter benchmarks: MMBench-dev (TSV with embedded images), SEED-Bench (image
questions), MMVP (Questions.csv; pair accuracy), and the letter rule they share.

A response counts as the letter it starts with when that letter is one of the
options and is followed by nothing, ".", ")", ":" or "," ("B", "B.", "(B) dog");
else as the option whose text it repeats (case and a final period ignored);
else it is unparsed, which is wrong. MMBench is scored in one pass (no circular
option shuffling).
"""

import base64
import binascii
import csv
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from megatron_asvr.evaluation.items import OPTION_LETTERS, BenchmarkError, EvalItem, ReadResult, choice_prompt
from megatron_asvr.evaluation.suites.files import field, image_file, read_json

_LEADING_LETTER = re.compile(r"\(?([A-J])(?:[.):,]|\s*$)")
_MMVP_OPTION = re.compile(r"\(([a-z])\)\s*(.*?)\s*(?=\([a-z]\)|$)")
MMVP_IMAGES = "MMVP Images"


def option_letter(response: str, letters: str, options: Sequence[str] = ()) -> Optional[str]:
    """The option letter a response names, or None (see the module docstring)."""
    text = response.strip()
    match = _LEADING_LETTER.match(text)
    if match and match.group(1) in letters:
        return match.group(1)
    plain = text.rstrip(".").strip().lower()
    for letter, option in zip(letters, options):
        if plain == str(option).strip().lower():
            return letter
    return None


def answer_letter(value, options: Sequence[str], where: str) -> str:
    """A ground-truth answer given as a letter, an option index or an option's text -> its letter."""
    letters = OPTION_LETTERS[: len(options)]
    if isinstance(value, int) and 0 <= value < len(options):
        return letters[value]
    text = str(value).strip()
    if len(text) == 1 and text.upper() in letters:
        return text.upper()
    if text in options:
        return letters[list(options).index(text)]
    raise BenchmarkError(f"{where}: answer {value!r} is not an option letter, index or text of {list(options)}")


def choice_item(question_id: str, prompt: str, image, answer: str, options: Sequence[str], category: str = "",
                group: str = "") -> EvalItem:
    letters = tuple(OPTION_LETTERS[: len(options)])
    return EvalItem(question_id, prompt, image, {"letter": answer, "options": tuple(options)}, "choice",
                    category, letters, group)


def is_correct_choice(item: EvalItem, response: str) -> bool:
    letters = "".join(item.choices)
    return option_letter(response, letters, item.answer["options"]) == item.answer["letter"]


# --- MMBench --------------------------------------------------------------------------------------


def _is_none(value: Optional[str]) -> bool:
    """LLaVA's missing-cell test (pandas reads an empty TSV cell as NaN)."""
    return value is None or value.strip() == "" or value.strip().lower() in ("nan", "none")


def read_mmbench(path: Path, image_root: Optional[Path] = None) -> ReadResult:
    """MMBench TSV (index, question, hint, A.., answer, category, image as base64), as LLaVA's
    ``model_vqa_mmbench``: options up to the first empty one, the hint before the question."""
    path = Path(path)
    csv.field_size_limit(sys.maxsize)  # base64 images are long cells
    items = []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    except (OSError, csv.Error) as err:
        raise BenchmarkError(f"{path}: cannot read the TSV: {err}") from err
    for number, row in enumerate(rows, 2):
        where = f"{path}:{number}"
        if _is_none(row.get("answer")):
            raise BenchmarkError(f"{where}: no answer: only sets with answers (MMBench dev) can be scored locally")
        options = []
        for letter in OPTION_LETTERS:
            if _is_none(row.get(letter)):
                break
            options.append(row[letter])
        try:
            image = base64.b64decode(field(row, "image", where), validate=True)
        except (binascii.Error, ValueError) as err:
            raise BenchmarkError(f"{where}: the image cell is not base64: {err}") from err
        hint = None if _is_none(row.get("hint")) else row["hint"]
        prompt = choice_prompt(field(row, "question", where), options, hint)
        items.append(choice_item(str(field(row, "index", where)), prompt, image,
                                 answer_letter(row["answer"], options, where), options, row.get("category") or ""))
    return ReadResult(items, {})


# --- SEED-Bench -----------------------------------------------------------------------------------


def read_seed(path: Path, image_root: Path) -> ReadResult:
    """SEED-Bench.json ({"questions": [...], "question_type": {name: id}}): the image questions;
    video questions are skipped and counted. Images are ``image_root / data_id``."""
    data = read_json(path)
    if not isinstance(data, dict) or "questions" not in data:
        raise BenchmarkError(f"{path}: expected SEED-Bench's {{'questions': [...], 'question_type': {{...}}}}")
    type_names = {v: k for k, v in data.get("question_type", {}).items()}
    items, skipped = [], defaultdict(int)
    for number, record in enumerate(data["questions"]):
        where = f"{path}: questions[{number}]"
        if record.get("data_type", "image") != "image":
            skipped[f"{record.get('data_type')} question"] += 1
            continue
        options = [field(record, f"choice_{c}", where) for c in "abcd"]
        items.append(choice_item(
            str(field(record, "question_id", where)), choice_prompt(field(record, "question", where), options),
            image_file(image_root, field(record, "data_id", where), where),
            answer_letter(field(record, "answer", where), options, where), options,
            type_names.get(record.get("question_type_id"), str(record.get("question_type_id", ""))),
        ))
    return ReadResult(items, dict(skipped))


# --- MMVP -----------------------------------------------------------------------------------------


def read_mmvp(path: Path, image_root: Optional[Path] = None) -> ReadResult:
    """MMVP's Questions.csv (Index, Question, Options "(a) .. (b) ..", Correct Answer "(a)");
    image ``<Index>.jpg`` in ``image_root`` (default: "MMVP Images" beside the CSV).
    Questions 2k-1 and 2k form pair k."""
    path = Path(path)
    root = Path(image_root) if image_root else path.parent / MMVP_IMAGES
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error) as err:
        raise BenchmarkError(f"{path}: cannot read the CSV: {err}") from err
    items = []
    for number, row in enumerate(rows, 2):
        where = f"{path}:{number}"
        row = {k.strip(): v for k, v in row.items() if k}
        index = int(field(row, "Index", where))
        options = [text for _, text in _MMVP_OPTION.findall(field(row, "Options", where).strip())]
        if len(options) < 2:
            raise BenchmarkError(f"{where}: options {row['Options']!r} are not '(a) .. (b) ..'")
        answer = field(row, "Correct Answer", where).strip().strip("()")
        items.append(choice_item(
            str(index), choice_prompt(field(row, "Question", where), options),
            image_file(root, f"{index}.jpg", where), answer_letter(answer, options, where), options,
            group=str((index + 1) // 2),
        ))
    return ReadResult(items, {})


# --- scores ---------------------------------------------------------------------------------------


def score_choice(items: List[EvalItem], predictions: Dict[str, str]) -> Dict[str, float]:
    """``accuracy``, ``<category>/accuracy`` and ``unparsed`` (responses naming no option)."""
    by_category, unparsed = defaultdict(list), 0
    for item in items:
        response = predictions[item.question_id]
        unparsed += option_letter(response, "".join(item.choices), item.answer["options"]) is None
        by_category[item.category].append(is_correct_choice(item, response))
    rights = [r for rs in by_category.values() for r in rs]
    scores = {"accuracy": sum(rights) / len(rights), "unparsed": float(unparsed)}
    if len(by_category) > 1:
        scores.update({f"{c}/accuracy": sum(rs) / len(rs) for c, rs in sorted(by_category.items())})
    return scores


def score_mmvp(items: List[EvalItem], predictions: Dict[str, str]) -> Dict[str, float]:
    """MMVP's ``pair_accuracy`` (both questions of a pair right) beside the per-question scores."""
    pairs = defaultdict(list)
    for item in items:
        pairs[item.group].append(is_correct_choice(item, predictions[item.question_id]))
    return {**score_choice(items, predictions), "pair_accuracy": sum(all(p) for p in pairs.values()) / len(pairs)}
