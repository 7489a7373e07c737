"""Readers and scorers of the paper's seven document / knowledge / hallucination benchmarks (DocVQA,
ChartQA, OCRBench, MMMU, AI2D, RealWorldQA, HallusionBench) on tiny files in their public formats,
against scores computed by hand in the comments; and the paper's table with its average."""

from types import SimpleNamespace

import pytest

from tests.support.benchmark_files import BLUE, GREEN, RED, embedded, png_bytes, write_image, write_json, write_parquet
from megatron_asvr.config import ConfigError
from megatron_asvr.evaluation.items import CHOICE_PROMPT, SHORT_ANSWER_PROMPT, BenchmarkError
from megatron_asvr.evaluation.paper_table import PAPER14, check_suite, format_suite_table, suite_summary
from megatron_asvr.evaluation.suites import get_benchmark
from megatron_asvr.evaluation.suites.documents import anls, levenshtein, ocrbench_correct, relaxed_correct
from megatron_asvr.evaluation.suites.hallusion import hallusion_label
from megatron_asvr.evaluation.suites.mmmu import is_correct_open, parse_choice, parse_open

APPROX = pytest.approx


def _score(name, path, root, predictions):
    benchmark = get_benchmark(name)
    data = benchmark.read(path, root)
    return data, benchmark.score(data.items, predictions)


# --- DocVQA ---------------------------------------------------------------------------------------


def test_anls_threshold_and_lengths():
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3
    assert anls("Jackson", ["jackson"]) == 1.0  # case does not count
    assert anls("abce", ["abcd"]) == 0.75  # 1 edit of 4
    assert anls("abef", ["abcd"]) == 0.5  # 2 of 4: exactly the threshold is kept
    assert anls("axyz", ["abcd"]) == 0.0  # 3 of 4: 0.25 is below it
    assert anls("March 1986", ["1986", "march 1986"]) == 1.0  # the closest answer
    # whitespace runs collapse for the distance, but the length is the raw answer's 9 characters
    assert anls("new yorc", ["new  york"]) == APPROX(1 - 1 / 9)
    assert anls("", [""]) == 1.0


def test_docvqa_rrc_json_and_parquet(tmp_path):
    write_image(tmp_path / "documents/d1.png")
    write_image(tmp_path / "d2.png")  # an archive unpacked flat: found by its file name
    write_image(tmp_path / "documents/d3.png")
    write_json(tmp_path / "val_v1.0.json", {"dataset_name": "docvqa", "dataset_split": "val", "data": [
        {"questionId": 1, "question": "What is the ratio?", "image": "documents/d1.png", "answers": ["0.28"]},
        {"questionId": 2, "question": "Who issued it?", "image": "documents/d2.png", "answers": ["ITC Limited", "itc"]},
        {"questionId": 3, "question": "Which industry?", "image": "documents/d3.png", "answers": ["Tobacco"]}]})
    predictions = {"1": "0.28", "2": "ITC Limted", "3": "Tob"}
    data, scores = _score("docvqa", tmp_path / "val_v1.0.json", tmp_path, predictions)
    assert data.items[0].prompt == f"What is the ratio?\n{SHORT_ANSWER_PROMPT}"
    assert data.items[1].image == tmp_path / "d2.png"
    # q1 1; q2 "itc limted" vs "itc limited": 1 edit / 11 -> 10/11 (vs "itc": 7 / 10 -> 0.3);
    # q3 "tob" vs "tobacco": 4 / 7 -> 3/7 < 0.5 -> 0
    assert scores == APPROX({"anls": (1 + 10 / 11 + 0) / 3})

    rows = [{"questionId": 7, "question": "Total?", "answers": ["12"], "image": embedded()}]
    write_parquet(tmp_path / "lmms/validation-00000-of-00001.parquet", rows)
    write_parquet(tmp_path / "lmms/test-00000-of-00001.parquet",  # no answers: the split is not read
                  [{"questionId": 8, "question": "Total?", "answers": None, "image": embedded()}])
    data, scores = _score("docvqa", tmp_path / "lmms", tmp_path, {"7": "12"})
    assert [i.question_id for i in data.items] == ["7"] and data.items[0].image == png_bytes()
    assert scores == {"anls": 1.0}
    with pytest.raises(BenchmarkError, match=r"test-00000-of-00001.parquet: row 0: no answers"):
        get_benchmark("docvqa").read(tmp_path / "lmms/test-00000-of-00001.parquet", tmp_path)


