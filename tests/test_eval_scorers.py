"""Benchmark readers and scorers against hand-computed scores on small fixture files in each
benchmark's own format (POPE, MME, MMBench TSV, SEED-Bench, MMVP, TextVQA, GQA, generic JSON lines)."""

import base64
import csv
import io
import json

import pytest
from PIL import Image

from megatron_asvr.evaluation.items import CHOICE_PROMPT, SHORT_ANSWER_PROMPT, BenchmarkError
from megatron_asvr.evaluation.suites import BENCHMARKS, get_benchmark
from megatron_asvr.evaluation.suites.choice import option_letter
from megatron_asvr.evaluation.suites.short_answer import normalize_gqa, normalize_vqa, vqa_accuracy
from megatron_asvr.evaluation.suites.yes_no import mme_label, pope_label

APPROX = pytest.approx


def _image(path, color=(200, 10, 10), size=(8, 6)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _score(name, path, root, predictions):
    benchmark = get_benchmark(name)
    data = benchmark.read(path, root)
    return data, benchmark.score(data.items, predictions)


def test_answer_parsers():
    assert [pope_label(t) for t in ("Yes", "No, there is not.", "Not sure", "There is no cat. Yes.", "yes")] == \
        ["yes", "no", "yes", "no", "yes"]
    assert [mme_label(t) for t in ("Yes", "no", "yes, it is", "Nope", "Maybe", "No.")] == \
        ["yes", "no", "yes", "no", "other", "no"]
    options = ["dog", "cat"]
    assert [option_letter(t, "AB", options) for t in ("B", "B.", "(A) dog", "A cat", "cat.", "C", "The answer is A")] \
        == ["B", "B", "A", None, "B", None, None]


def test_pope(tmp_path):
    _image(tmp_path / "coco/a.jpg")
    labels = {"random": ["yes", "yes", "no", "no", "yes"], "adversarial": ["no", "no", "yes", "no"]}
    for split, values in labels.items():
        _jsonl(tmp_path / f"pope/coco_pope_{split}.json",
               [{"question_id": i + 1, "image": "a.jpg", "text": f"Is there a thing {i}?", "label": v}
                for i, v in enumerate(values)])
    responses = {"random": ["Yes", "No, there is not.", "No", "Yes, there is a dog.", "I think so"],
                 "adversarial": ["no", "There is no cat. Yes.", "yes", "Not sure"]}
    predictions = {f"{s}/{i + 1}": r for s, rs in responses.items() for i, r in enumerate(rs)}
    data, scores = _score("pope", tmp_path / "pope", tmp_path / "coco", predictions)
    assert data.items[0].prompt == f"Is there a thing 0?\n{SHORT_ANSWER_PROMPT}"
    # random: TP 2, FP 1, TN 1, FN 1; adversarial: TP 1, FP 1, TN 2, FN 0
    assert scores == APPROX({
        "random/accuracy": 0.6, "random/precision": 2 / 3, "random/recall": 2 / 3, "random/f1": 2 / 3,
        "random/yes_ratio": 0.6, "adversarial/accuracy": 0.75, "adversarial/precision": 0.5,
        "adversarial/recall": 1.0, "adversarial/f1": 2 / 3, "adversarial/yes_ratio": 0.5,
        "accuracy": 0.675, "precision": 7 / 12, "recall": 5 / 6, "f1": 2 / 3, "yes_ratio": 0.55,
    })


def test_mme(tmp_path):
    root = tmp_path / "MME"
    for stem, suffix in (("000", ".jpg"), ("001", ".png")):
        _image(root / "existence" / f"{stem}{suffix}")
    (root / "existence/000.txt").write_text("Is there a dog?\tYes\nIs there a cat?\tNo\n")
    (root / "existence/001.txt").write_text("Is there a car?\tYes\nIs there a bus?\tNo\n")
    _image(root / "artwork/images/a.jpg")
    (root / "artwork/questions_answers_YN").mkdir(parents=True)
    (root / "artwork/questions_answers_YN/a.txt").write_text("Is this by Monet?\tYes\nIs this by Picasso?\tNo\n")
    _image(root / "code_reasoning/c.jpg")
    (root / "code_reasoning/c.txt").write_text("Will this print 3?\tYes\nWill this print 4?\tNo\n")
    predictions = {
        "existence/000/1": "Yes", "existence/000/2": "no", "existence/001/1": "No", "existence/001/2": "No",
        "artwork/a/1": "yes, it is", "artwork/a/2": "Nope", "code_reasoning/c/1": "Maybe", "code_reasoning/c/2": "No.",
    }
    data, scores = _score("mme", root, None, predictions)
    assert len(data.items) == 8 and data.items[0].image.name == "000.jpg"
    assert scores == APPROX({
        "existence/acc": 75.0, "existence/acc+": 50.0, "existence/score": 125.0,
        "artwork/acc": 100.0, "artwork/acc+": 100.0, "artwork/score": 200.0,
        "code_reasoning/acc": 50.0, "code_reasoning/acc+": 0.0, "code_reasoning/score": 50.0,
        "perception": 325.0, "perception_subtasks": 2.0, "cognition": 50.0, "cognition_subtasks": 1.0, "total": 375.0,
    })
    (root / "existence/001.txt").write_text("Is there a car? Yes\n")
    with pytest.raises(BenchmarkError, match=r"001.txt:1: expected 'question<TAB>answer'"):
        get_benchmark("mme").read(root, None)


def _png_base64(color) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _write_tsv(path, rows):
    columns = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)


