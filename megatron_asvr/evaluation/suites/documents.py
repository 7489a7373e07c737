"""Document, chart and OCR benchmarks, answered in a word or phrase and scored as their authors
score them: DocVQA (ANLS, the RRC scorer), ChartQA (relaxed accuracy, pix2struct's rule) and
OCRBench (answers found in the response, counted per category out of 1,000).

Files: DocVQA ``val_v1.0.json`` (RRC; images ``<image root>/documents/...``, or flat) or the
``DocVQA/validation-*.parquet`` shards of lmms-lab/DocVQA; ChartQA's ``test`` folder (``test_human.json``,
``test_augmented.json``, ``png/``), one of those files, or lmms-lab/ChartQA's ``test-*.parquet``;
OCRBench's ``OCRBench.json`` (images under the image root or its ``OCRBench_Images`` folder) or
echo840/OCRBench's parquet. Every question gets the short-answer prompt.
"""

from collections import Counter, defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from megatron_asvr.evaluation.items import BenchmarkError, EvalItem, ReadResult, short_prompt
from megatron_asvr.evaluation.suites.files import field
from megatron_asvr.evaluation.suites.records import read_records, read_result, record_image

ANLS_THRESHOLD = 0.5
RELAXED_TOLERANCE = 0.05  # ChartQA: a number within 5% of the gold one is right
CHARTQA_SPLITS = ("human", "augmented")
OCRBENCH_RECOGNITION = ("Regular Text Recognition", "Irregular Text Recognition", "Artistic Text Recognition",
                        "Handwriting Recognition", "Digit String Recognition", "Non-Semantic Text Recognition")
OCRBENCH_CATEGORIES = OCRBENCH_RECOGNITION + ("Scene Text-centric VQA", "Doc-oriented VQA",
                                              "Key Information Extraction",
                                              "Handwritten Mathematical Expression Recognition")
OCRBENCH_RECOGNITION_GROUP = "Text Recognition"  # the six recognition categories, 300 of the 1,000
OCRBENCH_HME = "HME100k"  # handwritten formulas: compared with every space removed, case kept
OCRBENCH_IMAGES = "OCRBench_Images"  # the images' archive, under the image root or beside the JSON


def levenshtein(a: str, b: str) -> int:
    """Edit distance: single-character insertions, deletions and substitutions."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """The RRC scorer's (DocVQA, InfographicVQA) question score: 1 - NL to the closest answer, NL the
    edit distance of the lower-cased, whitespace-collapsed strings over the longer one's length as
    given; a score below ``threshold`` is 0 (exactly 0.5 is kept)."""
    predicted = " ".join(prediction.strip().lower().split())
    distances = []
    for answer in answers:
        gold = " ".join(answer.strip().lower().split())
        length = max(len(answer.upper()), len(prediction.upper()))  # the scorer's raw lengths
        distances.append(levenshtein(gold, predicted) / length if length else 0.0)
    score = 1.0 - min(distances)
    return score if score >= threshold else 0.0


def _to_float(text: str) -> Optional[float]:
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_correct(prediction: str, target: str, tolerance: float = RELAXED_TOLERANCE) -> bool:
    """ChartQA's relaxed accuracy (pix2struct): when both parse as numbers ("12%" as 0.12) the
    prediction may be off by ``tolerance`` of the target; a target of 0 or a text answer needs a
    case-insensitive exact match."""
    predicted, gold = _to_float(prediction), _to_float(target)
    if predicted is not None and gold:
        return abs(predicted - gold) / abs(gold) <= tolerance
    return prediction.lower() == target.lower()


def ocrbench_correct(prediction: str, answers: Sequence[str], dataset: str) -> bool:
    """OCRBench's rule: some answer appears in the response; lower-cased, newlines as spaces, or, for
    HME100k formulas, with every space removed and case kept."""
    if dataset == OCRBENCH_HME:
        def norm(text):
            return text.strip().replace("\n", " ").replace(" ", "")
    else:
        def norm(text):
            return text.lower().strip().replace("\n", " ")
    return any(norm(answer) in norm(prediction) for answer in answers)


def _answers(value, where: str) -> List[str]:
    answers = [value] if isinstance(value, str) else list(value or [])
    if not answers:
        raise BenchmarkError(f"{where}: no answers: only sets with answers can be scored locally")
    return [str(a) for a in answers]


# --- DocVQA ---------------------------------------------------------------------------------------


def read_docvqa(path: Path, image_root: Path) -> ReadResult:
    """RRC records (questionId, question, image, answers) from the JSON or the parquet shards."""
    items = []
    for where, record in read_records(path, split="validation"):
        answers = _answers(record.get("answers"), where)
        image = record_image(field(record, "image", where), image_root, where, flat=True)
        items.append(EvalItem(str(field(record, "questionId", where)),
                              short_prompt(str(field(record, "question", where))), image, answers, "short"))
    return read_result(path, items)


def score_docvqa(items: List[EvalItem], predictions: Dict[str, str]) -> Dict[str, float]:
    return {"anls": sum(anls(predictions[i.question_id], i.answer) for i in items) / len(items)}


# --- ChartQA --------------------------------------------------------------------------------------


def _chartqa_split(text: str, where: str) -> str:
    """"human" or "augmented" from a file stem (test_human) or lmms-lab's type (human_test)."""
    for name in CHARTQA_SPLITS:
        if name in text:
            return name
    raise BenchmarkError(f"{where}: cannot tell the split (human or augmented) from {text!r}")


