"""The generic JSON-lines benchmark: the demo's held-out ``eval.jsonl`` and letter / yes-no /
short-answer sets converted to the same shape.

One record per line::

    {"question_id": "q1", "image": "eval/000001.jpg",          # relative to the image root; optional
     "text": "<the whole prompt>"  or  "question": "...",      # "text" is used verbatim
     "options": ["cat", "dog"],                                # optional: a letter question
     "hint": "...",                                            # optional, before the question
     "answer": "B" | 1 | "dog" | "Yes" | "a word",
     "category": "color"}                                      # optional

With "question", the prompt is built with the paper's prompts: the options and the
letter prompt, or the short-answer prompt. A record with options is a letter
question; one whose answer is yes or no a yes/no question (POPE's rule reads the
response); any other a short answer (VQA-normalised exact match).

Beside the accuracy, two baselines per category (and over all questions): ``chance``,
the mean over its questions of 1 / options for a letter question and 1 / the
category's distinct gold answers otherwise; ``majority``, the accuracy of always
giving the category's most frequent gold answer.
"""

from collections import Counter, defaultdict
from statistics import fmean
from pathlib import Path
from typing import Dict, List

from megatron_asvr.evaluation.suites.choice import answer_letter, choice_item, is_correct_choice
from megatron_asvr.evaluation.suites.files import field, image_file, read_jsonl
from megatron_asvr.evaluation.suites.short_answer import normalize_vqa
from megatron_asvr.evaluation.suites.yes_no import pope_label
from megatron_asvr.evaluation.items import (
    YES_NO_CHOICES,
    BenchmarkError,
    EvalItem,
    ReadResult,
    choice_prompt,
    short_prompt,
)


def _prompt(record: dict, options: list, where: str) -> str:
    if "text" in record:
        return str(record["text"])
    question = str(field(record, "question", where))
    return choice_prompt(question, options, record.get("hint")) if options else short_prompt(question)


def read_jsonl_benchmark(path: Path, image_root: Path) -> ReadResult:
    items = []
    for number, record in read_jsonl(path):
        where = f"{path}:{number}"
        qid = str(field(record, "question_id", where))
        options = [str(o) for o in record.get("options") or []]
        if "text" not in record and "question" not in record:
            raise BenchmarkError(f"{where}: needs a 'text' (the whole prompt) or a 'question' field")
        prompt = _prompt(record, options, where)
        image = image_file(image_root, record["image"], where) if record.get("image") else None
        answer, category = field(record, "answer", where), str(record.get("category", ""))
        if options:
            items.append(choice_item(qid, prompt, image, answer_letter(answer, options, where), options, category))
        elif str(answer).strip().lower() in ("yes", "no"):
            items.append(EvalItem(qid, prompt, image, str(answer).strip().lower(), "yes_no", category, YES_NO_CHOICES))
        else:
            items.append(EvalItem(qid, prompt, image, str(answer), "short", category))
    if not items:
        raise BenchmarkError(f"{path}: no questions")
    return ReadResult(items, {})


def is_correct(item: EvalItem, response: str) -> bool:
    """A response to a generic item, by the item's answer type."""
    if item.answer_type == "choice":
        return is_correct_choice(item, response)
    if item.answer_type == "yes_no":
        return pope_label(response) == item.answer
    return normalize_vqa(response) == normalize_vqa(item.answer)


def gold_answer(item: EvalItem) -> str:
    """The gold answer as ``is_correct`` compares it: an option letter, yes / no, or a normalised word."""
    if item.answer_type == "choice":
        return item.answer["letter"]
    return item.answer if item.answer_type == "yes_no" else normalize_vqa(item.answer)


def _category_scores(items: List[EvalItem], predictions: Dict[str, str]) -> Dict[str, List[float]]:
    """One category's questions -> per-question ``accuracy``, ``chance`` and ``majority`` (0 / 1 or 1 / n)."""
    golds = [gold_answer(item) for item in items]
    open_answers = {gold for item, gold in zip(items, golds) if item.answer_type != "choice"}
    top = Counter(golds).most_common(1)[0][0]
    return {
        "accuracy": [float(is_correct(item, predictions[item.question_id])) for item in items],
        "chance": [1 / len(item.choices) if item.answer_type == "choice" else 1 / len(open_answers) for item in items],
        "majority": [float(gold == top) for gold in golds],
    }


def score_jsonl(items: List[EvalItem], predictions: Dict[str, str]) -> Dict[str, float]:
    """``accuracy``, ``chance`` and ``majority`` over all questions and as ``<category>/<name>``."""
    by_category = defaultdict(list)
    for item in items:
        by_category[item.category].append(item)
    overall, scores = defaultdict(list), {}
    for category, group in sorted(by_category.items()):
        for name, values in _category_scores(group, predictions).items():
            overall[name] += values
            if category:
                scores[f"{category}/{name}"] = fmean(values)
    return {**{name: fmean(values) for name, values in overall.items()}, **scores}
