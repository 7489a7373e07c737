"""HallusionBench: yes/no questions on figures (visual dependent, VD) and with or without one
(visual supplement, VS), scored with the authors' three accuracies (their ``utils.py``):

- ``aAcc``, per question;
- ``fAcc``, per figure: every question on the figure right (VS questions without a figure are
  left out);
- ``qAcc``, per question pair: the same question on every figure it is asked of (an original and
  an edited figure, or with and without one) all right.

The authors judge a response with GPT-4 (correct, incorrect or unclear); offline it is read as
VLMEvalKit reads it: "yes" as a word and no "no" is yes, the reverse no, anything else unclear.
As the authors count it, unclear is right on a VS question without a figure (the model may
say it does not know) and wrong elsewhere. Questions get the short-answer prompt.

Files: ``HallusionBench.json`` (images: ``filename`` under the image root, default the JSON's
folder, with or without the zip's ``hallusion_bench/`` folder) or lmms-lab/HallusionBench's
parquet shards (both splits: ``image`` and ``non_image``).
"""

from collections import defaultdict
from pathlib import Path
from typing import Dict, List

from megatron_asvr.evaluation.items import YES_NO_CHOICES, BenchmarkError, EvalItem, ReadResult, short_prompt
from megatron_asvr.evaluation.suites.files import field
from megatron_asvr.evaluation.suites.records import read_records, read_result, record_image
from megatron_asvr.evaluation.suites.short_answer import normalize_vqa

GOLD = {"1": "yes", "0": "no"}
IMAGE_FOLDERS = ("", "hallusion_bench")
UNCLEAR = "unclear"


def hallusion_label(response: str) -> str:
    """yes, no or unclear (VLMEvalKit's ``YOrN_Extraction``)."""
    words = normalize_vqa(response).split()
    if "yes" in words and "no" not in words:
        return "yes"
    if "no" in words and "yes" not in words:
        return "no"
    return UNCLEAR


def _item(record: dict, where: str, image_root: Path) -> EvalItem:
    category, subcategory, set_id, figure_id, question_id = (
        str(field(record, key, where)) for key in ("category", "subcategory", "set_id", "figure_id", "question_id"))
    gold = GOLD.get(str(field(record, "gt_answer", where)))
    if gold is None:
        raise BenchmarkError(f"{where}: gt_answer must be '1' (yes) or '0' (no), got {record['gt_answer']!r}")
    without_figure = category == "VS" and figure_id == "0"
    source = record.get("image") or record.get("filename")
    if source is None and str(record.get("visual_input")) != "0":
        raise BenchmarkError(f"{where}: visual_input {record.get('visual_input')!r} but no image or filename")
    image = record_image(source, image_root, where, folders=IMAGE_FOLDERS)
    pair = f"{category}_{subcategory}_{set_id}_{question_id}"
    figure = None if without_figure else f"{category}_{subcategory}_{set_id}_{figure_id}"
    return EvalItem(f"{category}_{subcategory}_{set_id}_{figure_id}_{question_id}",
                    short_prompt(str(field(record, "question", where))), image, {"label": gold, "figure": figure},
                    "yes_no", category, YES_NO_CHOICES, pair)


def read_hallusionbench(path: Path, image_root: Path) -> ReadResult:
    """Question ids are ``<category>_<subcategory>_<set_id>_<figure_id>_<question_id>``."""
    return read_result(path, [_item(record, where, image_root) for where, record in read_records(path)])


def score_hallusionbench(items: List[EvalItem], predictions: Dict[str, str]) -> Dict[str, float]:
    """``aAcc``, ``fAcc``, ``qAcc``, ``<VD|VS>/aAcc`` and the number of ``unclear`` responses."""
    by_category, figures, pairs, unclear = defaultdict(list), defaultdict(list), defaultdict(list), 0
    for item in items:
        label = hallusion_label(predictions[item.question_id])
        unclear += label == UNCLEAR
        right = label == item.answer["label"] or (label == UNCLEAR and item.answer["figure"] is None)
        by_category[item.category].append(right)
        pairs[item.group].append(right)
        if item.answer["figure"] is not None:
            figures[item.answer["figure"]].append(right)
    rights = [r for rs in by_category.values() for r in rs]
    scores = {"aAcc": sum(rights) / len(rights), "qAcc": sum(all(p) for p in pairs.values()) / len(pairs),
              "unclear": float(unclear)}
    if figures:  # none where every question is a VS one without a figure
        scores["fAcc"] = sum(all(f) for f in figures.values()) / len(figures)
    scores.update({f"{category}/aAcc": sum(rs) / len(rs) for category, rs in sorted(by_category.items())})
    return scores