# --- ChartQA --------------------------------------------------------------------------------------


def test_relaxed_accuracy_tolerance_and_percentages():
    assert relaxed_correct("10.4", "10") and not relaxed_correct("10.6", "10")  # 4% in, 6% out
    assert relaxed_correct("-10.4", "-10")  # relative to |target|
    assert relaxed_correct("12%", "0.12")  # 12% reads as 0.12
    assert not relaxed_correct("12", "12%")  # 12 against 0.12
    assert relaxed_correct("12.5%", "12%")  # 0.125 against 0.12: 4.2% off
    assert relaxed_correct("0", "0") and not relaxed_correct("0.0", "0")  # a zero target needs the string
    assert relaxed_correct("Yes", "yes") and not relaxed_correct("Blue ", "blue")  # text: case only


def test_chartqa_release_folder_and_parquet(tmp_path):
    test = tmp_path / "ChartQA Dataset/test"
    for name in ("a.png", "b.png"):
        write_image(test / "png" / name)
    write_json(test / "test_human.json", [{"imgname": "a.png", "query": "Peak value?", "label": "42"},
                                          {"imgname": "b.png", "query": "Which colour is tallest?", "label": "Blue"}])
    write_json(test / "test_augmented.json", [{"imgname": "a.png", "query": "Share in 2019?", "label": "35%"},
                                              {"imgname": "b.png", "query": "Lowest value?", "label": "0"}])
    predictions = {"human/0": "43", "human/1": "green", "augmented/0": "0.36", "augmented/1": "0"}
    data, scores = _score("chartqa", test, test, predictions)
    assert [i.question_id for i in data.items] == ["human/0", "human/1", "augmented/0", "augmented/1"]
    assert data.items[0].image == test / "png/a.png"
    # human: 43 vs 42 (2.4% off) right, green wrong; augmented: 0.36 vs 35% = 0.35 (2.9%) right, "0" right
    assert scores == APPROX({"relaxed_accuracy": 3 / 4, "human/relaxed_accuracy": 1 / 2,
                             "augmented/relaxed_accuracy": 1.0})
    write_parquet(tmp_path / "lmms/test-00000-of-00001.parquet", [
        {"type": "human_test", "question": "Peak?", "answer": "42", "image": embedded()},
        {"type": "augmented_test", "question": "Low?", "answer": "7", "image": embedded()}])
    _, scores = _score("chartqa", tmp_path / "lmms", tmp_path, {"human/0": "42", "augmented/0": "8"})
    assert scores == APPROX({"relaxed_accuracy": 0.5, "human/relaxed_accuracy": 1.0,  # 8 vs 7: 14% off
                             "augmented/relaxed_accuracy": 0.0})


# --- OCRBench -------------------------------------------------------------------------------------


def test_ocrbench_rules():
    assert ocrbench_correct("The word is centre.", ["CENTRE"], "IIIT5K")  # contained, any case
    assert not ocrbench_correct("hostel", ["HOTEL"], "svtp")
    # HME100k: spaces and newlines removed, case kept
    assert ocrbench_correct("\\frac{9-1}{2} = 4", ["\\frac { 9 - 1 } { 2 }\n"], "HME100k")
    assert not ocrbench_correct("x+y", ["X + Y"], "HME100k")
    assert not ocrbench_correct("X+Y", ["x + y"], "IIIT5K")  # elsewhere spaces stay


