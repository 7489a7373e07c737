"""Short-answer benchmarks: TextVQA (VQA accuracy over ten human answers after the VQA / EvalAI
answer normalisation) and GQA (exact match after LLaVA's normalisation), and the normalisers.
"""

import re
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Sequence

from megatron_asvr.evaluation.items import BenchmarkError, EvalItem, ReadResult, short_prompt
from megatron_asvr.evaluation.suites.files import field, image_file, read_json

# The VQA evaluation's normalisation tables (VQA-v2 vqaEval.py / EvalAI's answer processor).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # a period not followed by a digit
_DIGIT_COMMA = re.compile(r"(?<=\d)(,)+(?=\d)")
_PERIOD_LIMIT = re.UNICODE  # the reference passes re.UNICODE (32) as sub()'s count: at most 32 periods go


def _punctuation(text: str) -> str:
    out = text
    for mark in PUNCTUATION:
        if mark + " " in text or " " + mark in text or _DIGIT_COMMA.search(text):
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_PERIOD_LIMIT)


def normalize_vqa(answer: str) -> str:
    """The VQA answer normalisation (as EvalAI's processor, which TextVQA's evaluator uses):
    lower-case, punctuation, number words to digits, articles dropped, contractions."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = _punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy: the mean over each human answer left out of min(1, matches among the rest / 3)."""
    predicted = normalize_vqa(prediction)
    gold = [normalize_vqa(a) for a in answers]
    scores = [min(1.0, sum(g == predicted for j, g in enumerate(gold) if j != i) / 3) for i in range(len(gold))]
    return sum(scores) / len(scores)


def normalize_gqa(answer: str) -> str:
    """LLaVA's GQA conversion: trailing periods removed, lower case (surrounding space dropped)."""
    return answer.strip().rstrip(".").lower()


def read_textvqa(path: Path, image_root: Path) -> ReadResult:
    """TextVQA_0.5.1_val.json ({"data": [{question_id, question, image_id, answers}]}); images
    ``image_root / <image_id>.jpg``. The prompt carries no OCR reference tokens."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise BenchmarkError(f"{path}: expected TextVQA's {{'data': [...]}}")
    items = []
    for number, record in enumerate(data["data"]):
        where = f"{path}: data[{number}]"
        answers = field(record, "answers", where)
        if not answers:
            raise BenchmarkError(f"{where}: no answers: only sets with answers (val) can be scored locally")
        items.append(EvalItem(
            str(field(record, "question_id", where)), short_prompt(field(record, "question", where)),
            image_file(image_root, f"{field(record, 'image_id', where)}.jpg", where), list(answers), "short",
        ))
    return ReadResult(items, {})


def score_textvqa(items: List[EvalItem], predictions: Dict[str, str]) -> Dict[str, float]:
    return {"accuracy": sum(vqa_accuracy(predictions[i.question_id], i.answer) for i in items) / len(items)}


def read_gqa(path: Path, image_root: Path) -> ReadResult:
    """GQA's {question_id: {imageId, question, answer, types}} (testdev_balanced_questions.json);
    images ``image_root / <imageId>.jpg``; the category is the structural type."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise BenchmarkError(f"{path}: expected GQA's {{question_id: {{...}}}}")
    items = []
    for qid, record in data.items():
        where = f"{path}: question {qid}"
        items.append(EvalItem(
            str(qid), short_prompt(field(record, "question", where)),
            image_file(image_root, f"{field(record, 'imageId', where)}.jpg", where),
            str(field(record, "answer", where)), "short", category=record.get("types", {}).get("structural", ""),
        ))
    return ReadResult(items, {})


def score_gqa(items: List[EvalItem], predictions: Dict[str, str]) -> Dict[str, float]:
    """``accuracy`` and ``<structural type>/accuracy``."""
    by_type = defaultdict(list)
    for item in items:
        by_type[item.category].append(normalize_gqa(predictions[item.question_id]) == item.answer)
    rights = [r for rs in by_type.values() for r in rs]
    scores = {"accuracy": sum(rights) / len(rights)}
    scores.update({f"{t}/accuracy": sum(rs) / len(rs) for t, rs in sorted(by_type.items()) if t})
    return scores