def test_mmbench(tmp_path):
    image = _png_base64((0, 200, 0))
    rows = [
        {"index": 0, "question": "What is shown?", "hint": "A photo.", "A": "cat", "B": "dog", "C": "", "D": "",
         "answer": "B", "category": "recognition", "image": image},
        {"index": 1, "question": "How many?", "hint": "nan", "A": "1", "B": "2", "C": "3", "D": "4",
         "answer": "C", "category": "counting", "image": image},
        {"index": 2, "question": "Which color?", "hint": "", "A": "red", "B": "blue", "C": "green", "D": "nan",
         "answer": "A", "category": "recognition", "image": image},
        {"index": 3, "question": "Which?", "hint": "", "A": "x", "B": "y", "C": "", "D": "",
         "answer": "A", "category": "reasoning", "image": image},
    ]
    _write_tsv(tmp_path / "mmbench_dev.tsv", rows)
    predictions = {"0": "B", "1": "(C) 3", "2": "blue", "3": "The answer is A"}
    data, scores = _score("mmbench", tmp_path / "mmbench_dev.tsv", None, predictions)
    first = data.items[0]
    assert first.prompt == f"A photo.\nWhat is shown?\nA. cat\nB. dog\n{CHOICE_PROMPT}"
    assert first.choices == ("A", "B") and data.items[2].choices == ("A", "B", "C")
    assert data.items[1].prompt.startswith("How many?\nA. 1\n")
    assert Image.open(io.BytesIO(first.image)).getpixel((0, 0)) == (0, 200, 0)
    assert scores == APPROX({"accuracy": 0.5, "unparsed": 1.0, "counting/accuracy": 1.0,
                             "reasoning/accuracy": 0.0, "recognition/accuracy": 0.5})
    rows[3]["answer"] = ""
    _write_tsv(tmp_path / "test.tsv", rows)
    with pytest.raises(BenchmarkError, match=r"test.tsv:5: no answer"):
        get_benchmark("mmbench").read(tmp_path / "test.tsv", None)


def test_seed(tmp_path):
    _image(tmp_path / "images/1.jpg")
    _image(tmp_path / "images/2.jpg")
    questions = [
        {"question_id": "q1", "data_id": "1.jpg", "data_type": "image", "question": "Where?", "answer": "A",
         "choice_a": "park", "choice_b": "beach", "choice_c": "city", "choice_d": "forest", "question_type_id": 1},
        {"question_id": "q2", "data_id": "2.jpg", "data_type": "image", "question": "How many?", "answer": "D",
         "choice_a": "1", "choice_b": "2", "choice_c": "3", "choice_d": "4", "question_type_id": 2},
        {"question_id": "q3", "data_id": "1.jpg", "data_type": "image", "question": "What?", "answer": "B",
         "choice_a": "a", "choice_b": "b", "choice_c": "c", "choice_d": "d", "question_type_id": 2},
        {"question_id": "v1", "data_id": "clip.mp4", "data_type": "video", "question": "When?", "answer": "A",
         "choice_a": "a", "choice_b": "b", "choice_c": "c", "choice_d": "d", "question_type_id": 3},
    ]
    (tmp_path / "SEED-Bench.json").write_text(json.dumps(
        {"questions": questions, "question_type": {"Scene Understanding": 1, "Instance Counting": 2}}))
    data, scores = _score("seed", tmp_path / "SEED-Bench.json", tmp_path / "images", {"q1": "A", "q2": "C", "q3": "B"})
    assert data.skipped == {"video question": 1}
    assert data.items[0].prompt == f"Where?\nA. park\nB. beach\nC. city\nD. forest\n{CHOICE_PROMPT}"
    assert scores == APPROX({"accuracy": 2 / 3, "unparsed": 0.0, "Instance Counting/accuracy": 0.5,
                             "Scene Understanding/accuracy": 1.0})