def test_ocrbench_categories(tmp_path):
    write_image(tmp_path / "OCRBench_Images/IIIT5K/1.png")
    image = "IIIT5K/1.png"
    records = [
        ("IIIT5K", "CENTRE", "Regular Text Recognition"),
        ("svtp", ["HOTEL"], "Irregular Text Recognition"),
        ("textVQA", ["coca cola", "coke"], "Scene Text-centric VQA"),
        ("docVQA", "12\n34", "Doc-oriented VQA"),
        ("SROIE", "SECRET RECIPE", "Key Information Extraction"),
        ("HME100k", "\\frac { 9 - 1 } { 2 }", "Handwritten Mathematical Expression Recognition"),
        ("HME100k", "X + Y", "Handwritten Mathematical Expression Recognition"),
    ]
    write_json(tmp_path / "OCRBench.json", [
        {"dataset_name": d, "id": 5, "image_path": image, "question": "what is written in the image?", "answers": a,
         "type": t} for d, a, t in records])  # the release's ids repeat: questions are numbered by position
    responses = ["The word is centre.", "hostel", "Coke", "12 34", "secret", "\\frac{9-1}{2} = 4", "x+y"]
    data, scores = _score("ocrbench", tmp_path / "OCRBench.json", tmp_path / "OCRBench_Images",
                          {str(i): r for i, r in enumerate(responses)})
    assert [i.question_id for i in data.items] == [str(i) for i in range(7)]
    # right: regular, scene, doc, first HME -> 4 of 7; recognition group = regular 1 + irregular 0
    assert scores == {
        "total": 4.0, "accuracy": 4 / 7, "Text Recognition/count": 1.0,
        "Regular Text Recognition/count": 1.0, "Irregular Text Recognition/count": 0.0,
        "Scene Text-centric VQA/count": 1.0, "Doc-oriented VQA/count": 1.0, "Key Information Extraction/count": 0.0,
        "Handwritten Mathematical Expression Recognition/count": 1.0,
    }
    write_parquet(tmp_path / "echo840/test-00000-of-00001.parquet", [
        {"dataset": "IIIT5K", "question": "what is written?", "question_type": "Regular Text Recognition",
         "answer": ["STOP"], "image": embedded()}])
    _, scores = _score("ocrbench", tmp_path / "echo840", tmp_path, {"0": "stop sign"})
    assert scores["total"] == 1.0 and scores["Text Recognition/count"] == 1.0
    write_json(tmp_path / "bad.json", [{"dataset_name": "x", "image_path": image, "question": "?", "answers": "a",
                                        "type": "Poetry"}])
    with pytest.raises(BenchmarkError, match=r"bad.json: record 0: unknown OCRBench category 'Poetry'"):
        get_benchmark("ocrbench").read(tmp_path / "bad.json", tmp_path / "OCRBench_Images")


# --- MMMU -----------------------------------------------------------------------------------------


def test_mmmu_response_parsers():
    letters, options = ("A", "B", "C", "D"), ("cat", "dog", "bird", "fish")
    assert parse_choice("B.", letters, options) == "B"
    assert parse_choice("(A) or (C)", letters, options) == "C"  # several: the last one named
    assert parse_choice("A is wrong, so C", letters, options) == "C"
    assert parse_choice("The animal in the picture is a dog", letters, options) == "B"  # > 5 words: by text
    assert parse_choice("a dog", letters, options) is None  # 2 words: not read by text
    assert parse_open("The result is 3.43") == [3.43]  # the tail after the shortest key phrase
    assert sorted(parse_open("Embryonic stage"), key=str) == ["embryonic stage"]
    assert is_correct_open(["24/7", "3.429"], [3.43])  # 3.429 rounds to 3.43
    assert not is_correct_open(["C"], ["cis"])  # one character must stand as a word: " c" / "c "


