"""Yes/no benchmarks: POPE (accuracy, precision, recall, F1, yes-ratio per split) and MME
(accuracy and accuracy+ per subtask; perception and cognition totals).

Both parse free-form answers as their reference scripts do: POPE as LLaVA's
``eval_pope.py`` (first sentence; "no" / "not" / "No" as a word means no, anything
else yes), MME as its ``calculation.py`` (lower-cased; "yes" or "no" exactly, else
the first four characters decide; neither is "other", always wrong).
"""

from collections import defaultdict
from pathlib import Path
from typing import Dict, List

from megatron_asvr.evaluation.items import YES_NO_CHOICES, BenchmarkError, EvalItem, ReadResult, short_prompt
from megatron_asvr.evaluation.suites.files import field, image_file, read_jsonl

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
MME_IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")
MME_SPLIT_LAYOUT = ("images", "questions_answers_YN")  # artwork, celebrity, landmark, posters, scene


def pope_label(text: str) -> str:
    """LLaVA's POPE rule: "no" when the first sentence holds the word No / no / not, else "yes"."""
    first = text.split(".")[0].replace(",", "")
    words = first.split(" ")
    return "no" if any(w in words for w in ("No", "not", "no")) else "yes"


def mme_label(text: str) -> str:
    """MME's rule: "yes" / "no" exactly, else by the first four characters, else "other"."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def _yes_no(value: str, where: str) -> str:
    label = str(value).strip().lower()
    if label not in ("yes", "no"):
        raise BenchmarkError(f"{where}: the answer must be yes or no, got {value!r}")
    return label


# --- POPE -----------------------------------------------------------------------------------------


def read_pope(path: Path, image_root: Path) -> ReadResult:
    """POPE's files (``coco_pope_{adversarial,popular,random}.json``, JSON lines of question_id,
    image, text, label): one file, or a directory of them. The split is the record's
    ``category`` or the file name's last ``_`` part."""
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl")) if path.is_dir() else [path]
    if not files:
        raise BenchmarkError(f"{path}: no POPE .json / .jsonl files in this directory")
    items = []
    for file in files:
        for number, record in read_jsonl(file):
            where = f"{file}:{number}"
            split = str(record.get("category") or file.stem.rsplit("_", 1)[-1])
            items.append(EvalItem(
                question_id=f"{split}/{field(record, 'question_id', where)}",
                prompt=short_prompt(str(field(record, "text", where))),
                image=image_file(image_root, field(record, "image", where), where),
                answer=_yes_no(field(record, "label", where), where),
                answer_type="yes_no", category=split, choices=YES_NO_CHOICES,
            ))
    return ReadResult(items, {})


def binary_metrics(labels: List[str], predictions: List[str]) -> Dict[str, float]:
    """POPE's numbers with "yes" as the positive class."""
    tp = sum(p == "yes" and t == "yes" for p, t in zip(predictions, labels))
    fp = sum(p == "yes" and t == "no" for p, t in zip(predictions, labels))
    tn = sum(p == "no" and t == "no" for p, t in zip(predictions, labels))
    fn = sum(p == "no" and t == "yes" for p, t in zip(predictions, labels))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": (tp + tn) / len(labels),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": (tp + fp) / len(labels),
    }


def score_pope(items: List[EvalItem], predictions: Dict[str, str]) -> Dict[str, float]:
    """Per split ``<split>/<metric>``, and their means over the splits (``f1``, ``accuracy``, ...)."""
    by_split = defaultdict(list)
    for item in items:
        by_split[item.category].append((item.answer, pope_label(predictions[item.question_id])))
    scores = {}
    for split, pairs in sorted(by_split.items()):
        for name, value in binary_metrics(*map(list, zip(*pairs))).items():
            scores[f"{split}/{name}"] = value
    for name in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
        scores[name] = sum(scores[f"{s}/{name}"] for s in by_split) / len(by_split)
    return scores


# --- MME ------------------------------------------------------------------------------------------


def _mme_image(directory: Path, stem: str, where: str) -> Path:
    for suffix in MME_IMAGE_SUFFIXES:
        if (directory / (stem + suffix)).is_file():
            return directory / (stem + suffix)
    raise BenchmarkError(f"{where}: no image {stem}{{{','.join(MME_IMAGE_SUFFIXES)}}} in {directory}")


def read_mme(path: Path, image_root: Path = None) -> ReadResult:
    """MME_Benchmark_release_version: one directory per subtask, each question file
    (``<image>.txt``, lines "question<TAB>Yes|No") beside its image, or in
    ``questions_answers_YN/`` with the image in ``images/``. Subtasks that are not
    there are reported missing by the scorer's totals."""
    root = Path(path)
    if not root.is_dir():
        raise BenchmarkError(f"{root}: MME is read from its release directory (one folder per subtask)")
    items = []
    for task in MME_PERCEPTION + MME_COGNITION:
        task_dir = root / task
        if not task_dir.is_dir():
            continue
        split = all((task_dir / d).is_dir() for d in MME_SPLIT_LAYOUT)
        images_dir, text_dir = (task_dir / d for d in MME_SPLIT_LAYOUT) if split else (task_dir, task_dir)
        for text_file in sorted(text_dir.glob("*.txt")):
            image = _mme_image(images_dir, text_file.stem, str(text_file))
            lines = [line for line in text_file.read_text(encoding="utf-8").splitlines() if line.strip()]
            for number, line in enumerate(lines, 1):
                where = f"{text_file}:{number}"
                question, tab, answer = line.partition("\t")
                if not tab:
                    raise BenchmarkError(f"{where}: expected 'question<TAB>answer', got {line!r}")
                items.append(EvalItem(
                    question_id=f"{task}/{text_file.stem}/{number}", prompt=short_prompt(question.strip()),
                    image=image, answer=_yes_no(answer, where), answer_type="yes_no", category=task,
                    choices=YES_NO_CHOICES, group=f"{task}/{text_file.stem}",
                ))
    if not items:
        raise BenchmarkError(f"{root}: no MME subtask directory ({', '.join(MME_PERCEPTION + MME_COGNITION)}) found")
    return ReadResult(items, {})


def score_mme(items: List[EvalItem], predictions: Dict[str, str]) -> Dict[str, float]:
    """Per subtask ``acc`` and ``acc+`` (both questions of an image right) in percent and
    ``score`` = acc + acc+; ``perception`` / ``cognition`` sum the scores of the subtasks
    present (``*_subtasks`` counts them), ``total`` both."""
    correct, groups = defaultdict(list), defaultdict(lambda: defaultdict(list))
    for item in items:
        right = mme_label(predictions[item.question_id]) == item.answer
        correct[item.category].append(right)
        groups[item.category][item.group].append(right)
    scores = {}
    for task, rights in correct.items():
        acc = 100.0 * sum(rights) / len(rights)
        acc_plus = 100.0 * sum(all(g) for g in groups[task].values()) / len(groups[task])
        scores.update({f"{task}/acc": acc, f"{task}/acc+": acc_plus, f"{task}/score": acc + acc_plus})
    for name, tasks in (("perception", MME_PERCEPTION), ("cognition", MME_COGNITION)):
        present = [t for t in tasks if t in correct]
        scores[name] = sum(scores[f"{t}/score"] for t in present)
        scores[f"{name}_subtasks"] = float(len(present))
    scores["total"] = scores["perception"] + scores["cognition"]
    return scores