def test_mmvp(tmp_path):
    for index in range(1, 5):
        _image(tmp_path / "MMVP Images" / f"{index}.jpg")
    (tmp_path / "Questions.csv").write_text(
        "Index,Question,Options,Correct Answer\n"
        "1,Is the door open?,(a) Open (b) Closed,(a)\n"
        "2,Is the door open?,(a) Open (b) Closed,(b)\n"
        '3,"Which way, left or right?",(a) Left (b) Right,(a)\n'
        "4,Which way?,(a) Left (b) Right,(a)\n")
    data, scores = _score("mmvp", tmp_path / "Questions.csv", None, {"1": "A", "2": "B", "3": "Right", "4": "(A)"})
    assert data.items[2].prompt == f"Which way, left or right?\nA. Left\nB. Right\n{CHOICE_PROMPT}"
    assert [i.group for i in data.items] == ["1", "1", "2", "2"]
    assert scores == APPROX({"accuracy": 0.75, "unparsed": 0.0, "pair_accuracy": 0.5})


def test_vqa_normalisation():
    assert normalize_vqa("The Cat's toy.") == "cat 's toy"
    assert normalize_vqa("I dont know") == "i don't know"
    assert normalize_vqa("Two") == "2"
    assert normalize_vqa("Coca-Cola") == "coca cola"
    assert normalize_vqa("yes, sir!") == "yes sir"
    assert normalize_gqa(" Left. ") == "left"
    # 5 x "2" and 5 x "3": a "2" is matched by at least 4 others for every left-out answer
    assert vqa_accuracy("Two.", ["two"] * 3 + ["2"] * 2 + ["three"] * 5) == 1.0
    # 2 x "coca cola", 8 x "coke": left-out "coca cola" -> 1/3, left-out "coke" -> 2/3
    assert vqa_accuracy("Coca-Cola", ["coca cola"] * 2 + ["coke"] * 8) == APPROX((2 / 3 + 16 / 3) / 10)


def test_textvqa(tmp_path):
    for name in ("i1", "i2", "i3"):
        _image(tmp_path / "train_images" / f"{name}.jpg")
    records = [
        {"question_id": 1, "question": "How many?", "image_id": "i1",
         "answers": ["two"] * 3 + ["2"] * 2 + ["three"] * 5},
        {"question_id": 2, "question": "Brand?", "image_id": "i2", "answers": ["coca cola"] * 2 + ["coke"] * 8},
        {"question_id": 3, "question": "Sign?", "image_id": "i3", "answers": ["stop"] * 10},
    ]
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": records}))
    data, scores = _score("textvqa", tmp_path / "TextVQA_0.5.1_val.json", tmp_path / "train_images",
                          {"1": "Two.", "2": "Coca-Cola", "3": "yield"})
    assert data.items[0].prompt == f"How many?\n{SHORT_ANSWER_PROMPT}"
    assert scores == APPROX({"accuracy": (1.0 + 0.6 + 0.0) / 3})


def test_gqa(tmp_path):
    for name in ("n1", "n2"):
        _image(tmp_path / "images" / f"{name}.jpg")
    questions = {
        "q1": {"imageId": "n1", "question": "Is it red?", "answer": "yes", "types": {"structural": "verify"}},
        "q2": {"imageId": "n2", "question": "Which side?", "answer": "left", "types": {"structural": "query"}},
        "q3": {"imageId": "n1", "question": "What is it on?", "answer": "table", "types": {"structural": "query"}},
    }
    (tmp_path / "testdev.json").write_text(json.dumps(questions))
    _, scores = _score("gqa", tmp_path / "testdev.json", tmp_path / "images",
                       {"q1": "Yes.", "q2": " Left", "q3": "the table"})
    assert scores == APPROX({"accuracy": 2 / 3, "verify/accuracy": 1.0, "query/accuracy": 0.5})


