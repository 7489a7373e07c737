"""A synthetic but learnable VQA corpus for the demo and the tests: no downloads.

Each image is a 3 x 3 grid with up to ``max_objects`` shapes (circle, square,
triangle, star) in six colours, one shape per cell, on a plain or noisy
background. All text is generated from the render parameters, so every answer
is true of its image. Everything is a function of ``DemoConfig.seed``; each
image and record draws from its own random stream, so a larger corpus starts
with the same images and records as a smaller one.

Output directory written by ``make_demo_data(out_dir, config)``::

    out_dir/
      images/train/000000.jpg ...  rendered scenes of the training split (both stages)
      images/eval/000000.jpg ...   held-out scenes, referenced only by eval.jsonl
      language.json     stage 0, text only: a scene described in words, then questions about it
                        (reading comprehension with the stage-2 questions; teaches the tiny
                        LLM the language first, as real runs start from a pretrained LLM)
      pretrain.json     stage 1, LLaVA-Pretrain layout: one caption record per train image,
                        {"id", "image", "conversations": [{"from": "human", "value":
                        "<image>\\n<describe prompt>"}, {"from": "gpt", "value": caption}]}
                        (a few records put "<image>" after the prompt, as the real 558K does);
                        without ``caption_colors`` captions leave the colours out: a detail
                        the stage-2 questions ask about, for visual supervision to add
      instruct.json     stage 2, LLaVA-665K layout: one multi-turn record per train image
                        (colour, count, position, yes/no and multiple-choice questions, some
                        descriptions) plus ``text_only_fraction`` records with no "image"
      eval.jsonl        one held-out question per line: {"question_id", "image", "text",
                        "answer", "category", "options"}; "text" carries the answer prompt,
                        "answer" is an option letter when "options" is not empty
      scenes.json       {image path: {"width", "height", "background", "noisy",
                        "objects": [{"shape", "color", "position", "center", "radius"}]}}
      tokenizer.model   SentencePiece BPE trained on the training text as the templates render
                        it (plain for stage 1, vicuna_v1 for stage 2), Llama conventions:
                        <unk>=0, <s>=1, </s>=2, no pad, byte fallback, dummy prefix, digits split
      tokenizer_config.json  {"legacy": true, ...}: load the directory with
                        megatron_asvr.tokenizers.load_text_tokenizer(out_dir)

Image paths in the JSON files are relative to ``out_dir/images``.
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass
import io
import json
from pathlib import Path
import string

import numpy as np
from PIL import Image, ImageDraw
import sentencepiece as spm

from megatron_asvr.tokenizers import IMAGE_TAG, Turn, get_template, place_image_tags

SHAPES = ("circle", "square", "triangle", "star")
SIDES = {"circle": 0, "square": 4, "triangle": 3, "star": 10}
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 160, 70),
    "blue": (40, 90, 220),
    "yellow": (240, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 135, 30),
}
MIXES = {("red", "blue"): "purple", ("red", "yellow"): "orange", ("blue", "yellow"): "green"}
BACKGROUNDS = {"white": (245, 245, 245), "beige": (230, 220, 195), "gray": (150, 150, 150), "black": (25, 25, 25)}
SQUARE_HALF_SIDE = 0.8  # half the side of a square over its circumradius
STAR_INNER_RATIO = 0.45  # inner / outer radius of the star's vertices
NOISE_AMPLITUDE = 28  # noisy backgrounds: uniform integer noise in [-28, 28] per channel
# (column, row) of the 3 x 3 grid -> (answer word, phrase used in questions and captions)
POSITIONS = {
    (0, 0): ("top left", "in the top left corner"),
    (1, 0): ("top", "at the top"),
    (2, 0): ("top right", "in the top right corner"),
    (0, 1): ("left", "on the left"),
    (1, 1): ("center", "in the center"),
    (2, 1): ("right", "on the right"),
    (0, 2): ("bottom left", "in the bottom left corner"),
    (1, 2): ("bottom", "at the bottom"),
    (2, 2): ("bottom right", "in the bottom right corner"),
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."
OPTION_LETTERS = "ABCD"
DESCRIBE_PROMPTS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Summarize the visual content of the image.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
)
# the tokenizer learns the text of each stage as its template renders it
STAGE_TEMPLATES = {"language": "vicuna_v1", "pretrain": "plain", "instruct": "vicuna_v1"}
MAX_TURNS = 8
TAG_AFTER_PROMPT_FRACTION = 0.1  # stage-1 records with "<image>" after the prompt
TRAIN_CATEGORY_WEIGHTS = {"color": 3, "count": 2, "position": 2, "yes/no": 2, "choice": 3, "describe": 1}
EVAL_CATEGORIES = ("color", "count", "position", "yes/no", "choice")
MIN_VOCAB_SIZE = 384
# SentencePiece settings of Llama's tokenizer (BPE, byte fallback, no normalisation, digits split).
LLAMA_SPM_OPTIONS = dict(
    model_type="bpe",
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    unk_piece="<unk>",
    bos_piece="<s>",
    eos_piece="</s>",
    byte_fallback=True,
    add_dummy_prefix=True,
    split_digits=True,
    remove_extra_whitespaces=False,
    normalization_rule_name="identity",
    character_coverage=1.0,
    allow_whitespace_only_pieces=True,
    required_chars=string.digits + string.ascii_letters + string.punctuation,  # no byte pieces for ASCII
)
SPLIT_STREAMS = {"train": 0, "eval": 1, "text": 2, "language": 3}  # second word of each random stream's seed


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and knobs of the corpus; the defaults render in seconds on one core."""

    seed: int = 0
    train_images: int = 2000
    eval_images: int = 200
    language_records: int = 2000  # stage 0; their scenes are drawn, never rendered
    caption_colors: bool = True  # stage-1 captions name the colours (the experiment leaves them out)
    categories: tuple[str, ...] = tuple(TRAIN_CATEGORY_WEIGHTS)  # the questions asked (stages 0 and 2, eval)
    eval_questions_per_image: int = 3
    image_sizes: tuple[tuple[int, int], ...] = ((384, 384), (448, 336), (336, 448))  # (width, height)
    max_objects: int = 5
    centered: bool = False  # every shape at its cell's centre and full size (the demo: shapes easier to tell apart)
    noisy_fraction: float = 0.5
    text_only_fraction: float = 0.03
    vocab_size: int = 1000
    jpeg_quality: int = 90

    @classmethod
    def tiny(cls, seed: int = 0) -> "DemoConfig":
        """A corpus small enough for unit tests (well under a second to render)."""
        return cls(seed=seed, train_images=12, eval_images=4, language_records=6, vocab_size=512)

    def __post_init__(self):
        problems = []
        if min(self.train_images, self.eval_images, self.language_records) < 1:
            problems.append("train_images, eval_images and language_records must be >= 1")
        unknown = sorted(set(self.categories) - set(TRAIN_CATEGORY_WEIGHTS))
        if unknown or not self.eval_categories:
            problems.append(f"categories must name some of {EVAL_CATEGORIES} and may add 'describe'; got "
                            f"{self.categories}")
        # A scene may have no shape of a unique colour and kind to ask the position of.
        most = len(self.eval_categories) - ("position" in self.eval_categories)
        if not 1 <= self.eval_questions_per_image <= most:
            problems.append(f"eval_questions_per_image must be in 1..{most}")
        if not self.image_sizes or any(min(size) < 96 for size in self.image_sizes):
            problems.append("image_sizes must be (width, height) pairs of at least 96 pixels")
        if not 1 <= self.max_objects <= len(POSITIONS):
            problems.append(f"max_objects must be in 1..{len(POSITIONS)}")
        if not (0 <= self.noisy_fraction <= 1 and 0 <= self.text_only_fraction <= 1):
            problems.append("noisy_fraction and text_only_fraction must be in [0, 1]")
        if not 1 <= self.jpeg_quality <= 100:
            problems.append("jpeg_quality must be in 1..100")
        if self.vocab_size < MIN_VOCAB_SIZE:
            problems.append(f"vocab_size must be >= {MIN_VOCAB_SIZE} (256 bytes, 3 specials, 95 characters, merges)")
        if problems:
            raise ValueError(f"invalid DemoConfig: {'; '.join(problems)}")

    @property
    def eval_categories(self) -> tuple[str, ...]:
        return tuple(c for c in EVAL_CATEGORIES if c in self.categories)

    @property
    def text_only_records(self) -> int:
        """At least one unless the fraction is 0, so even the tiny corpus has a text-only record."""
        return max(1, round(self.text_only_fraction * self.train_images)) if self.text_only_fraction else 0


