"""The bad-case fixture set: every problem gets its reason and outcome, nothing crashes or vanishes."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.fixtures import llama2_tokenizer_model
from tests.support.tools import load_tool
from megatron_asvr.data.llava import DataFileError, read_records
from megatron_asvr.config.tools import PreprocessConfig, ValidationConfig
from megatron_asvr.data.preprocess import PreprocessFailed, preprocess
from megatron_asvr.data.shards import SHARD_MANIFEST, ShardDataset
from megatron_asvr.tokenizers.templates import IMAGE_PLACEHOLDER, Turn, get_template, place_image_tags
from megatron_asvr.tokenizers.text import SentencePieceTokenizer

MODEL = llama2_tokenizer_model()
ROOT = Path(__file__).resolve().parents[1]


def qa(question="<image>\nWhat is it?", answer="A cat."):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def write_images(root: Path) -> None:
    """One image per case, a few pixels each."""
    for folder in ("coco", "gqa", "ocr_vqa", "vg"):
        (root / folder).mkdir(parents=True)
    rgb = Image.new("RGB", (32, 24), (200, 30, 30))
    rgb.save(root / "coco/good.jpg")
    rgb.save(root / "coco/good2.jpg")
    Image.new("L", (32, 24), 90).save(root / "coco/gray.jpg")
    Image.new("CMYK", (32, 24), (0, 50, 100, 0)).save(root / "coco/cmyk.jpg")
    Image.new("RGBA", (32, 24), (0, 0, 255, 128)).save(root / "coco/alpha.png")
    rgb.save(root / "ocr_vqa/png_data.jpg", format="PNG")
    rgb.save(root / "ocr_vqa/gif_data.jpg", format="GIF")
    (root / "gqa/empty.jpg").write_bytes(b"")
    noise = np.random.default_rng(0).integers(0, 256, (90, 90, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "gqa/whole.jpg")
    data = (root / "gqa/whole.jpg").read_bytes()
    (root / "gqa/truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "gqa/garbage.jpg").write_bytes(b"this is not an image at all" * 10)
    Image.new("RGB", (4, 4)).save(root / "vg/tiny.png")
    Image.new("RGB", (120, 100)).save(root / "vg/huge.png")
    Image.new("RGB", (32, 24)).save(root.parent / "outside.jpg")


# id -> (image field or None, conversations); the expected verdicts are in EXPECTED
RECORDS = [
    ("good", "coco/good.jpg", qa()),
    ("gray", "coco/gray.jpg", qa()),
    ("cmyk", "coco/cmyk.jpg", qa()),
    ("alpha", "coco/alpha.png", qa()),
    ("png_as_jpg", "ocr_vqa/png_data.jpg", qa()),
    ("gif_as_jpg", "ocr_vqa/gif_data.jpg", qa()),
    ("missing", "coco/nope.jpg", qa()),
    ("zero_byte", "gqa/empty.jpg", qa()),
    ("truncated", "gqa/truncated.jpg", qa()),
    ("garbage", "gqa/garbage.jpg", qa()),
    ("tiny", "vg/tiny.png", qa()),
    ("huge", "vg/huge.png", qa()),
    ("two_tags_one_image", "coco/good.jpg", qa("<image>\n<image>\nWhat is it?")),
    ("untagged", "coco/good.jpg", qa("What is it?")),
    ("tag_in_answer", "coco/good.jpg", qa("What is it?", "<image> A cat.")),
    ("human_human", None, [{"from": "human", "value": "Hi"}, {"from": "human", "value": "Hi?"}]),
    ("leading_gpt", None, [{"from": "gpt", "value": "Welcome."}] + qa("Hi", "Hello.")),
    ("unanswered", None, qa("Hi", "Hello.") + [{"from": "human", "value": "And?"}]),
    ("empty_answer", "coco/good.jpg", qa(answer="  ")),
    ("too_long", "coco/good.jpg", qa("<image>\n" + "Describe every detail. " * 250)),
    ("non_utf8", "coco/good.jpg", qa(answer="A cat @@BAD@@.")),
    ("good", "coco/good.jpg", qa()),  # identical repeat
    ("good", "coco/good2.jpg", qa(answer="Another cat.")),  # same id, other content
    ("escapes", "../outside.jpg", qa()),
    ("absolute", "/etc/passwd", qa()),
    ("assistant_in_answer", "coco/good.jpg", qa(answer="Fine. ASSISTANT: again")),
    ("text_only", None, qa("Hello! How are you?", "I am fine, thanks.")),
    (None, "coco/good.jpg", qa()),  # no id
    ("no_conversations", "coco/good.jpg", None),
    ("two_images", ["coco/good.jpg", "coco/good2.jpg"], qa("<image>\n<image>\nCompare them.")),
    ("tag_without_image", None, qa("<image>\nWhat is it?")),
    ("unknown_role", None, [{"from": "system", "value": "x"}] + qa("Hi", "Hello.")),
]

# (id, file location) -> (written?, {reason: outcome})
EXPECTED = {
    "good": (True, {}),
    "gray": (True, {"converted_mode": "fixed"}),
    "cmyk": (True, {"converted_mode": "fixed"}),
    "alpha": (True, {"converted_mode": "fixed"}),
    "png_as_jpg": (True, {"format_mismatch": "fixed"}),
    "gif_as_jpg": (True, {"format_mismatch": "fixed", "converted_mode": "fixed"}),
    "missing": (False, {"missing_image": "skipped"}),
    "zero_byte": (False, {"zero_byte_image": "skipped"}),
    "truncated": (False, {"undecodable_image": "skipped"}),
    "garbage": (False, {"undecodable_image": "skipped"}),
    "tiny": (False, {"image_too_small": "skipped"}),
    "huge": (False, {"image_too_large": "skipped"}),
    "two_tags_one_image": (False, {"image_tag_count_mismatch": "skipped"}),
    "untagged": (True, {"image_without_tag": "fixed"}),
    "tag_in_answer": (False, {"image_tag_in_answer": "skipped"}),
    "human_human": (False, {"roles_out_of_order": "skipped"}),
    "leading_gpt": (True, {"roles_out_of_order": "fixed"}),
    "unanswered": (False, {"roles_out_of_order": "skipped"}),
    "empty_answer": (False, {"empty_turn": "skipped"}),
    "too_long": (False, {"too_long": "skipped"}),
    "non_utf8": (False, {"non_utf8_text": "skipped"}),
    "good@[21]": (False, {"duplicate_id": "skipped"}),
    "good#2": (True, {"duplicate_id": "fixed"}),
    "escapes": (False, {"path_escapes_root": "skipped"}),
    "absolute": (False, {"path_escapes_root": "skipped"}),
    "assistant_in_answer": (False, {"tokenization_mismatch": "skipped"}),
    "text_only": (True, {}),
    "records.json[27]": (True, {"missing_id": "fixed"}),
    "no_conversations": (False, {"malformed_record": "skipped"}),
    "two_images": (True, {"image_list": "assumed"}),
    "tag_without_image": (False, {"image_tag_count_mismatch": "skipped"}),
    "unknown_role": (False, {"malformed_record": "skipped"}),
}


def write_records(path: Path) -> None:
    records = []
    for rid, image, conversations in RECORDS:
        record = {} if rid is None else {"id": rid}
        if image is not None:
            record["image"] = image
        if conversations is not None:
            record["conversations"] = conversations
        records.append(record)
    text = json.dumps(records, ensure_ascii=False, indent=1).encode("utf-8")
    path.write_bytes(text.replace(b"@@BAD@@", b"\xff\xfe"))  # invalid UTF-8 inside one record


def config(tmp_path, data, **overrides):
    validation = ValidationConfig(
        image_root=tmp_path / "images",
        max_seq_length=overrides.pop("max_seq_length", 1600),
        image_tokens=729,
        min_image_side=8,
        max_image_pixels=10_000,
        **{k: overrides.pop(k) for k in ("too_long", "strict") if k in overrides},
    )
    return PreprocessConfig(
        inputs=tuple(data),
        output_dir=tmp_path / "out",
        tokenizer=MODEL,
        template=overrides.pop("template", "vicuna_v1"),
        validation=validation,
        progress=False,
        **overrides,
    )


@pytest.fixture()
def fixture_set(tmp_path):
    write_images(tmp_path / "images")
    write_records(tmp_path / "records.json")
    return tmp_path


def verdicts(report) -> dict:
    """(record key) -> {reason: outcome}, the key as in EXPECTED."""
    found = {}
    for reason, entry in report["by_reason"].items():
        assert not entry["records_truncated"]
        for record in entry["records"]:
            key = record["id"]
            if reason == "duplicate_id" and record["outcome"] == "skipped":
                key = f"{record['id']}@{record['location']}"
            found.setdefault(key, {})[reason] = record["outcome"]
    return found


def test_every_bad_case_is_named(fixture_set):
    report = preprocess(config(fixture_set, [(None, fixture_set / "records.json")], max_skip_fraction=1.0))
    expected_problems = {key: problems for key, (_, problems) in EXPECTED.items() if problems}
    assert verdicts(report) == expected_problems
    written = {key for key, (kept, _) in EXPECTED.items() if kept}
    dataset = ShardDataset(fixture_set / "out")
    assert {s.id for s in (dataset[i] for i in range(len(dataset)))} == written
    assert report["total_records"] == len(RECORDS) == report["written"] + report["skipped"]
    assert (report["written"], report["skipped"], report["errors"]) == (len(written), len(RECORDS) - len(written), 0)
    assert report["written_with_fixes"] == 9
    assert report["written_with_assumptions"] == 1
    counts = dict(fixed=0, assumed=0, error=0)
    assert report["by_source"]["gqa"] == {"records": 3, "written": 0, "skipped": 3, **counts}
    assert report["by_source"]["text"] == {"records": 6, "written": 2, "skipped": 4, **counts, "fixed": 1}
    assert report["by_source"]["records"]["records"] == 2  # image paths outside the root: the file's stem
    assert sum(s["records"] for s in report["by_source"].values()) == len(RECORDS)
    assert json.loads((fixture_set / "out" / "report.json").read_text())["by_reason"] == report["by_reason"]
    details = {(r["id"], reason): r["detail"] for reason, e in report["by_reason"].items() for r in e["records"]}
    assert details["cmyk", "converted_mode"] == "coco/cmyk.jpg: CMYK -> RGB"
    assert details["gif_as_jpg", "format_mismatch"] == "ocr_vqa/gif_data.jpg holds GIF data (decoded by content)"
    assert details["gif_as_jpg", "converted_mode"] == "ocr_vqa/gif_data.jpg: P -> RGB"
    assert details["too_long", "too_long"] == "2025 positions, max_seq_length is 1600"  # 47 + 250 x 5 text + 729 image
    assert details["good#2", "duplicate_id"] == "id also used by records.json[0] for other content; renamed to good#2"
    assert details["non_utf8", "non_utf8_text"].startswith("record.conversations[1].value is not valid UTF-8")


def test_written_samples_hold_tokens_images_and_sizes(fixture_set):
    preprocess(config(fixture_set, [(None, fixture_set / "records.json")], max_skip_fraction=1.0))
    dataset = ShardDataset(fixture_set / "out")
    samples = {dataset[i].id: dataset[i] for i in range(len(dataset))}
    tokenizer = SentencePieceTokenizer(MODEL)
    expected = get_template("vicuna_v1").tokenize(
        place_image_tags((Turn("human", "<image>\nWhat is it?"), Turn("gpt", "A cat."))), tokenizer
    )
    for rid in ("good", "gray", "untagged", "records.json[27]"):
        np.testing.assert_array_equal(samples[rid].input_ids, expected.input_ids)
        np.testing.assert_array_equal(samples[rid].loss_mask, expected.loss_mask)
    assert samples["good"].num_positions == len(expected.input_ids) - 1 + 729
    assert (samples["good"].source, samples["good"].images, samples["good"].image_sizes) == (
        "coco", ("coco/good.jpg",), ((32, 24),)
    )
    pair = samples["two_images"]
    assert pair.images == ("coco/good.jpg", "coco/good2.jpg")
    assert pair.input_ids.tolist().count(IMAGE_PLACEHOLDER) == 2
    assert (samples["text_only"].source, samples["text_only"].images) == ("text", ())
    # the leading gpt turn is gone: the text is the plain Hi/Hello round
    hello = get_template("vicuna_v1").render((Turn("human", "Hi"), Turn("gpt", "Hello.")))
    assert samples["leading_gpt"].input_ids.tolist() == tokenizer.encode(hello)


def test_strict_turns_skips_into_errors_and_fails(fixture_set):
    with pytest.raises(PreprocessFailed, match=r"^20 of 32 records have errors; see .*report.json; no shards kept$"):
        preprocess(config(fixture_set, [(None, fixture_set / "records.json")], strict=True))
    report = json.loads((fixture_set / "out" / "report.json").read_text())
    assert report["by_reason"]["tokenization_mismatch"]["error"] == 1
    assert not (fixture_set / "out" / SHARD_MANIFEST).exists()
    assert not list((fixture_set / "out").glob("shard_*"))


def test_max_skip_fraction_fails_with_the_numbers(fixture_set):
    with pytest.raises(PreprocessFailed) as info:
        preprocess(config(fixture_set, [(None, fixture_set / "records.json")], max_skip_fraction=0.5))
    assert str(info.value).startswith(
        "20 of 32 records skipped (62.50%), above --max-skip-fraction 50.00%; see "
    )
    assert not (fixture_set / "out" / SHARD_MANIFEST).exists()


def test_too_long_truncate_keeps_images_whole(fixture_set):
    records = [
        {"id": "long_answer", "conversations": qa("Tell me.", "Words " * 900)},
        {"id": "long_question", "image": "coco/good.jpg", "conversations": qa("<image>\n" + "Why? " * 100)},
        {"id": "late_image", "image": "coco/good.jpg",
         "conversations": qa("Hi " * 40, "Hello.") + qa("<image>\nWhat now?", "Fine.")},
    ]
    (fixture_set / "long.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    cfg = config(fixture_set, [("long", fixture_set / "long.jsonl")], too_long="truncate", max_skip_fraction=1.0,
                 max_seq_length=800)
    report = preprocess(cfg)
    outcomes = {r["id"]: (r["outcome"], r["detail"]) for r in report["by_reason"]["too_long"]["records"]}
    assert outcomes == {
        # BOS + SYSTEM + "▁US ER :" + "▁Tell ▁me ." + ASSISTANT = 42, then 900 x "▁Word s", "▁", </s>
        "long_answer": ("fixed", "1844 positions, max_seq_length is 800; truncated to 800"),
        # BOS + SYSTEM + USER + "▁" + image(729) + "▁ <0x0A>" + 100 x "Why ?" + ASSISTANT + "▁A ▁cat ." + </s>
        "long_question": ("skipped", "%d positions, max_seq_length is 800; truncating would leave no answer" % (
            1 + 30 + 3 + 1 + 729 + 2 + 200 + 5 + 3 + 1)),
        # round 0: BOS + SYSTEM + USER + 40 x "▁Hi" + "▁" (double space) + ASSISTANT + "▁Hello ." + </s>;
        # round 1: USER + "▁" + image(729) + "▁ <0x0A> What ▁now ?" + ASSISTANT + "▁Fine ." + </s>
        "late_image": ("skipped", "%d positions, max_seq_length is 800; truncating would cut an image" % (
            1 + 30 + 3 + 41 + 5 + 2 + 1 + 3 + 1 + 729 + 5 + 5 + 2 + 1)),
    }
    sample = ShardDataset(fixture_set / "out")[0]
    assert (sample.id, sample.num_positions, len(sample.input_ids), int(sample.loss_mask.sum())) == (
        "long_answer", 800, 800, 800 - 42
    )
    assert report["by_source"] == {"long": {"records": 3, "written": 1, "fixed": 1, "assumed": 0, "skipped": 2,
                                            "error": 0}}


def test_every_deviation_from_the_format_is_named(fixture_set):
    """Records kept although they are not quite LLaVA's format: each deviation named with how it was read."""
    tagged_last = qa("What is it?\n<image>")
    tagged_last[0]["weight"] = 1.0
    records = [
        {"id": 7, "image": "./coco//good.jpg", "conversations": tagged_last, "source_url": "http://x"},
        {"id": "null_image", "image": None, "conversations": qa("Hi", "Hello.")},
        {"id": "empty_list", "image": [], "conversations": qa("Hi", "Hello.")},
        {"id": "plain", "image": "coco/good.jpg", "conversations": qa()},
    ]
    (fixture_set / "odd.json").write_text(json.dumps(records))
    report = preprocess(config(fixture_set, [("odd", fixture_set / "odd.json")]))
    named = {(r["id"], reason, r["outcome"], r["detail"])
             for reason, entry in report["by_reason"].items() for r in entry["records"]}
    assert named == {
        ("7", "numeric_id", "assumed", "id 7 is a number: read as the string '7'"),
        ("7", "unknown_fields", "assumed",
         "fields ['source_url'] ignored; conversations[0]: fields ['weight'] ignored"),
        ("7", "image_path_normalized", "assumed", "image path './coco//good.jpg' read as 'coco/good.jpg'"),
        ("7", "image_tag_moved", "assumed",
         "turn 0: <image> put at the turn's start, the rest stripped, as LLaVA-1.5 does"),
        ("null_image", "empty_image_field", "assumed", "'image' is null: read as a text-only record"),
        ("empty_list", "empty_image_field", "assumed", "'image' is []: read as a text-only record"),
    }
    assert (report["written"], report["written_with_assumptions"], report["written_with_fixes"]) == (4, 3, 0)
    assert report["by_source"]["odd"] == {"records": 4, "written": 4, "fixed": 0, "assumed": 3, "skipped": 0,
                                          "error": 0}
    assert report["by_reason"]["unknown_fields"]["assumed"] == 1