def test_generic_jsonl(tmp_path):
    _image(tmp_path / "images/eval/0.jpg")
    records = [
        {"question_id": "q1", "image": "eval/0.jpg", "text": "Which?\nA. x\nB. y\nAnswer with the letter.",
         "options": ["x", "y"], "answer": "B", "category": "choice"},
        {"question_id": "q2", "image": "eval/0.jpg", "question": "Is it red?", "answer": "Yes", "category": "yes/no"},
        {"question_id": "q3", "image": "eval/0.jpg", "question": "How many?", "answer": "2", "category": "count"},
        {"question_id": "q4", "image": "eval/0.jpg", "question": "Which animal?", "hint": "Look",
         "options": ["cat", "dog"], "answer": 0, "category": "choice"},
        {"question_id": "q5", "question": "Mix red and blue?", "answer": "Purple", "category": "color"},
    ]
    path = _jsonl(tmp_path / "eval.jsonl", records)
    data, scores = _score("jsonl", path, tmp_path / "images", {"q1": "B", "q2": "No", "q3": "two", "q4": "cat",
                                                               "q5": "purple."})
    items = {i.question_id: i for i in data.items}
    assert items["q1"].prompt == records[0]["text"]
    assert items["q2"].prompt == f"Is it red?\n{SHORT_ANSWER_PROMPT}" and items["q2"].choices == ("Yes", "No")
    assert items["q4"].prompt == f"Look\nWhich animal?\nA. cat\nB. dog\n{CHOICE_PROMPT}"
    assert items["q4"].answer["letter"] == "A" and items["q5"].image is None
    assert ([items[q].answer_type for q in ("q1", "q2", "q3", "q4", "q5")]
            == ["choice", "yes_no", "short", "choice", "short"])
    accuracy = {"accuracy": 0.8, "choice/accuracy": 1.0, "yes/no/accuracy": 0.0, "count/accuracy": 1.0,
                "color/accuracy": 1.0}
    assert {k: v for k, v in scores.items() if k.endswith("accuracy")} == APPROX(accuracy)
    assert scores["choice/chance"] == 0.5 and scores["yes/no/chance"] == 1.0  # one gold answer: "yes"


def test_jsonl_chance_and_majority():
    from megatron_asvr.evaluation.items import YES_NO_CHOICES, EvalItem
    from megatron_asvr.evaluation.suites.choice import choice_item
    from megatron_asvr.evaluation.suites.jsonl import score_jsonl

    def short(qid, answer, category):
        return EvalItem(qid, "?", None, answer, "short", category)

    items = [short("c1", "2", "count"), short("c2", "2", "count"), short("c3", "3", "count"),
             short("c4", "two", "count"),  # normalised to "2": gold answers 2, 2, 3, 2
             *[EvalItem(f"y{i}", "?", None, a, "yes_no", "yes/no", YES_NO_CHOICES)
               for i, a in enumerate(("yes", "no", "yes"))],
             choice_item("k1", "?", None, "C", "wxyz", "choice"), choice_item("k2", "?", None, "C", "xyz", "choice"),
             choice_item("k3", "?", None, "A", "wxyz", "choice"),
             short("r1", "Red", "color"), short("r2", "red", "color"), short("r3", "Blue", "color")]
    said = dict(c1="2", c2="3", c3="3", c4="2", y0="Yes", y1="Yes", y2="No", k1="C", k2="A", k3="A", r1="red",
                r2="blue", r3="blue")
    scores = score_jsonl(items, {item.question_id: said[item.question_id] for item in items})
    assert scores == APPROX({
        "count/accuracy": 3 / 4, "count/chance": 1 / 2, "count/majority": 3 / 4,  # always "2"
        "yes/no/accuracy": 1 / 3, "yes/no/chance": 1 / 2, "yes/no/majority": 2 / 3,
        "choice/accuracy": 2 / 3, "choice/chance": (1 / 4 + 1 / 3 + 1 / 4) / 3, "choice/majority": 2 / 3,  # "C"
        "color/accuracy": 2 / 3, "color/chance": 1 / 2, "color/majority": 2 / 3,
        "accuracy": 8 / 13, "chance": (4 / 2 + 3 / 2 + 5 / 6 + 3 / 2) / 13, "majority": 9 / 13,
    })


def test_bad_records_name_file_and_line(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps({"question_id": "a", "image": "missing.jpg", "question": "?", "answer": "x"}) + "\n")
    with pytest.raises(BenchmarkError, match=r"eval.jsonl:1: image .*missing.jpg does not exist"):
        get_benchmark("jsonl").read(path, tmp_path)
    path.write_text("\n{not json\n")
    with pytest.raises(BenchmarkError, match=r"eval.jsonl:2: not valid JSON"):
        get_benchmark("jsonl").read(path, tmp_path)
    path.write_text(json.dumps({"question_id": "a", "question": "?", "options": ["x", "y"], "answer": "C"}) + "\n")
    with pytest.raises(BenchmarkError, match=r"eval.jsonl:1: answer 'C' is not an option"):
        get_benchmark("jsonl").read(path, tmp_path)
    with pytest.raises(BenchmarkError, match="unknown benchmark 'vqav2'"):
        get_benchmark("vqav2")
    assert sorted(BENCHMARKS) == ["ai2d", "chartqa", "docvqa", "gqa", "hallusionbench", "jsonl", "mmbench", "mme",
                                  "mmmu", "mmvp", "ocrbench", "pope", "realworldqa", "seed", "textvqa"]