@dataclass(frozen=True)
class Shape:
    """One drawn shape."""

    kind: str  # one of SHAPES
    color: str  # a key of COLORS
    cell: tuple[int, int]  # (column, row) in the 3 x 3 grid
    center: tuple[int, int]  # (x, y) in pixels
    radius: int  # circumradius in pixels; the shape never leaves its cell

    @property
    def position(self) -> str:
        return POSITIONS[self.cell][0]

    @property
    def phrase(self) -> str:
        return POSITIONS[self.cell][1]


@dataclass(frozen=True)
class Scene:
    """The render parameters of one image: the ground truth every text about it is made from."""

    width: int
    height: int
    background: str  # a key of BACKGROUNDS
    noisy: bool
    objects: tuple[Shape, ...]  # in reading order of their cells

    def count(self, kind: str | None = None, color: str | None = None) -> int:
        return sum((kind in (None, o.kind)) and (color in (None, o.color)) for o in self.objects)

    def to_json(self) -> dict:
        objects = [
            {"shape": o.kind, "color": o.color, "position": o.position, "center": list(o.center), "radius": o.radius}
            for o in self.objects
        ]
        return {
            "width": self.width,
            "height": self.height,
            "background": self.background,
            "noisy": self.noisy,
            "objects": objects,
        }