def test_mmmu_parquet_multi_image_and_open(tmp_path):
    def row(qid, question, options, answer, kind, *images):
        images = list(images) + [None] * (7 - len(images))
        return {"id": qid, "question": question, "options": options, "answer": answer, "question_type": kind,
                **{f"image_{k + 1}": image for k, image in enumerate(images)}}

    write_parquet(tmp_path / "MMMU/Art/validation-00000-of-00001.parquet", [
        row("validation_Art_1", "Which animal is in <image 1> and <image 2>?", "['cat', 'dog', 'bird']", "B",
            "multiple-choice", embedded(RED), embedded(BLUE)),
        row("dev_Art_1", "Which?", "['a', 'b']", "A", "multiple-choice", embedded())])
    write_parquet(tmp_path / "MMMU/Math/validation-00000-of-00001.parquet", [
        row("validation_Math_1", "How many?", "['1', '2', '3', '4']", "C", "multiple-choice", embedded()),
        row("validation_Math_2", "Compute 24/7.", "[]", "['24/7', '3.429']", "open", embedded())])
    write_parquet(tmp_path / "MMMU/Physics/validation-00000-of-00001.parquet", [
        row("validation_Physics_1", "Which law?", "['Ohm', 'Hooke']", "A", "multiple-choice", embedded())])
    write_parquet(tmp_path / "MMMU/Psychology/validation-00000-of-00001.parquet", [
        row("validation_Psychology_1", "Which stage?", "[]", "embryonic", "open", embedded())])
    write_parquet(tmp_path / "MMMU/Pharmacy/validation-00000-of-00001.parquet", [
        row("validation_Pharmacy_1", "Which vial?", "[]", "C", "open", embedded())])
    write_parquet(tmp_path / "MMMU/Pharmacy/test-00000-of-00001.parquet",  # another split: not read
                  [row("test_Pharmacy_1", "?", "[]", "?", "open", embedded())])
    predictions = {"validation_Art_1": "(B) dog", "validation_Math_1": "A is wrong, so C",
                   "validation_Physics_1": "I cannot tell", "validation_Math_2": "The result is 3.43",
                   "validation_Psychology_1": "Embryonic stage", "validation_Pharmacy_1": "Cis"}
    data, scores = _score("mmmu", tmp_path / "MMMU", tmp_path, predictions)
    assert data.skipped == {"dev question": 1}
    first = next(i for i in data.items if i.question_id == "validation_Art_1")
    assert first.prompt == f"Which animal is in  and ?\nA. cat\nB. dog\nC. bird\n{CHOICE_PROMPT}"
    assert first.image == png_bytes(RED) and first.answer["images"] == 2  # the first image only
    # right: Art_1, Math_1, Math_2 (3.43 = round(3.429, 2)), Psychology_1; wrong: Physics_1 (no letter
    # named: unparsed), Pharmacy_1 ("c" must stand alone) -> 4 / 6; Science = Math 2 right + Physics 0 of 3
    assert scores == APPROX({
        "accuracy": 4 / 6, "unparsed": 1.0, "multi_image_questions": 1.0, "multi_image/accuracy": 1.0,
        "Art and Design/accuracy": 1.0, "Science/accuracy": 2 / 3, "Humanities and Social Science/accuracy": 1.0,
        "Health and Medicine/accuracy": 0.0,
    })
    write_parquet(tmp_path / "bad/validation-00000-of-00001.parquet",
                  [row("validation_Art_9", "?", "['x', 'y']", "C", "multiple-choice", embedded())])
    with pytest.raises(BenchmarkError, match=r"row 0: answer 'C' is not one of the option letters AB"):
        get_benchmark("mmmu").read(tmp_path / "bad", tmp_path)


# --- AI2D and RealWorldQA -------------------------------------------------------------------------


def test_ai2d_parquet(tmp_path):
    write_parquet(tmp_path / "ai2d/test-00000-of-00001.parquet", [
        {"question": "Which stage comes first?", "options": ["egg", "larva", "pupa"], "answer": "0",
         "image": embedded()},
        {"question": "How many legs?", "options": ["1", "2", "3", "4"], "answer": "1", "image": embedded()},
        {"question": "What eats grass?", "options": ["cow", "lion"], "answer": "0", "image": embedded()}])
    data, scores = _score("ai2d", tmp_path / "ai2d", tmp_path, {"0": "A", "1": "B.", "2": "The answer is A"})
    assert data.items[0].prompt == f"Which stage comes first?\nA. egg\nB. larva\nC. pupa\n{CHOICE_PROMPT}"
    assert data.items[1].answer["letter"] == "B"  # the answer is the option's index, not its text "1"
    assert scores == APPROX({"accuracy": 2 / 3, "unparsed": 1.0})


