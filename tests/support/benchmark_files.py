"""Tiny benchmark files in the public formats the evaluation reads, for the tests: images, HF
parquet shards with embedded images, and ``write_paper14``: two or three questions of each of the
paper's 14 benchmarks, each in its own release format."""

import base64
import csv
import io
import json
from pathlib import Path
from typing import Dict, Optional, Tuple

from PIL import Image

RED, GREEN, BLUE = (200, 10, 10), (10, 200, 10), (10, 10, 200)


def png_bytes(color=RED, size=(8, 6)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def embedded(color=RED, name: str = "image.png") -> dict:
    """An image as a HF dataset's parquet stores it."""
    return {"bytes": png_bytes(color), "path": name}


def write_image(path: Path, color=RED, size=(8, 6)) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def write_json(path: Path, data) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def write_jsonl(path: Path, records) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_parquet(path: Path, rows) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _existing_seven(root: Path) -> Dict[str, Tuple[Path, Optional[Path]]]:
    """POPE, MME, MMBench, SEED, MMVP, TextVQA and GQA."""
    write_image(root / "coco/a.jpg")
    write_jsonl(root / "pope/coco_pope_random.json", [
        {"question_id": 1, "image": "a.jpg", "text": "Is there a square?", "label": "yes"},
        {"question_id": 2, "image": "a.jpg", "text": "Is there a dog?", "label": "no"}])
    write_image(root / "MME/color/000.jpg", GREEN)
    (root / "MME/color/000.txt").write_text("Is the square green?\tYes\nIs the square red?\tNo\n")
    with open(root / "mmbench_dev.tsv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["index", "question", "hint", "A", "B", "answer", "category", "image"],
                                delimiter="\t")
        writer.writeheader()
        writer.writerow({"index": 0, "question": "What colour?", "hint": "", "A": "red", "B": "blue", "answer": "A",
                         "category": "color", "image": base64.b64encode(png_bytes()).decode()})
    write_image(root / "seed/1.jpg", BLUE)
    write_json(root / "SEED-Bench.json", {"question_type": {"Scene": 1}, "questions": [
        {"question_id": "s1", "data_id": "1.jpg", "data_type": "image", "question": "What colour?", "answer": "C",
         "choice_a": "red", "choice_b": "green", "choice_c": "blue", "choice_d": "white", "question_type_id": 1}]})
    for index in (1, 2):
        write_image(root / "mmvp/MMVP Images" / f"{index}.jpg")
    (root / "mmvp/Questions.csv").write_text("Index,Question,Options,Correct Answer\n"
                                             "1,Is it red?,(a) Yes (b) No,(a)\n2,Is it blue?,(a) Yes (b) No,(b)\n")
    write_image(root / "textvqa/t1.jpg")
    write_json(root / "TextVQA_0.5.1_val.json", {"data": [
        {"question_id": 1, "question": "What colour?", "image_id": "t1", "answers": ["red"] * 10}]})
    write_image(root / "gqa/g1.jpg")
    write_json(root / "testdev.json", {"g1": {"imageId": "g1", "question": "What colour is it?", "answer": "red",
                                              "types": {"structural": "query"}}})
    return {"pope": (root / "pope", root / "coco"), "mme": (root / "MME", None),
            "mmbench": (root / "mmbench_dev.tsv", None), "seed": (root / "SEED-Bench.json", root / "seed"),
            "mmvp": (root / "mmvp/Questions.csv", root / "mmvp/MMVP Images"),  # the tool passes no default
            "textvqa": (root / "TextVQA_0.5.1_val.json", root / "textvqa"),
            "gqa": (root / "testdev.json", root / "gqa")}


def _new_seven(root: Path) -> Dict[str, Tuple[Path, Optional[Path]]]:
    """DocVQA, ChartQA, OCRBench, MMMU, AI2D, RealWorldQA and HallusionBench."""
    write_image(root / "docvqa/documents/d1.png")
    write_json(root / "docvqa/val_v1.0.json", {"dataset_name": "docvqa", "data": [
        {"questionId": 11, "question": "What is the date?", "image": "documents/d1.png", "answers": ["1986"]}]})
    write_image(root / "chartqa/test/png/c1.png", BLUE)
    write_json(root / "chartqa/test/test_human.json", [{"imgname": "c1.png", "query": "What is the peak?",
                                                        "label": "12"}])
    write_json(root / "chartqa/test/test_augmented.json", [{"imgname": "c1.png", "query": "Which bar is blue?",
                                                            "label": "A"}])
    write_image(root / "OCRBench_Images/IIIT5K/o1.png")
    write_json(root / "OCRBench.json", [
        {"dataset_name": "IIIT5K", "id": 0, "image_path": "IIIT5K/o1.png", "question": "What is written?",
         "answers": "RED", "type": "Regular Text Recognition"},
        {"dataset_name": "HME100k", "id": 1, "image_path": "IIIT5K/o1.png", "question": "Write the formula.",
         "answers": "x + 1", "type": "Handwritten Mathematical Expression Recognition"}])
    write_parquet(root / "MMMU/Art/validation-00000-of-00001.parquet", [
        {"id": "validation_Art_1", "question": "Which colour is <image 1>?", "options": "['red', 'blue']",
         "answer": "A", "question_type": "multiple-choice", "image_1": embedded(RED), "image_2": embedded(BLUE)},
        {"id": "validation_Art_2", "question": "How many squares?", "options": "[]", "answer": "1",
         "question_type": "open", "image_1": embedded(GREEN), "image_2": None}])
    write_parquet(root / "ai2d/test-00000-of-00001.parquet", [
        {"question": "Which colour?", "options": ["red", "green"], "answer": "0", "image": embedded(RED)}])
    write_parquet(root / "realworldqa/test-00000-of-00001.parquet", [
        {"question": "Which way?\nA. Left\nB. Right\nPlease answer directly with only the letter of the correct "
                     "option and nothing else.", "answer": "B", "image": embedded(GREEN)},
        {"question": "How many cars? Please answer directly with a single word or number.", "answer": "2",
         "image": embedded(BLUE)}])
    write_image(root / "hallusion/hallusion_bench/VD/illusion/0_0.png")
    base = {"category": "VD", "subcategory": "illusion", "visual_input": "1", "set_id": "0", "figure_id": "0"}
    write_json(root / "hallusion/HallusionBench.json", [
        {**base, "question_id": "0", "question": "Is it red?", "gt_answer": "1",
         "filename": "./hallusion_bench/VD/illusion/0_0.png"},
        {**base, "question_id": "1", "question": "Is it blue?", "gt_answer": "0",
         "filename": "./hallusion_bench/VD/illusion/0_0.png"},
        {**base, "category": "VS", "subcategory": "chart", "visual_input": "0", "question_id": "0",
         "question": "Is Paris in France?", "gt_answer": "1", "filename": None}])
    return {"docvqa": (root / "docvqa/val_v1.0.json", None), "chartqa": (root / "chartqa/test", None),
            "ocrbench": (root / "OCRBench.json", None), "mmmu": (root / "MMMU", None),
            "ai2d": (root / "ai2d", None), "realworldqa": (root / "realworldqa", None),
            "hallusionbench": (root / "hallusion/HallusionBench.json", None)}


def write_paper14(root: Path) -> Dict[str, Tuple[Path, Optional[Path]]]:
    """benchmark name -> (its path, its image root or None for the default) of a tiny set of each
    of the paper's 14 benchmarks under ``root``."""
    root = Path(root)
    return {**_existing_seven(root), **_new_seven(root)}