@dataclass(frozen=True)
class Question:
    """One generated question with its answer."""

    text: str  # the question alone
    answer: str  # a word or number, an option letter, or a caption for "describe"
    category: str
    options: tuple[str, ...] = ()

    def prompt(self) -> str:
        """The human turn: the question plus LLaVA's answer-format prompt."""
        if self.options:
            lines = [f"{letter}. {option}" for letter, option in zip(OPTION_LETTERS, self.options)]
            return "\n".join([self.text, *lines, CHOICE_PROMPT])
        if self.category == "describe":
            return self.text
        return f"{self.text}\n{SHORT_ANSWER_PROMPT}"


@dataclass(frozen=True)
class DemoSummary:
    """What ``make_demo_data`` wrote."""

    out_dir: str
    train_images: int
    eval_images: int
    language_records: int
    pretrain_records: int
    instruct_records: int
    text_only_records: int
    eval_questions: int
    vocab_size: int


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _plural(kind: str, count: int) -> str:
    return kind if count == 1 else f"{kind}s"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


def sample_scene(config: DemoConfig, rng: np.random.Generator) -> Scene:
    """Draw canvas size, background and non-overlapping shapes, one per grid cell."""
    width, height = _pick(rng, config.image_sizes)
    cell_w, cell_h = width / 3, height / 3
    max_radius = 0.4 * min(cell_w, cell_h)
    cells = sorted(POSITIONS, key=lambda cell: (cell[1], cell[0]))
    chosen = sorted(rng.choice(len(cells), int(rng.integers(1, config.max_objects + 1)), replace=False))
    objects = []
    for index in chosen:
        column, row = cells[index]
        radius = int(max_radius * (1.0 if config.centered else rng.uniform(0.55, 1.0)))
        slack_x, slack_y = (0.0, 0.0) if config.centered else (cell_w / 2 - radius, cell_h / 2 - radius)
        center = (
            int((column + 0.5) * cell_w + rng.uniform(-slack_x, slack_x)),
            int((row + 0.5) * cell_h + rng.uniform(-slack_y, slack_y)),
        )
        objects.append(Shape(_pick(rng, SHAPES), _pick(rng, tuple(COLORS)), (column, row), center, radius))
    noisy = bool(rng.random() < config.noisy_fraction)
    return Scene(width, height, _pick(rng, tuple(BACKGROUNDS)), noisy, tuple(objects))