def test_plain_template_needs_one_image(fixture_set):
    records = [
        {"id": "caption", "image": "coco/good.jpg", "conversations": qa("Describe.\n<image>", "A red square.")},
        {"id": "chat", "conversations": qa("Hi", "Hello.")},
    ]
    (fixture_set / "pretrain.json").write_text(json.dumps(records))
    report = preprocess(config(fixture_set, [("pretrain", fixture_set / "pretrain.json")], template="plain",
                               max_skip_fraction=1.0))
    assert [r["id"] for r in report["by_reason"]["unsupported_by_template"]["records"]] == ["chat"]
    sample = ShardDataset(fixture_set / "out")[0]
    # BOS, image, "▁A ▁red ▁square . <0x0A>"
    assert sample.input_ids.tolist() == [1, IMAGE_PLACEHOLDER, 319, 2654, 6862, 29889, 13]
    assert sample.loss_mask.tolist() == [0, 0, 1, 1, 1, 1, 1]


def test_reader_keeps_going_past_bad_lines_and_bytes(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"id": "a"}\n\n{"id": "b", oops}\n{"id": "c\xff"}\n[1, 2]\n')
    records = list(read_records(path, "mine"))
    assert [(r.location, r.error is None, r.source) for r in records] == [
        ("line 1", True, "mine"), ("line 3", False, "mine"), ("line 4", True, "mine"), ("line 5", True, "mine"),
    ]
    assert records[1].error == "invalid JSON at column 13: Expecting property name enclosed in double quotes"
    assert records[2].value == {"id": "c\udcff"}


