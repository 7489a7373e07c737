"""One benchmark question as the evaluator sees it, and the paper's answer prompts
(docs/method.md#8-evaluation-prompts)."""

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

from PIL import Image

from megatron_asvr.data.images import load_rgb

SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."
OPTION_LETTERS = "ABCDEFGHIJ"
YES_NO_CHOICES = ("Yes", "No")  # as LLaVA-style models answer; the scorers lower-case them


class BenchmarkError(ValueError):
    """A benchmark file that cannot be read; the message names the file, the record and the problem."""


@dataclass(frozen=True)
class EvalItem:
    """A question, its image and its ground truth."""

    question_id: str
    prompt: str  # the user turn without the image tag: question, options and answer prompt
    image: Union[Path, bytes, None]  # an image file, encoded image bytes (MMBench TSV), or None (text only)
    answer: Any  # ground truth as the benchmark's scorer reads it
    answer_type: str  # yes_no | choice | short
    category: str = ""
    choices: Tuple[str, ...] = ()  # candidate answers for likelihood scoring (option letters, Yes / No)
    group: str = ""  # questions scored together: the two questions of an MME image, an MMVP pair


@dataclass
class ReadResult:
    """A benchmark's items and the records it skipped, counted by reason."""

    items: list
    skipped: Dict[str, int]


def choice_prompt(question: str, options: Sequence[str], hint: Optional[str] = None) -> str:
    """LLaVA's multiple-choice prompt: [hint \\n] question, "A. option" lines, the letter prompt."""
    text = f"{hint}\n{question}" if hint else question
    lines = [f"{letter}. {option}" for letter, option in zip(OPTION_LETTERS, options)]
    return "\n".join([text, *lines, CHOICE_PROMPT])


def short_prompt(question: str) -> str:
    return f"{question}\n{SHORT_ANSWER_PROMPT}"


def load_item_image(item: EvalItem) -> Image.Image:
    """The item's image as RGB (decoded from bytes for embedded images)."""
    if isinstance(item.image, bytes):
        try:
            with Image.open(io.BytesIO(item.image)) as image:
                return image.convert("RGB")
        except OSError as err:
            raise BenchmarkError(f"question {item.question_id}: embedded image cannot be decoded: {err}") from err
    return load_rgb(item.image)