def _outline(shape: Shape) -> list[tuple[float, float]]:
    """Polygon vertices of a triangle (3 points) or a five-pointed star (10 points), apex up."""
    if shape.kind == "triangle":
        radii = np.full(3, float(shape.radius))
    else:
        radii = shape.radius * np.tile([1.0, STAR_INNER_RATIO], 5)
    angles = -np.pi / 2 + np.arange(len(radii)) * 2 * np.pi / len(radii)
    x, y = shape.center
    return list(zip((x + radii * np.cos(angles)).tolist(), (y + radii * np.sin(angles)).tolist()))


def render_scene(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """Draw the scene; ``rng`` supplies the background noise."""
    background = np.array(BACKGROUNDS[scene.background], dtype=np.int16)
    if scene.noisy:
        noise = rng.integers(-NOISE_AMPLITUDE, NOISE_AMPLITUDE + 1, (scene.height, scene.width, 3), dtype=np.int16)
        canvas = Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8), "RGB")
    else:
        canvas = Image.new("RGB", (scene.width, scene.height), tuple(int(v) for v in background))
    draw = ImageDraw.Draw(canvas)
    for shape in scene.objects:
        fill = COLORS[shape.color]
        x, y, r = *shape.center, shape.radius
        if shape.kind == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif shape.kind == "square":
            half = int(SQUARE_HALF_SIDE * r)
            draw.rectangle((x - half, y - half, x + half, y + half), fill=fill)
        else:
            draw.polygon(_outline(shape), fill=fill)
    return canvas


def describe(scene: Scene, grouped: bool, colors: bool = True) -> str:
    """One sentence naming every shape: each with its position, or grouped with counts;
    with or without the shapes' colours."""
    background = f"{'noisy' if scene.noisy else 'plain'} {scene.background} background"
    if not grouped:
        parts = [f"{_article(o.color)} {o.color} {o.kind} {o.phrase}" if colors else
                 f"{_article(o.kind)} {o.kind} {o.phrase}" for o in scene.objects]
        text = f"{_join(parts)}, on a {background}."
    else:
        groups = dict.fromkeys((o.color if colors else None, o.kind) for o in scene.objects)
        parts = []
        for color, kind in groups:
            count = scene.count(kind, color)
            noun = f"{color} {_plural(kind, count)}" if colors else _plural(kind, count)
            amount = _article(noun) if count == 1 else NUMBER_WORDS[count]
            parts.append(f"{amount} {noun}")
        text = f"{_join(parts)} on a {background}."
    return text[0].upper() + text[1:]


def caption(scene: Scene, rng: np.random.Generator, colors: bool = True) -> str:
    """``describe`` in a form drawn from ``rng``."""
    return describe(scene, bool(rng.random() >= 0.5), colors)


def _ask_color(scene: Scene, rng: np.random.Generator) -> Question:
    shape = _pick(rng, scene.objects)
    if scene.count(shape.kind) == 1 and rng.random() < 0.5:
        return Question(f"What color is the {shape.kind}?", shape.color.capitalize(), "color")
    return Question(f"What color is the shape {shape.phrase}?", shape.color.capitalize(), "color")


