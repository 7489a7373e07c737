"""AI2D (diagrams, option letter) and RealWorldQA (photos, option letter or a word or number), from
the parquet shards LLaVA-style evaluations read (lmms-lab/ai2d ``test-*.parquet``: question,
options, answer = the right option's index, image; xai-org/RealworldQA or lmms-lab/RealWorldQA
``test-*.parquet``: image, question, answer), or JSON / JSON lines of the same fields with an
image path.

AI2D gets LLaVA's letter prompt. A RealWorldQA question carries its options ("A. Left" lines) and
its own answer instruction ("Please answer directly with only the letter of the correct option and
nothing else." or "... with a single word or number."); it is asked verbatim, as the paper's
evaluation code (Cambrian-1) asks it. Letters are read with the rule of the other letter
benchmarks (suites/choice.py); a word or number answer must match after lower-casing and dropping
a final period (lmms-eval's rule).
"""

import re
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

from megatron_asvr.evaluation.items import OPTION_LETTERS, BenchmarkError, EvalItem, ReadResult, choice_prompt
from megatron_asvr.evaluation.suites.choice import answer_letter, choice_item, is_correct_choice, option_letter
from megatron_asvr.evaluation.suites.files import field
from megatron_asvr.evaluation.suites.records import read_records, read_result, record_image

SPLIT = "test"
_OPTION_LINE = re.compile(r"^([A-J])\.\s*(.*?)\s*$", re.MULTILINE)  # "B. Straight"


def read_ai2d(path: Path, image_root: Path) -> ReadResult:
    items = []
    for index, (where, record) in enumerate(read_records(path, split=SPLIT)):
        options = [str(option) for option in field(record, "options", where)]
        answer = field(record, "answer", where)  # the option's index, as a string
        letter = answer_letter(int(answer) if str(answer).strip().isdigit() else answer, options, where)
        items.append(choice_item(str(index), choice_prompt(str(field(record, "question", where)), options),
                                 record_image(field(record, "image", where), image_root, where), letter, options))
    return read_result(path, items)


def read_realworldqa(path: Path, image_root: Path) -> ReadResult:
    """Letter questions (the answer is one of the question's option letters) get category
    ``choice``; the others ``open``."""
    items = []
    for index, (where, record) in enumerate(read_records(path, split=SPLIT)):
        question = str(field(record, "question", where)).strip()
        answer = str(field(record, "answer", where)).strip()
        image = record_image(field(record, "image", where), image_root, where)
        lines = _OPTION_LINE.findall(question)
        letters = "".join(letter for letter, _ in lines)
        if len(answer) != 1 or answer not in letters:
            items.append(EvalItem(str(index), question, image, answer, "short", "open"))
            continue
        if letters != OPTION_LETTERS[: len(letters)]:
            raise BenchmarkError(f"{where}: options {letters!r} are not A, B, C, ... in order")
        items.append(choice_item(str(index), question, image, answer, [text for _, text in lines], "choice"))
    return read_result(path, items)


def _open_correct(answer: str, response: str) -> bool:
    return response.lower().strip().rstrip(".") == answer.lower()


def score_realworldqa(items: List[EvalItem], predictions: Dict[str, str]) -> Dict[str, float]:
    """``accuracy``, ``choice/accuracy``, ``open/accuracy`` and ``unparsed`` letter responses."""
    by_kind, unparsed = defaultdict(list), 0
    for item in items:
        response = predictions[item.question_id]
        if item.answer_type == "choice":
            unparsed += option_letter(response, "".join(item.choices), item.answer["options"]) is None
            by_kind[item.category].append(is_correct_choice(item, response))
        else:
            by_kind[item.category].append(_open_correct(item.answer, response))
    rights = [r for rs in by_kind.values() for r in rs]
    scores = {"accuracy": sum(rights) / len(rights), "unparsed": float(unparsed)}
    scores.update({f"{kind}/accuracy": sum(rs) / len(rs) for kind, rs in sorted(by_kind.items())})
    return scores