def _chartqa_files(path: Path) -> list:
    """The release's two test files in a folder (``test_human.json``, ``test_augmented.json``), else
    the path itself (one file, or parquet shards)."""
    path = Path(path)
    release = [path / f"test_{split}.json" for split in CHARTQA_SPLITS] if path.is_dir() else []
    return [file for file in release if file.is_file()] or [path]


def read_chartqa(path: Path, image_root: Path) -> ReadResult:
    """Release records (imgname, query, label; the split from the file name; images in ``png/``)
    or lmms-lab rows (type, question, answer, image). Question ids are ``<split>/<index in it>``."""
    items, counts = [], Counter()
    for source in _chartqa_files(path):
        for where, record in read_records(source, split="test"):
            if "query" in record:
                question, answer = record["query"], field(record, "label", where)
                image, split = field(record, "imgname", where), _chartqa_split(source.stem, where)
            else:
                question, answer = field(record, "question", where), field(record, "answer", where)
                image, split = field(record, "image", where), _chartqa_split(str(field(record, "type", where)), where)
            items.append(EvalItem(f"{split}/{counts[split]}", short_prompt(str(question)),
                                  record_image(image, image_root, where, folders=("png", "")), str(answer), "short",
                                  category=split))
            counts[split] += 1
    return read_result(path, items)


def score_chartqa(items: List[EvalItem], predictions: Dict[str, str]) -> Dict[str, float]:
    """``relaxed_accuracy`` over all questions and ``<split>/relaxed_accuracy``."""
    by_split = defaultdict(list)
    for item in items:
        by_split[item.category].append(relaxed_correct(predictions[item.question_id], item.answer))
    rights = [r for rs in by_split.values() for r in rs]
    scores = {"relaxed_accuracy": sum(rights) / len(rights)}
    scores.update({f"{split}/relaxed_accuracy": sum(rs) / len(rs) for split, rs in sorted(by_split.items())})
    return scores


# --- OCRBench -------------------------------------------------------------------------------------


def read_ocrbench(path: Path, image_root: Path) -> ReadResult:
    """OCRBench.json records (dataset_name, image_path, question, answers, type) or echo840's rows
    (dataset, image, question, answer, question_type); question ids are the record's position (the
    file's own ``id`` repeats)."""
    items = []
    for index, (where, record) in enumerate(read_records(path, split="test")):
        parquet = "question_type" in record
        category = str(field(record, "question_type" if parquet else "type", where))
        if category not in OCRBENCH_CATEGORIES:
            raise BenchmarkError(f"{where}: unknown OCRBench category {category!r}")
        answers = _answers(field(record, "answer" if parquet else "answers", where), where)
        dataset = str(field(record, "dataset" if parquet else "dataset_name", where))
        image = record_image(field(record, "image" if parquet else "image_path", where), image_root, where,
                             folders=("", OCRBENCH_IMAGES))
        items.append(EvalItem(str(index), short_prompt(str(field(record, "question", where))), image,
                              {"answers": answers, "dataset": dataset}, "short", category))
    return read_result(path, items)


def score_ocrbench(items: List[EvalItem], predictions: Dict[str, str]) -> Dict[str, float]:
    """``total`` right answers (out of 1,000 on the full set), ``accuracy`` (total / questions),
    ``<category>/count`` and the six recognition categories' sum as ``Text Recognition/count``."""
    counts = Counter({item.category: 0 for item in items})
    for item in items:
        counts[item.category] += ocrbench_correct(predictions[item.question_id], item.answer["answers"],
                                                  item.answer["dataset"])
    scores = {"total": float(sum(counts.values())), "accuracy": sum(counts.values()) / len(items)}
    recognition = [c for c in OCRBENCH_RECOGNITION if c in counts]
    if recognition:
        scores[f"{OCRBENCH_RECOGNITION_GROUP}/count"] = float(sum(counts[c] for c in recognition))
    scores.update({f"{c}/count": float(counts[c]) for c in OCRBENCH_CATEGORIES if c in counts})
    return scores