def test_unreadable_json_list_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"id": "a"},\n {"id": "b",, }]')
    with pytest.raises(DataFileError, match=r"broken.json: record \[1\]: invalid JSON at line 2 column 13"):
        list(read_records(path))
    path.write_text('[{"id": "a"} {"id": "b"}]')
    with pytest.raises(DataFileError, match=r"after record \[0\]: expected ',' or '\]' at line 1"):
        list(read_records(path))
    (tmp_path / "images").mkdir()
    with pytest.raises(PreprocessFailed, match="broken.json: after record"):
        preprocess(config(tmp_path, [(None, path)]))
    with pytest.raises(DataFileError, match="nowhere.json: data file not found"):
        list(read_records(tmp_path / "nowhere.json"))
    with pytest.raises(PreprocessFailed, match="nowhere.json: data file not found"):
        preprocess(config(tmp_path, [(None, path), (None, tmp_path / "nowhere.json")]))  # checked up front


def test_tool_prints_one_line_error(fixture_set, capsys):
    tool = load_tool("preprocess")
    args = ["--data", f"mix={fixture_set / 'records.json'}", "--image-root", str(fixture_set / "images"),
            "--tokenizer", str(MODEL), "--template", "vicuna_v1", "--output", str(fixture_set / "out"),
            "--workers", "1", "--no-progress", "--max-seq-length", "1600", "--min-image-side", "8",
            "--max-image-pixels", "10000"]
    with pytest.raises(SystemExit) as info:
        tool.main(args + ["--max-skip-fraction", "0.1"])
    assert str(info.value).startswith(
        "preprocess: error: 20 of 32 records skipped (62.50%), above --max-skip-fraction 10.00%"
    )
    tool.main(args + ["--max-skip-fraction", "0.7"])
    assert capsys.readouterr().out.startswith("preprocess: 12 samples written (9 with fixes), 20 of 32 records skipped")
    assert ShardDataset(fixture_set / "out").sources == ["mix"]