def _ask_count(scene: Scene, rng: np.random.Generator) -> Question:
    variant = int(rng.integers(3))
    if variant == 0:
        kind = _pick(rng, SHAPES)
        return Question(f"How many {kind}s are there?", str(scene.count(kind)), "count")
    if variant == 1:
        color = _pick(rng, tuple(COLORS))
        return Question(f"How many {color} shapes are there?", str(scene.count(color=color)), "count")
    return Question("How many shapes are there?", str(scene.count()), "count")


def _ask_position(scene: Scene, rng: np.random.Generator) -> Question | None:
    unique = [o for o in scene.objects if scene.count(o.kind, o.color) == 1]
    if not unique:
        return None
    shape = _pick(rng, unique)
    return Question(f"Where is the {shape.color} {shape.kind}?", shape.position.capitalize(), "position")


def _ask_yes_no(scene: Scene, rng: np.random.Generator) -> Question:
    absent = [(c, k) for c in COLORS for k in SHAPES if scene.count(k, c) == 0]
    present = rng.random() < 0.5
    if present:
        shape = _pick(rng, scene.objects)
        color, kind = shape.color, shape.kind
    else:
        color, kind = _pick(rng, absent)
    return Question(f"Is there {_article(color)} {color} {kind} in the image?", "Yes" if present else "No", "yes/no")


def _ask_choice(scene: Scene, rng: np.random.Generator) -> Question:
    """The colour of a shape at a position, among 4 options. The demo encoder shows colours by
    construction and no shapes (demo/encoder.py): asked for the shape among 4 the demo's
    model scored 0.31 (n=36); asked for the position among 4 it scored 0.36 (n=36), a form its
    pretrained LLM never saw (assets/demo_llm was built before it)."""
    shape = _pick(rng, scene.objects)
    others = [c for c in COLORS if c != shape.color]
    distractors = [str(c) for c in rng.choice(others, len(OPTION_LETTERS) - 1, replace=False)]
    options = tuple(str(c) for c in rng.permutation([shape.color, *distractors]))
    text, truth = f"What color is the {shape.kind} {shape.phrase}?", shape.color
    return Question(text, OPTION_LETTERS[options.index(truth)], "choice", options)


def _ask_describe(scene: Scene, rng: np.random.Generator) -> Question:
    return Question(_pick(rng, DESCRIBE_PROMPTS), caption(scene, rng), "describe")


ASKERS: dict[str, Callable[[Scene, np.random.Generator], Question | None]] = {
    "color": _ask_color,
    "count": _ask_count,
    "position": _ask_position,
    "yes/no": _ask_yes_no,
    "choice": _ask_choice,
    "describe": _ask_describe,
}


def _sample_question(scene: Scene, rng: np.random.Generator, categories: tuple[str, ...]) -> Question:
    """A question of one of ``categories``, drawn by TRAIN_CATEGORY_WEIGHTS (redrawn if it does not apply)."""
    weights = np.array([TRAIN_CATEGORY_WEIGHTS[c] for c in categories], dtype=np.float64)
    while True:
        question = ASKERS[categories[rng.choice(len(categories), p=weights / weights.sum())]](scene, rng)
        if question is not None:
            return question


def _text_only_question(rng: np.random.Generator) -> Question:
    """World-knowledge questions about shapes and colours that need no image."""
    variant = int(rng.integers(3))
    if variant == 0:
        kind = _pick(rng, SHAPES)
        return Question(f"How many sides does {_article(kind)} {kind} have?", str(SIDES[kind]), "text")
    if variant == 1:
        first, second = (str(kind) for kind in rng.choice(SHAPES, 2, replace=False))
        a, b = (int(n) for n in rng.integers(1, 6, size=2))
        text = f"If there are {a} {_plural(first, a)} and {b} {_plural(second, b)}, how many shapes are there in total?"
        return Question(text, str(a + b), "text")
    (x, y), mixed = _pick(rng, tuple(MIXES.items()))
    return Question(f"What color do you get by mixing {x} and {y}?", mixed.capitalize(), "text")


