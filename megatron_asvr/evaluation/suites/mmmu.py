"""MMMU-val: multiple-choice questions (LLaVA's letter prompt) and open questions (the short-answer
prompt), parsed and scored with MMMU's own rules (its ``eval_utils.py``: the option a response
names, the numbers and key phrases of an open response, and their match with the answer).

Images: a question carries up to seven (``<image 1>`` .. ``<image 7>`` in its text and options);
our model takes one image per sample, so a question gets its first image (``image_1``) and the
``<image n>`` tags are removed from the text, as the paper's evaluation code (Cambrian-1's
``mmmu_eval.py``) and MMMU's own LLaVA-1.5 script do. Questions with more than one image are
counted (``multi_image_questions``) and scored apart as well (``multi_image/accuracy``).

One departure: where MMMU's parser finds no option in a response it picks a random letter; here
the response is wrong and counted (``unparsed``), so that a score does not depend on a seed (the
random pick adds unparsed / options right answers in expectation).

Files: the parquet shards of MMMU/MMMU (a folder per subject holding ``validation-*.parquet``)
or of lmms-lab/MMMU; questions of other splits met on the way are skipped and counted.
"""

import ast
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from megatron_asvr.evaluation.items import (
    OPTION_LETTERS,
    BenchmarkError,
    EvalItem,
    ReadResult,
    choice_prompt,
    short_prompt,
)
from megatron_asvr.evaluation.suites.files import field
from megatron_asvr.evaluation.suites.records import read_records, read_result, record_image

SPLIT = "validation"
MAX_IMAGES = 7
DOMAINS = {  # MMMU's DOMAIN_CAT2SUB_CAT
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": ("Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
                            "Pharmacy", "Public_Health"),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": ("Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
                             "Energy_and_Power", "Materials", "Mechanical_Engineering"),
}
DOMAIN_OF = {subject: domain for domain, subjects in DOMAINS.items() for subject in subjects}
_IMAGE_TAG = re.compile(r"<image \d+>")
_ID = re.compile(r"^([a-z]+)_(.+)_\d+$")  # validation_Art_Theory_12
_EDGE_PUNCTUATION = (",", ".", "!", "?", ";", ":", "'")
_KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_NUMBERS = (
    re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b"),  # with thousands commas
    re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+"),  # scientific notation
    re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])"),  # plain
)


# --- MMMU's response rules ------------------------------------------------------------------------


def parse_choice(response: str, letters: Sequence[str], options: Sequence[str]) -> Optional[str]:
    """The option a response names (MMMU's ``parse_multi_choice_response``): "(B)", else " B " as a
    word, else (responses of more than five words) an option's text; of several, the last
    mentioned. None where there is none (MMMU picks one at random)."""
    for char in _EDGE_PUNCTUATION:
        response = response.strip(char)
    response = f" {response} "
    candidates = [letter for letter in letters if f"({letter})" in response]
    pattern = "({})" if candidates else " {} "
    if not candidates:
        candidates = [letter for letter in letters if f" {letter} " in response]
    by_text = not candidates and len(response.split()) > 5
    if by_text:
        candidates = [letter for letter, option in zip(letters, options) if option.lower() in response.lower()]
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    if by_text:
        text = dict(zip(letters, options))
        positions = [response.lower().rfind(text[letter].lower()) for letter in candidates]
    else:
        positions = [response.rfind(pattern.format(letter)) for letter in candidates]
    return candidates[max(range(len(candidates)), key=positions.__getitem__)]


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
        return True
    except ValueError:
        return False


def normalize_open(text: str) -> list:
    """MMMU's ``normalize_str``: a number rounded to 2 decimals, else the lower-cased text (a single
    character padded with a space on either side, so it does not match inside words)."""
    text = text.strip()
    if _is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    return [f" {text}", f"{text} "] if len(text) == 1 else [text]


def _key_responses(response: str) -> List[str]:
    """The tail after the last key phrase ("is ", "so ", "answer ", ... "=" in the last line) of
    each line: the shortest such tail per line, else the whole response."""
    response = response.strip().strip(".").lower()
    lines = re.split(r"\.\s(?=[A-Z])|\n", response)
    keys = []
    for index, line in enumerate(lines):
        indicators = _KEY_INDICATORS + (("=",) if index == len(lines) - 1 else ())
        shortest = None
        for indicator in indicators:
            if indicator in line:
                tail = line.split(indicator)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in _EDGE_PUNCTUATION:
            keys.append(shortest)
    return keys or [response]


def parse_open(response: str) -> list:
    """MMMU's ``parse_open_response``: the key phrases and every number in them, normalised."""
    keys = _key_responses(response)
    found = keys + [number for key in keys for pattern in _NUMBERS for number in pattern.findall(key)]
    return list({value for text in found for value in normalize_open(text)})