def test_realworldqa_parquet(tmp_path):
    letter = "Please answer directly with only the letter of the correct option and nothing else."
    word = "Please answer directly with a single word or number."
    write_parquet(tmp_path / "rwqa/test-00000-of-00002.parquet", [
        {"image": embedded(), "question": f"Which way is the car facing?\nA. Left\nB. Straight\nC. Right\n{letter}",
         "answer": "B"},
        {"image": embedded(), "question": f"Where is the sign?\nA. Left\nB. Right\n{letter}", "answer": "B"}])
    write_parquet(tmp_path / "rwqa/test-00001-of-00002.parquet", [
        {"image": embedded(), "question": f"How many cars are there? {word}", "answer": "3"},
        {"image": embedded(), "question": f"Is the road uphill or downhill? {word}", "answer": "Downhill"}])
    predictions = {"0": "B", "1": "Right", "2": "3.", "3": "downhill slope"}
    data, scores = _score("realworldqa", tmp_path / "rwqa", tmp_path, predictions)
    assert data.items[0].prompt.endswith(f"C. Right\n{letter}")  # asked verbatim
    assert data.items[0].answer["options"] == ("Left", "Straight", "Right") and data.items[2].answer_type == "short"
    # letters: B right, "Right" names option B; open: "3." is 3, "downhill slope" is not "downhill"
    assert scores == APPROX({"accuracy": 3 / 4, "unparsed": 0.0, "choice/accuracy": 1.0, "open/accuracy": 0.5})
    write_parquet(tmp_path / "bad.parquet", [{"image": embedded(), "question": "Which?\nB. x\nA. y", "answer": "A"}])
    with pytest.raises(BenchmarkError, match=r"bad.parquet: row 0: options 'BA' are not A, B, C"):
        get_benchmark("realworldqa").read(tmp_path / "bad.parquet", tmp_path)


# --- HallusionBench -------------------------------------------------------------------------------


def test_hallusion_label():
    assert [hallusion_label(t) for t in ("Yes, they are.", "No", "yes and no", "I am not sure.", "Yes.")] == \
        ["yes", "no", "unclear", "unclear", "yes"]


def test_hallusionbench_pairs_and_figures(tmp_path):
    write_image(tmp_path / "hallusion_bench/VD/illusion/0_0.png")
    write_image(tmp_path / "hallusion_bench/VD/illusion/0_1.png", GREEN)
    write_image(tmp_path / "hallusion_bench/VS/chart/0_1.png", BLUE)

    def record(category, subcategory, figure, question, gold, filename, visual="1"):
        return {"category": category, "subcategory": subcategory, "visual_input": visual, "set_id": "0",
                "figure_id": figure, "sample_note": "", "question_id": question, "question": f"Question {question}?",
                "gt_answer_details": "", "gt_answer": gold, "filename": filename}

    write_json(tmp_path / "HallusionBench.json", [
        record("VD", "illusion", "0", "0", "1", "./hallusion_bench/VD/illusion/0_0.png"),
        record("VD", "illusion", "0", "1", "0", "./hallusion_bench/VD/illusion/0_0.png"),
        record("VD", "illusion", "1", "0", "0", "./hallusion_bench/VD/illusion/0_1.png", "2"),
        record("VD", "illusion", "1", "1", "1", "./VD/illusion/0_1.png", "2"),  # the other release's paths
        record("VS", "chart", "0", "0", "0", None, "0"),  # no figure
        record("VS", "chart", "1", "0", "1", "./hallusion_bench/VS/chart/0_1.png"),
    ])
    responses = ["Yes, they are.", "No", "Yes", "yes and no", "I am not sure.", "Yes."]
    keys = ["VD_illusion_0_0_0", "VD_illusion_0_0_1", "VD_illusion_0_1_0", "VD_illusion_0_1_1", "VS_chart_0_0_0",
            "VS_chart_0_1_0"]
    data, scores = _score("hallusionbench", tmp_path / "HallusionBench.json", tmp_path, dict(zip(keys, responses)))
    assert [i.question_id for i in data.items] == keys and data.items[4].image is None
    assert data.items[3].image == tmp_path / "hallusion_bench/VD/illusion/0_1.png"
    assert data.items[0].prompt == f"Question 0?\n{SHORT_ANSWER_PROMPT}"
    # right: VD f0 q0 (yes), VD f0 q1 (no), VS f0 (unclear, no figure: right), VS f1 (yes);
    # wrong: VD f1 q0 (yes for no), VD f1 q1 (unclear) -> aAcc 4/6.
    # figures: VD 0_0 all right, VD 0_1 none right, VS 0_1 right (VS 0_0 has no figure) -> fAcc 2/3.
    # pairs: VD q0 (f0 right, f1 wrong), VD q1 (right, wrong), VS q0 (both right) -> qAcc 1/3.
    assert scores == APPROX({"aAcc": 4 / 6, "fAcc": 2 / 3, "qAcc": 1 / 3, "unclear": 2.0, "VD/aAcc": 2 / 4,
                             "VS/aAcc": 1.0})
    write_json(tmp_path / "bad.json", [record("VD", "illusion", "0", "0", "yes", None)])
    with pytest.raises(BenchmarkError, match=r"bad.json: record 0: gt_answer must be '1' \(yes\) or '0' \(no\)"):
        get_benchmark("hallusionbench").read(tmp_path / "bad.json", tmp_path)
    twice = record("VS", "chart", "0", "0", "0", None, "0")
    write_json(tmp_path / "twice.json", [twice, twice])
    with pytest.raises(BenchmarkError, match=r"twice.json: question VS_chart_0_0_0 appears twice"):
        get_benchmark("hallusionbench").read(tmp_path / "twice.json", tmp_path)