def _conversation(questions: Iterable[Question], image: bool) -> list[dict]:
    turns = []
    for question in questions:
        value = question.prompt()
        if image and not turns:
            value = f"<image>\n{value}"
        turns += [{"from": "human", "value": value}, {"from": "gpt", "value": question.answer}]
    return turns


def _distinct(questions: Iterable[Question]) -> list[Question]:
    """Drop repeats of an earlier question's text (a conversation never asks twice)."""
    seen = {}
    for question in questions:
        seen.setdefault(question.text, question)
    return list(seen.values())


def _stream(config: DemoConfig, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([config.seed, SPLIT_STREAMS[split], index])


def pretrain_record(record_id: str, image: str, scene: Scene, rng: np.random.Generator, colors: bool) -> dict:
    prompt = _pick(rng, DESCRIBE_PROMPTS)
    value = f"{prompt}\n<image>" if rng.random() < TAG_AFTER_PROMPT_FRACTION else f"<image>\n{prompt}"
    turns = [{"from": "human", "value": value}, {"from": "gpt", "value": caption(scene, rng, colors)}]
    return {"id": record_id, "image": image, "conversations": turns}


def language_record(record_id: str, scene: Scene, rng: np.random.Generator, categories: tuple[str, ...]) -> dict:
    """Stage 0: the scene in words (every shape with its colour and position), then questions."""
    conversation = _conversation(_questions(scene, rng, categories), image=False)
    conversation[0]["value"] = f"{describe(scene, grouped=False)}\n{conversation[0]['value']}"
    return {"id": record_id, "conversations": conversation}


def _questions(scene: Scene, rng: np.random.Generator, categories: tuple[str, ...]) -> list[Question]:
    turns = int(rng.integers(1, MAX_TURNS + 1))
    return _distinct(_sample_question(scene, rng, categories) for _ in range(turns))


def instruct_record(record_id: str, image: str, scene: Scene, rng: np.random.Generator,
                    categories: tuple[str, ...]) -> dict:
    questions = _questions(scene, rng, categories)
    return {"id": record_id, "image": image, "conversations": _conversation(questions, image=True)}


def text_only_record(record_id: str, rng: np.random.Generator) -> dict:
    questions = _distinct(_text_only_question(rng) for _ in range(int(rng.integers(1, 3))))
    return {"id": record_id, "conversations": _conversation(questions, image=False)}


def eval_questions(question_id: str, image: str, scene: Scene, count: int, rng: np.random.Generator,
                   categories: tuple[str, ...] = EVAL_CATEGORIES) -> list[dict]:
    """``count`` questions of distinct ``categories`` about one held-out image."""
    rows = []
    for category in rng.permutation(categories):
        if len(rows) == count:
            break
        question = ASKERS[str(category)](scene, rng)
        if question is not None:
            rows.append({
                "question_id": f"{question_id}-{len(rows)}",
                "image": image,
                "text": question.prompt(),
                "answer": question.answer,
                "category": question.category,
                "options": list(question.options),
            })
    return rows


def template_text(records: Iterable[dict], template_name: str) -> list[str]:
    """The text a conversation template makes of ``records``, cut where SentencePiece never
    sees across: image tags, special tokens (split out before encoding) and newlines."""
    template = get_template(template_name)
    lines = []
    for record in records:
        turns = place_image_tags(tuple(Turn(turn["from"], turn["value"]) for turn in record["conversations"]))
        text = template.render(turns).replace(IMAGE_TAG, "\n").replace(LLAMA_SPM_OPTIONS["eos_piece"], "\n")
        lines += [line for line in text.split("\n") if line]
    return lines


def train_tokenizer(lines: list[str], vocab_size: int) -> bytes:
    """A SentencePiece BPE model with Llama's settings, as the bytes of a .model file."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a small corpus may support fewer pieces than asked
        num_threads=1,  # deterministic
        minloglevel=2,
        **LLAMA_SPM_OPTIONS,
    )
    return model.getvalue()


OUTPUT_NAMES = (
    "images",
    "language.json",
    "pretrain.json",
    "instruct.json",
    "eval.jsonl",
    "scenes.json",
    "tokenizer.model",
    "tokenizer_config.json",
)
# HF-style config beside tokenizer.model. legacy must be true: LLaVA's vicuna_v1 round counting
# with legacy false assumes Llama's own pieces ("</s>USER" one token shorter than "USER").
TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "legacy": True,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "add_bos_token": True,
    "add_eos_token": False,
}


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")


def _read_tokenizer(source: Path) -> bytes:
    """The SentencePiece model ``source`` names (a file, or a directory holding tokenizer.model)."""
    path = source / "tokenizer.model" if source.is_dir() else source
    try:
        model = path.read_bytes()
        spm.SentencePieceProcessor(model_proto=model)
    except (OSError, RuntimeError) as err:
        raise ValueError(f"{path}: not a readable SentencePiece model ({err})") from err
    return model


def make_demo_data(out_dir: str | Path, config: DemoConfig = DemoConfig(),
                   tokenizer: str | Path | None = None) -> DemoSummary:
    """Render the images and write the JSON files and tokenizer described in the module docstring.

    ``tokenizer``: a SentencePiece model (file, or a directory holding ``tokenizer.model``) to copy,
    a pretrained LLM's, instead of fitting one to the corpus. Refuses to write over an earlier
    corpus (any of OUTPUT_NAMES present in ``out_dir``).
    """
    out = Path(out_dir)
    existing = [name for name in OUTPUT_NAMES if (out / name).exists()]
    if existing:
        raise FileExistsError(f"{out}: already holds {', '.join(existing)}; choose a new directory or remove them")
    model = None if tokenizer is None else _read_tokenizer(Path(tokenizer))
    scenes, pretrain, instruct, evaluation = {}, [], [], []
    for split, count in (("train", config.train_images), ("eval", config.eval_images)):
        (out / "images" / split).mkdir(parents=True)
        for index in range(count):
            rng = _stream(config, split, index)
            image = f"{split}/{index:06d}.jpg"
            scene = sample_scene(config, rng)
            render_scene(scene, rng).save(out / "images" / image, quality=config.jpeg_quality)
            scenes[image] = scene.to_json()
            record_id = f"{split}-{index:06d}"
            if split == "train":
                pretrain.append(pretrain_record(record_id, image, scene, rng, config.caption_colors))
                instruct.append(instruct_record(record_id, image, scene, rng, config.categories))
            else:
                evaluation += eval_questions(record_id, image, scene, config.eval_questions_per_image, rng,
                                             config.eval_categories)
    instruct += [
        text_only_record(f"text-{index:06d}", _stream(config, "text", index))
        for index in range(config.text_only_records)
    ]
    language = []
    for index in range(config.language_records):
        rng = _stream(config, "language", index)
        language.append(language_record(f"language-{index:06d}", sample_scene(config, rng), rng, config.categories))
    _write_json(out / "language.json", language)
    _write_json(out / "pretrain.json", pretrain)
    _write_json(out / "instruct.json", instruct)
    _write_json(out / "scenes.json", scenes)
    (out / "eval.jsonl").write_text("".join(json.dumps(row) + "\n" for row in evaluation), encoding="utf-8")
    if model is None:
        text = [line for name, records in (("language", language), ("pretrain", pretrain), ("instruct", instruct))
                for line in template_text(records, STAGE_TEMPLATES[name])]
        model = train_tokenizer(text, config.vocab_size)
    (out / "tokenizer.model").write_bytes(model)
    _write_json(out / "tokenizer_config.json", TOKENIZER_CONFIG)
    return DemoSummary(
        out_dir=str(out),
        train_images=config.train_images,
        eval_images=config.eval_images,
        language_records=len(language),
        pretrain_records=len(pretrain),
        instruct_records=len(instruct),
        text_only_records=config.text_only_records,
        eval_questions=len(evaluation),
        vocab_size=spm.SentencePieceProcessor(model_proto=model).vocab_size(),
    )
