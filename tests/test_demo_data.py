"""The synthetic demo corpus: determinism, LLaVA layout, answers true of the drawn scene, tokenizer."""

from collections import Counter
import dataclasses
import json
import os
from pathlib import Path
import re
import string
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from demo import data as demo
from megatron_asvr.tokenizers import Turn, get_template, load_text_tokenizer, place_image_tags

REPO = Path(__file__).resolve().parents[1]
TINY = demo.DemoConfig.tiny()
SHORT = "Answer the question using a single word or phrase."
CHOICE = "Answer with the option's letter from the given choices directly."
# Written out here rather than imported, so the checks do not reuse the generator's tables.
GRID_NAMES = [["top left", "top", "top right"], ["left", "center", "right"], ["bottom left", "bottom", "bottom right"]]
PHRASES = {
    "top left": "in the top left corner",
    "top": "at the top",
    "top right": "in the top right corner",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left corner",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right corner",
}
NUMBERS = {"a": 1, "an": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9}
# Area of each shape over the area of its circumscribed disc (radius r): circle 1; square of
# half-side 0.8 r: 2.56 / pi; equilateral triangle: (3 sqrt(3) / 4) / pi; five-pointed star with
# inner radius 0.45 r: 5 * 0.45 * sin(36 deg) / pi.
FILL_OF_DISC = {
    "circle": 1.0,
    "square": 2.56 / np.pi,
    "triangle": 3 * np.sqrt(3) / 4 / np.pi,
    "star": 5 * 0.45 * np.sin(np.pi / 5) / np.pi,
}
SIDES = {"circle": 0, "triangle": 3, "square": 4, "star": 10}
MIXES = {
    frozenset(("red", "blue")): "purple",
    frozenset(("red", "yellow")): "orange",
    frozenset(("blue", "yellow")): "green",
}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "tiny"
    summary = demo.make_demo_data(out, TINY)
    assert (summary.pretrain_records, summary.instruct_records, summary.text_only_records) == (12, 13, 1)
    assert (summary.eval_questions, summary.vocab_size) == (12, 512)
    return out


def _load(corpus: Path):
    pretrain = json.loads((corpus / "pretrain.json").read_text())
    instruct = json.loads((corpus / "instruct.json").read_text())
    evaluation = [json.loads(line) for line in (corpus / "eval.jsonl").read_text().splitlines()]
    scenes = json.loads((corpus / "scenes.json").read_text())
    return pretrain, instruct, evaluation, scenes


def test_same_seed_is_byte_identical_and_larger_corpus_extends_it(corpus, tmp_path):
    demo.make_demo_data(tmp_path / "again", TINY)
    first = _files(corpus)
    assert len(first) == 12 + 4 + 7 and _files(tmp_path / "again") == first  # images + OUTPUT_NAMES files

    demo.make_demo_data(tmp_path / "seed1", dataclasses.replace(TINY, seed=1))
    assert _files(tmp_path / "seed1")["images/train/000000.jpg"] != first["images/train/000000.jpg"]

    demo.make_demo_data(tmp_path / "bigger", dataclasses.replace(TINY, train_images=14))
    bigger = _files(tmp_path / "bigger")
    assert all(bigger[f"images/train/{i:06d}.jpg"] == first[f"images/train/{i:06d}.jpg"] for i in range(12))
    assert json.loads(bigger["pretrain.json"])[:12] == json.loads(first["pretrain.json"])