def test_unreadable_or_empty_files_are_named(tmp_path):
    (tmp_path / "test-00000-of-00001.parquet").write_bytes(b"not parquet")
    with pytest.raises(BenchmarkError, match=r"test-00000-of-00001.parquet: cannot read the parquet file"):
        get_benchmark("ai2d").read(tmp_path, tmp_path)
    write_json(tmp_path / "empty.json", {"dataset_name": "docvqa", "data": []})
    with pytest.raises(BenchmarkError, match=r"empty.json: no questions"):
        get_benchmark("docvqa").read(tmp_path / "empty.json", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BenchmarkError, match=r"empty: no .parquet files in this directory"):
        get_benchmark("mmmu").read(tmp_path / "empty", tmp_path)


# --- the paper's table ----------------------------------------------------------------------------


def _result(name, headline, metrics, questions):
    return SimpleNamespace(name=name, headline=headline, metrics=metrics, items=[None] * questions)


def test_paper_table_average_and_missing():
    results = [
        _result("pope", "f1", {"f1": 0.8}, 9000),
        _result("textvqa", "accuracy", {"accuracy": 0.5}, 5000),
        _result("mme", "total", {"total": 1400.0, "perception_subtasks": 10.0, "cognition_subtasks": 4.0}, 2374),
        _result("ocrbench", "total", {"total": 300.0}, 1000),
    ]
    summary = suite_summary("paper14", results)
    # TextVQA 50; OCRBench 300 of 1000 -> 30; MME 1400 of 2800 -> 50; POPE 80 -> (50 + 30 + 50 + 80) / 4
    assert [r["percent"] for r in summary["rows"]] == APPROX([50.0, 30.0, 50.0, 80.0])
    assert [r["benchmark"] for r in summary["rows"]] == ["textvqa", "ocrbench", "mme", "pope"]  # the paper's order
    assert summary["average"] == APPROX(52.5) and summary["averaged"] == 4 and summary["benchmarks"] == 14
    assert summary["missing"] == ["docvqa", "chartqa", "mmbench", "seed", "gqa", "mmmu", "ai2d", "realworldqa",
                                  "mmvp", "hallusionbench"]
    lines = format_suite_table(summary).splitlines()
    assert lines[0] == "paper table (paper14): 4 of 14 benchmarks"
    assert [line.split("  ")[0] for line in lines[3:17]] == [row.label for row in PAPER14]
    assert lines[5].split()[-1] == "30.00" and lines[4].split()[-1] == "missing"  # OCRBench; DocVQA
    assert lines[8].split()[-3:] == ["total", "1400.0000", "50.00"]  # MME (sum)
    assert lines[17].split()[-1] == "52.50" and lines[17].startswith("average (4 of 14)")
    assert lines[18].startswith("missing (no files given): docvqa, chartqa,")
    # MME with only the perception subtasks: its maximum is 2000
    partial = _result("mme", "total", {"total": 1000.0, "perception_subtasks": 10.0, "cognition_subtasks": 0.0}, 1)
    assert suite_summary("paper14", [partial])["average"] == APPROX(50.0)
    check_suite("paper14", ["pope", "mmmu"])
    with pytest.raises(ConfigError, match=r"suite paper14 takes the benchmarks textvqa, .*'jsonl' is not one"):
        check_suite("paper14", ["pope", "jsonl"])