def is_correct_open(answers: Sequence[str], predicted: list) -> bool:
    """MMMU's ``eval_open``: a normalised answer is contained in a predicted phrase, or equals a
    predicted number."""
    golds = [value for answer in answers for value in normalize_open(answer)]
    for value in predicted:
        if isinstance(value, str):
            if any(isinstance(gold, str) and gold in value for gold in golds):
                return True
        elif value in golds:
            return True
    return False


# --- reading --------------------------------------------------------------------------------------


def _untagged(text: str) -> str:
    return _IMAGE_TAG.sub("", text).strip()


def _literal(value, where: str, what: str):
    """A field MMMU stores as a Python literal in a string ("['a', 'b']")."""
    if not isinstance(value, str):
        return value
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError) as err:
        raise BenchmarkError(f"{where}: {what} {value!r} is not a Python literal: {err}") from err


def _open_answers(value, where: str) -> List[str]:
    """An open question's answers: one string, or a list ("['24/7', '3.429']")."""
    text = str(value).strip()
    answers = _literal(text, where, "answer") if text.startswith("[") else value
    return [str(a) for a in answers] if isinstance(answers, (list, tuple)) else [str(answers)]


def _item(record: dict, where: str, image_root: Path) -> EvalItem:
    qid = str(field(record, "id", where))
    match = _ID.match(qid)
    if not match or match.group(2) not in DOMAIN_OF:
        raise BenchmarkError(f"{where}: id {qid!r} is not '<split>_<one of MMMU's 30 subjects>_<n>'")
    images = [record[f"image_{k}"] for k in range(1, MAX_IMAGES + 1) if record.get(f"image_{k}") is not None]
    image = record_image(images[0], image_root, where) if images else None
    question, answer = _untagged(str(field(record, "question", where))), field(record, "answer", where)
    kind = field(record, "question_type", where)
    if kind == "open":
        return EvalItem(qid, short_prompt(question), image, {"answers": _open_answers(answer, where),
                                                               "images": len(images)}, "short", match.group(2))
    if kind != "multiple-choice":
        raise BenchmarkError(f"{where}: question_type {kind!r} is neither 'multiple-choice' nor 'open'")
    options = _literal(field(record, "options", where), where, "options")
    if not isinstance(options, list) or not 2 <= len(options) <= len(OPTION_LETTERS):
        raise BenchmarkError(f"{where}: options must be a list of 2 to {len(OPTION_LETTERS)}, got {options!r}")
    options = [_untagged(str(option)) for option in options]
    letters = tuple(OPTION_LETTERS[: len(options)])
    if str(answer).strip() not in letters:
        raise BenchmarkError(f"{where}: answer {answer!r} is not one of the option letters {''.join(letters)}")
    return EvalItem(qid, choice_prompt(question, options), image,
                    {"letter": str(answer).strip(), "options": tuple(options), "images": len(images)}, "choice",
                    match.group(2), letters)


def read_mmmu(path: Path, image_root: Path) -> ReadResult:
    items, skipped = [], Counter()
    for where, record in read_records(path, split=SPLIT):
        split = str(record.get("id", "")).split("_")[0]
        if split != SPLIT:
            skipped[f"{split} question"] += 1
            continue
        items.append(_item(record, where, image_root))
    return read_result(path, items, skipped)


# --- scores ---------------------------------------------------------------------------------------


def score_mmmu(items: List[EvalItem], predictions: Dict[str, str]) -> Dict[str, float]:
    """``accuracy`` over all questions (MMMU's instance-level accuracy), ``<domain>/accuracy``,
    ``multi_image/accuracy`` with ``multi_image_questions``, and ``unparsed`` letter responses."""
    by_domain, multi, unparsed = defaultdict(list), [], 0
    for item in items:
        response = predictions[item.question_id]
        if item.answer_type == "choice":
            letter = parse_choice(response, item.choices, item.answer["options"])
            unparsed += letter is None
            right = letter == item.answer["letter"]
        else:
            right = is_correct_open(item.answer["answers"], parse_open(response))
        by_domain[DOMAIN_OF[item.category]].append(right)
        if item.answer["images"] > 1:
            multi.append(right)
    rights = [r for rs in by_domain.values() for r in rs]
    scores = {"accuracy": sum(rights) / len(rights), "unparsed": float(unparsed),
              "multi_image_questions": float(len(multi))}
    if multi:
        scores["multi_image/accuracy"] = sum(multi) / len(multi)
    scores.update({f"{domain}/accuracy": sum(rs) / len(rs) for domain, rs in sorted(by_domain.items())})
    return scores