def _check_turns(conversations: list[dict]) -> None:
    assert len(conversations) >= 2 and len(conversations) % 2 == 0
    assert [turn["from"] for turn in conversations] == ["human", "gpt"] * (len(conversations) // 2)
    assert all(set(turn) == {"from", "value"} and turn["value"].strip() for turn in conversations)


def test_llava_layout(corpus):
    pretrain, instruct, evaluation, scenes = _load(corpus)
    assert [r["image"] for r in pretrain] == [f"train/{i:06d}.jpg" for i in range(12)]
    for record in pretrain:
        assert set(record) == {"id", "image", "conversations"} and (corpus / "images" / record["image"]).is_file()
        _check_turns(record["conversations"])
        human = record["conversations"][0]["value"]
        assert len(record["conversations"]) == 2 and human.count("<image>") == 1
        assert human.startswith("<image>\n") or human.endswith("\n<image>")

    with_image = [r for r in instruct if "image" in r]
    text_only = [r for r in instruct if "image" not in r]
    assert [r["image"] for r in with_image] == [f"train/{i:06d}.jpg" for i in range(12)]
    assert len(text_only) == TINY.text_only_records == 1 and set(text_only[0]) == {"id", "conversations"}
    assert len({r["id"] for r in instruct}) == len(instruct)
    for record in instruct:
        _check_turns(record["conversations"])
        values = [turn["value"] for turn in record["conversations"]]
        tags = sum(value.count("<image>") for value in values)
        assert tags == ("image" in record) and (tags == 0 or values[0].startswith("<image>\n"))

    assert set(scenes) == {f"train/{i:06d}.jpg" for i in range(12)} | {f"eval/{i:06d}.jpg" for i in range(4)}
    assert [row["question_id"] for row in evaluation] == [f"eval-{i:06d}-{k}" for i in range(4) for k in range(3)]
    for row in evaluation:
        assert set(row) == {"question_id", "image", "text", "answer", "category", "options"}
        assert row["image"].startswith("eval/") and "<image>" not in row["text"]
    per_image = Counter((row["image"], row["category"]) for row in evaluation)
    assert max(per_image.values()) == 1  # distinct categories per held-out image


def _expected_cell(obj: dict, scene: dict) -> str:
    """The position name from the pixel centre, independent of the generator's cell bookkeeping."""
    column = obj["center"][0] * 3 // scene["width"]
    row = obj["center"][1] * 3 // scene["height"]
    return GRID_NAMES[row][column]


def _at(scene: dict, phrase: str) -> dict:
    (obj,) = [o for o in scene["objects"] if PHRASES[_expected_cell(o, scene)] == phrase]
    return obj


def _count(scene: dict, shape: str | None = None, color: str | None = None) -> int:
    return sum(shape in (None, o["shape"]) and color in (None, o["color"]) for o in scene["objects"])


def _check_caption(caption: str, scene: dict, colors: bool = True) -> None:
    """Every shape named (with its colour unless ``colors`` is false), counts and positions true."""
    background = f"{'noisy' if scene['noisy'] else 'plain'} {scene['background']} background."
    assert caption.endswith(f"on a {background}")
    color_word = r"(\w+) " if colors else r"()"
    numbers = "an?|two|three|four|five|six|seven|eight|nine"
    mentions = re.findall(rf"\b({numbers}) {color_word}(circle|square|triangle|star)s?"
                          r"( (?:in|at|on) the [a-z ]+?)?(?=,| and| on a)", caption.lower())
    found = Counter()
    for amount, color, shape, phrase in mentions:
        found[color, shape] += NUMBERS[amount]
        if phrase:
            obj = _at(scene, phrase.strip())
            assert obj["shape"] == shape and (not colors or obj["color"] == color)
    assert found == Counter((o["color"] if colors else "", o["shape"]) for o in scene["objects"])
    assert colors or not any(color in caption.lower() for color in demo.COLORS)


def _unique(scene: dict, shape: str, color: str | None = None) -> dict:
    (obj,) = [o for o in scene["objects"] if o["shape"] == shape and color in (None, o["color"])]
    return obj


def _choice_truth(question: str, scene: dict) -> tuple[str, str]:
    match = re.fullmatch(r"What color is the (\w+) (.+)\?", question)
    obj = _at(scene, match[2])
    assert obj["shape"] == match[1]
    return "choice color", obj["color"]


# label -> (question pattern, answer from the match and the scene)
QUESTIONS = {
    "color at": (r"What color is the shape (.+)\?", lambda m, s: _at(s, m[1])["color"]),
    "color of": (r"What color is the (\w+)\?", lambda m, s: _unique(s, m[1])["color"]),
    "count all": (r"How many shapes are there\?", lambda m, s: str(_count(s))),
    "count color": (r"How many (\w+) shapes are there\?", lambda m, s: str(_count(s, color=m[1]))),
    "count shape": (r"How many (\w+)s are there\?", lambda m, s: str(_count(s, shape=m[1]))),
    "where": (r"Where is the (\w+) (\w+)\?", lambda m, s: _expected_cell(_unique(s, m[2], m[1]), s)),
    "is there": (r"Is there an? (\w+) (\w+) in the image\?", lambda m, s: "yes" if _count(s, m[2], m[1]) else "no"),
    "sides": (r"How many sides does an? (\w+) have\?", lambda m, s: str(SIDES[m[1]])),
    "sum": (
        r"If there are (\d+) \w+ and (\d+) \w+, how many shapes are there in total\?",
        lambda m, s: str(int(m[1]) + int(m[2])),
    ),
    "mix": (r"What color do you get by mixing (\w+) and (\w+)\?", lambda m, s: MIXES[frozenset((m[1], m[2]))]),
}


def _answer(question: str, options: list[str], scene: dict | None) -> tuple[str, str]:
    """(label, answer) of one generated question, re-derived from the scene or world knowledge."""
    if options:
        label, truth = _choice_truth(question, scene)
        return label, "ABCD"[options.index(truth)]
    for label, (pattern, derive) in QUESTIONS.items():
        if match := re.fullmatch(pattern, question):
            return label, derive(match, scene).capitalize()
    raise AssertionError(f"unrecognised question {question!r}")


def _split_prompt(value: str) -> tuple[str, list[str], str | None]:
    """(question, options, format prompt) of a human turn without its image tag."""
    lines = value.removeprefix("<image>\n").split("\n")
    if lines[-1] == CHOICE:
        options = [line[3:] for line in lines[1:-1]]
        assert [line[:3] for line in lines[1:-1]] == ["A. ", "B. ", "C. ", "D. "]
        return lines[0], options, CHOICE
    if lines[-1] == SHORT:
        assert len(lines) == 2
        return lines[0], [], SHORT
    assert len(lines) == 1
    return lines[0], [], None


def test_answers_match_the_drawn_scene(corpus):
    pretrain, instruct, evaluation, scenes = _load(corpus)
    for record in pretrain:
        _check_caption(record["conversations"][1]["value"], scenes[record["image"]])
    asked = Counter()
    for record in instruct:
        scene = scenes.get(record.get("image"))
        turns = record["conversations"]
        for human, gpt in zip(turns[::2], turns[1::2]):
            question, options, prompt = _split_prompt(human["value"])
            if prompt is None:  # a description request: the answer is a caption
                assert scene is not None and question.endswith(".")
                _check_caption(gpt["value"], scene)
                asked["describe"] += 1
                continue
            label, answer = _answer(question, options, scene)
            assert gpt["value"] == answer, (record["id"], question)
            asked[label] += 1
    for row in evaluation:
        question, options, prompt = _split_prompt(row["text"])
        assert prompt is not None and options == row["options"]
        label, answer = _answer(question, options, scenes[row["image"]])
        assert row["answer"] == answer, row["question_id"]
        asked[label] += 1
    # Every kind of image question occurs, so none of the checks above is vacuous.
    image_labels = {"color at", "color of", "count all", "count color", "count shape", "where", "is there"}
    assert image_labels | {"choice color", "describe"} <= set(asked)
    assert asked["sides"] + asked["sum"] + asked["mix"] >= 1


def test_images_show_the_scene(corpus):
    _, _, _, scenes = _load(corpus)
    for name, scene in scenes.items():
        pixels = np.asarray(Image.open(corpus / "images" / name).convert("RGB")).astype(np.float64)  # [h, w, 3]
        assert pixels.shape == (scene["height"], scene["width"], 3)
        ys, xs = np.mgrid[0 : scene["height"], 0 : scene["width"]]
        outside = np.ones(pixels.shape[:2], dtype=bool)
        for obj in scene["objects"]:
            x, y = obj["center"]
            assert _expected_cell(obj, scene) == obj["position"]
            centre = pixels[y - 2 : y + 3, x - 2 : x + 3].mean(axis=(0, 1))
            assert np.abs(centre - demo.COLORS[obj["color"]]).max() <= 12, (name, obj)
            outside &= (xs - x) ** 2 + (ys - y) ** 2 > (obj["radius"] + 2) ** 2
            disc = (xs - x) ** 2 + (ys - y) ** 2 <= obj["radius"] ** 2
            painted = np.abs(pixels[disc] - demo.COLORS[obj["color"]]).max(axis=1) <= 40
            # |error| <= 0.073 measured on 884 shapes of the default corpus (edges, JPEG, int sizes)
            assert abs(painted.mean() - FILL_OF_DISC[obj["shape"]]) <= 0.1, (name, obj, painted.mean())
        expected = np.array(demo.BACKGROUNDS[scene["background"]], dtype=np.float64)
        if scene["noisy"]:  # uniform noise, clipped to [0, 255]: white's mean drops by ~3
            noise = np.arange(-demo.NOISE_AMPLITUDE, demo.NOISE_AMPLITUDE + 1)
            expected = np.clip(expected[:, None] + noise, 0, 255).mean(axis=1)
        assert np.abs(pixels[outside].mean(axis=0) - expected).max() <= 2, name
        if scene["noisy"]:
            assert pixels[outside].std(axis=0).min() >= 6  # 16.5 unclipped, ~9 on white after JPEG
        else:
            assert pixels[outside].std(axis=0).max() <= 3


def test_tokenizer_has_llama_conventions(corpus):
    sp = spm.SentencePieceProcessor(model_file=str(corpus / "tokenizer.model"))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert sp.id_to_piece([0, 1, 2, 3, 258]) == ["<unk>", "<s>", "</s>", "<0x00>", "<0xFF>"]
    assert sp.vocab_size() == 512
    assert sp.encode("é") == [sp.piece_to_id("▁"), 3 + 0xC3, 3 + 0xA9]  # byte fallback
    assert sp.encode("How many", out_type=str)[0].startswith("▁")  # dummy prefix
    assert sp.encode("12", out_type=str) == ["▁", "1", "2"]  # digits split
    printable = string.digits + string.ascii_letters + string.punctuation
    assert not any(3 <= i <= 258 for i in sp.encode(" ".join(printable)))  # ASCII needs no byte pieces

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((corpus / "tokenizer.model").read_bytes())
    assert proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE
    assert proto.trainer_spec.byte_fallback and proto.normalizer_spec.add_dummy_prefix
    assert proto.normalizer_spec.name == "identity" and not proto.normalizer_spec.remove_extra_whitespaces

    pretrain, instruct, _, _ = _load(corpus)
    lines = demo.template_text(pretrain, "plain") + demo.template_text(instruct, "vicuna_v1")
    assert "A chat between a curious user and an artificial intelligence assistant." in lines[len(pretrain)]
    pieces = [sp.encode(line) for line in lines]
    assert all(sp.unk_id() not in ids and sp.decode(ids) == line for ids, line in zip(pieces, lines))
    # The merges were learnt from this text: 0.334 pieces per character measured (1.0 without merges).
    assert sum(map(len, pieces)) / sum(map(len, lines)) < 0.4


def test_stage_templates_tokenize_every_record(corpus):
    """LLaVA's round counting agrees with the real tokenization on every record (no mismatch),
    and exactly the answers (plus the caption's newline / each round's </s>) are supervised."""
    tokenizer = load_text_tokenizer(corpus)  # tokenizer.model + tokenizer_config.json
    assert tokenizer.legacy is True
    pretrain, instruct, _, _ = _load(corpus)
    for name, records in (("plain", pretrain), ("vicuna_v1", instruct)):
        for record in records:
            turns = place_image_tags(tuple(Turn(t["from"], t["value"]) for t in record["conversations"]))
            tokens = get_template(name).tokenize(turns, tokenizer)
            supervised = tokens.input_ids[tokens.loss_mask == 1].tolist()
            answers = [t["value"] for t in record["conversations"][1::2]]
            if name == "plain":
                assert tokenizer.decode(supervised) == answers[0] + "\n"
            else:
                assert supervised.count(tokenizer.eos_id) == len(answers) and supervised[-1] == tokenizer.eos_id
                rounds = np.split(np.array(supervised), np.flatnonzero(np.array(supervised) == tokenizer.eos_id) + 1)
                assert [tokenizer.decode(r.tolist()) for r in rounds[:-1]] == answers


def test_bad_config_and_existing_output_are_refused(corpus):
    with pytest.raises(ValueError, match="max_objects must be in 1..9"):
        demo.DemoConfig(max_objects=10)
    with pytest.raises(ValueError, match="vocab_size must be >= 384"):
        demo.DemoConfig(vocab_size=100)
    with pytest.raises(FileExistsError, match="already holds images, language.json, pretrain.json"):
        demo.make_demo_data(corpus, TINY)


def test_tool_writes_the_same_corpus_and_reports_errors(corpus, tmp_path):
    tool = [sys.executable, str(REPO / "tools/make_demo_data.py"), "--preset", "tiny"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([*tool, "--out", str(tmp_path / "cli")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["instruct_records"] == 13
    assert _files(tmp_path / "cli") == _files(corpus)

    again = subprocess.run([*tool, "--out", str(tmp_path / "cli")], env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "already holds" in again.stderr and "Traceback" not in again.stderr

    # The demo copies its pretrained LLM's tokenizer instead of fitting one; nothing else changes.
    llm = REPO / "assets/demo_llm"
    copied = subprocess.run([*tool, "--out", str(tmp_path / "llm"), "--tokenizer", str(llm)], env=env,
                            capture_output=True, text=True)
    assert copied.returncode == 0, copied.stderr
    assert (tmp_path / "llm/tokenizer.model").read_bytes() == (llm / "tokenizer.model").read_bytes()
    changed = {name for name, digest in _files(tmp_path / "llm").items() if _files(corpus).get(name) != digest}
    assert changed == {"tokenizer.model"}
    missing = subprocess.run([*tool, "--out", str(tmp_path / "none"), "--tokenizer", str(tmp_path / "no_llm")],
                             env=env, capture_output=True, text=True)
    assert missing.returncode == 2 and "no_llm: not a readable SentencePiece model" in missing.stderr
    assert "Traceback" not in missing.stderr and not (tmp_path / "none").exists()


def test_language_records_describe_a_scene_then_ask_about_it(corpus):
    """Stage 0: text only; the first turn is a full caption (colours and positions), and every
    colour-at-a-position question is answered as the caption says."""
    language = json.loads((corpus / "language.json").read_text())
    assert len(language) == TINY.language_records and all("image" not in r for r in language)
    checked = 0
    for record in language:
        context, first = record["conversations"][0]["value"].split("\n", 1)
        assert context.endswith("background.") and not first.startswith(context)
        said = {phrase: color for color, phrase in re.findall(
            r"\b(\w+) (?:circle|square|triangle|star) ((?:in|at|on) the [a-z ]+?)(?=,| and| on a)", context.lower())}
        assert said and all(color in demo.COLORS for color in said.values())
        turns = record["conversations"]
        turns = [{"value": first}] + turns[1:]
        for human, gpt in zip(turns[::2], turns[1::2]):
            if match := re.match(r"What color is the shape (.+)\?", human["value"]):
                assert gpt["value"] == said[match[1]].capitalize()
                checked += 1
    assert checked > 0


def test_categories_restrict_the_questions(tmp_path):
    config = dataclasses.replace(TINY, categories=("color",), eval_questions_per_image=1, max_objects=1)
    demo.make_demo_data(tmp_path, config)
    instruct = json.loads((tmp_path / "instruct.json").read_text())
    evaluation = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    questions = [t["value"] for r in instruct if "image" in r for t in r["conversations"][::2]]
    assert questions and all("What color is the" in q for q in questions)
    assert len(evaluation) == TINY.eval_images and {row["category"] for row in evaluation} == {"color"}
    with pytest.raises(ValueError, match="categories must name some of"):
        demo.DemoConfig(categories=("describe",))
    with pytest.raises(ValueError, match=r"eval_questions_per_image must be in 1..1"):
        demo.DemoConfig(categories=("color", "position"), eval_questions_per_image=2)


def test_captions_can_leave_the_colours_out(tmp_path):
    """The experiment's stage-1 captions: shapes, counts and positions, no colour."""
    demo.make_demo_data(tmp_path, dataclasses.replace(TINY, caption_colors=False))
    pretrain, _, _, scenes = _load(tmp_path)
    for record in pretrain:
        _check_caption(record["conversations"][1]["value"], scenes[record["image"]], colors=False)
