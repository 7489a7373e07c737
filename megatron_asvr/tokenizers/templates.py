"""Conversation templates with LLaVA's exact text, tokenization and loss masks.

``plain`` (stage 1), ``vicuna_v1`` (stage 2) and ``mistral_instruct`` follow
LLaVA's ``preprocess_plain``, ``preprocess_v1`` and ``preprocess_llama_2``
(docs/method.md#6-conversation-templates-and-sequences), including their way of
counting tokens per round; where that count disagrees with the real tokenization,
LLaVA masks the whole sample silently, here :class:`TokenizationMismatch` is raised.
``qwen`` is LLaVA-NeXT's ``conv_qwen`` (ChatML) for Qwen's BPE tokenizers.

A template whose separators are not special tokens of the tokenizer (vicuna_v1's
``</s>`` in a Qwen tokenizer, ``<|im_end|>`` in a LLaMA one) would train on a loss
mask that is all zeros or wrong everywhere: ``check_tokenizer`` refuses the pair up front.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from megatron_asvr.tokenizers.text import TextTokenizer

IMAGE_TAG = "<image>"
# LLaVA's IMAGE_TOKEN_INDEX: the in-memory id that stands for one image until the model expands it
# (not a vocabulary id: an HF export's <image> token is HFVocab.image_token_index).
IMAGE_PLACEHOLDER = -200
HUMAN, GPT = "human", "gpt"


@dataclass(frozen=True)
class Turn:
    """One message of a conversation: ``role`` is ``human`` or ``gpt``."""

    role: str
    text: str


@dataclass(frozen=True)
class TemplatedTokens:
    """A templated, tokenized conversation."""

    input_ids: np.ndarray  # [n] int32, IMAGE_PLACEHOLDER where an image goes
    loss_mask: np.ndarray  # [n] uint8, 1 = supervised (answer tokens)


class TokenizationMismatch(ValueError):
    """LLaVA's round-by-round token count differs from the real tokenization."""

    def __init__(self, counted: int, actual: int):
        super().__init__(f"rounds count {counted} tokens, the conversation has {actual}")
        self.counted = counted
        self.actual = actual


def place_image_tags(turns: tuple[Turn, ...]) -> tuple[Turn, ...]:
    """LLaVA-1.5's tag placement: a turn's ``<image>`` tags move to its start as ``<image>\\n``.

    The rest of the turn is stripped. A turn holding k tags starts with k of them
    (LLaVA-1.5 itself collapses them into one; multi-image data needs all k).
    """
    placed = []
    for turn in turns:
        count = turn.text.count(IMAGE_TAG)
        if count:
            text = turn.text.replace(IMAGE_TAG, "").strip()
            turn = Turn(turn.role, ((IMAGE_TAG + "\n") * count + text).strip())
        placed.append(turn)
    return tuple(placed)


def tokenize_with_images(prompt: str, tokenizer: TextTokenizer) -> list[int]:
    """LLaVA's ``tokenizer_image_token``: tokenize the pieces between tags, one placeholder per tag.

    Each piece is tokenized as a whole string (so it gets its own dummy prefix);
    only the first piece's BOS is kept.
    """
    chunks = [tokenizer.encode(chunk) for chunk in prompt.split(IMAGE_TAG)]
    ids = [chunks[0][0]] if chunks[0][:1] == [tokenizer.bos_id] else []
    offset = len(ids)
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(IMAGE_PLACEHOLDER)
        ids.extend(chunk[offset:])
    return ids


class ConversationTemplate(ABC):
    """Renders alternating human/gpt turns (human first, gpt last) and masks them."""

    name: str

    @abstractmethod
    def render(self, turns: tuple[Turn, ...]) -> str:
        """The prompt text of ``turns`` (tags already placed)."""

    @abstractmethod
    def tokenize(self, turns: tuple[Turn, ...], tokenizer: TextTokenizer) -> TemplatedTokens:
        """Token ids and loss mask of ``turns``; raises :class:`TokenizationMismatch`."""

    def unsupported(self, turns: tuple[Turn, ...], num_images: int) -> str | None:
        """Why this template cannot express the conversation, or None if it can."""
        return None

    def tokenizer_problem(self, tokenizer: TextTokenizer) -> str | None:
        """Why ``tokenizer`` cannot carry this template, or None if it can."""
        return None

    def check_tokenizer(self, tokenizer: TextTokenizer) -> None:
        """Raise ValueError naming the template and the tokenizer when they do not fit together."""
        problem = self.tokenizer_problem(tokenizer)
        if problem is not None:
            described = tokenizer.describe()
            raise ValueError(f"template {self.name!r} does not fit the tokenizer {described['file']} "
                             f"({described['format']}): {problem}")


def _single_token_problem(tokenizer: TextTokenizer, tokens: tuple[str, ...]) -> str | None:
    missing = [token for token in tokens if tokenizer.token_id(token) is None]
    if missing:
        return f"{', '.join(map(repr, missing))} is not one token of it: choose the template of its model family"
    return None


def _as_arrays(ids: list[int], mask: np.ndarray) -> TemplatedTokens:
    return TemplatedTokens(np.asarray(ids, dtype=np.int32), mask)


class PlainTemplate(ConversationTemplate):
    """Stage 1: ``<image>`` + caption + ``"\\n"``; the human text is dropped.

    BOS and the image are unsupervised; the caption and its newline are supervised.
    """

    name = "plain"
    sep = "\n"

    def render(self, turns: tuple[Turn, ...]) -> str:
        return IMAGE_TAG + turns[1].text + self.sep

    def tokenize(self, turns: tuple[Turn, ...], tokenizer: TextTokenizer) -> TemplatedTokens:
        ids = tokenize_with_images(self.render(turns), tokenizer)
        mask = np.zeros(len(ids), dtype=np.uint8)
        mask[len(tokenize_with_images(IMAGE_TAG, tokenizer)) :] = 1
        return _as_arrays(ids, mask)

    def unsupported(self, turns: tuple[Turn, ...], num_images: int) -> str | None:
        if len(turns) != 2 or num_images != 1:
            return (
                f"plain needs one image and one question/answer pair, "
                f"got {num_images} image(s) and {len(turns)} turns"
            )
        return None


class RoundTemplate(ConversationTemplate):
    """Templates whose rounds end in ``sep2`` and whose answers follow ``answer_sep``.

    Masking is LLaVA's: split the text at ``sep2`` into rounds and each round at
    ``answer_sep``; a round counts its own tokenization (its BOS stands for the
    ``sep2`` that the split removed), its instruction counts its own tokenization
    minus 2 (BOS and the trailing space that merges into the answer). With
    ``adjust_for_legacy`` and a ``legacy=False`` tokenizer, rounds after the first
    count one token less (their first word loses its dummy prefix after ``</s>``).
    """

    sep2 = "</s>"
    answer_sep: str
    adjust_for_legacy: bool

    def tokenize(self, turns: tuple[Turn, ...], tokenizer: TextTokenizer) -> TemplatedTokens:
        text = self.render(turns)
        ids = tokenize_with_images(text, tokenizer)
        mask = np.zeros(len(ids), dtype=np.uint8)
        cur = 1  # BOS
        for i, round_text in enumerate(text.split(self.sep2)):
            parts = round_text.split(self.answer_sep)
            if round_text == "" or len(parts) != 2:
                break
            round_len = len(tokenize_with_images(round_text, tokenizer))
            instruction_len = len(tokenize_with_images(parts[0] + self.answer_sep, tokenizer)) - 2
            if i > 0 and self.adjust_for_legacy and not tokenizer.legacy:
                round_len -= 1
                instruction_len -= 1
            mask[cur + instruction_len : cur + round_len] = 1
            cur += round_len
        if cur != len(ids):
            raise TokenizationMismatch(cur, len(ids))
        return _as_arrays(ids, mask)

    def tokenizer_problem(self, tokenizer: TextTokenizer) -> str | None:
        if tokenizer.bos_id is None:
            return "it puts no BOS in front, and this template's round counting needs one"
        return _single_token_problem(tokenizer, (self.sep2,))


class VicunaV1Template(RoundTemplate):
    """Stage 2: ``system + " " + (ROLE + ": " + message + sep)*`` with USER/ASSISTANT, sep " " / "</s>"."""

    name = "vicuna_v1"
    system = (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    )
    roles = ("USER", "ASSISTANT")
    seps = (" ", "</s>")
    answer_sep = " ASSISTANT: "
    adjust_for_legacy = True

    def render(self, turns: tuple[Turn, ...]) -> str:
        text = self.system + self.seps[0]
        for i, turn in enumerate(turns):
            text += self.roles[i % 2] + ": " + turn.text + self.seps[i % 2]
        return text


class MistralInstructTemplate(RoundTemplate):
    """LLaVA's ``mistral_instruct``: ``[INST] question [/INST] answer </s>`` per round, no system."""

    name = "mistral_instruct"
    answer_sep = "[/INST] "
    adjust_for_legacy = False

    def render(self, turns: tuple[Turn, ...]) -> str:
        text = ""
        for i, turn in enumerate(turns):
            text += f"[INST] {turn.text} [/INST]" if i % 2 == 0 else f" {turn.text} {self.sep2}"
        return text


class QwenTemplate(ConversationTemplate):
    """LLaVA-NeXT's ``conv_qwen`` (ChatML) with Qwen's tokenizer (no BOS)::

        <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n
        (<|im_start|>user\n<question><|im_end|>\n<|im_start|>assistant\n<answer><|im_end|>\n)*

    Supervised: each answer and its ``<|im_end|>`` (where generation stops). LLaVA-NeXT's
    ``preprocess_qwen`` also supervises the assistant header and every newline, ``<|im_start|>``
    and ``<|im_end|>`` of the prompt; we keep the prompt unsupervised. The pieces are tokenized
    one by one and must equal the whole text's tokenization, else :class:`TokenizationMismatch`.
    """

    name = "qwen"
    system = "You are a helpful assistant."
    start, end = "<|im_start|>", "<|im_end|>"

    def _pieces(self, turns: tuple[Turn, ...]) -> list[tuple[str, bool]]:
        """(text, supervised) in order."""
        pieces = [(f"{self.start}system\n{self.system}{self.end}\n", False)]
        for i, turn in enumerate(turns):
            if i % 2 == 0:
                pieces.append((f"{self.start}user\n{turn.text}{self.end}\n{self.start}assistant\n", False))
            else:
                pieces += [(turn.text + self.end, True), ("\n", False)]
        return pieces

    def render(self, turns: tuple[Turn, ...]) -> str:
        return "".join(text for text, _ in self._pieces(turns))

    def tokenize(self, turns: tuple[Turn, ...], tokenizer: TextTokenizer) -> TemplatedTokens:
        ids, mask = [], []
        for text, supervised in self._pieces(turns):
            piece = tokenize_with_images(text, tokenizer)
            ids += piece
            mask += [int(supervised)] * len(piece)
        whole = tokenize_with_images(self.render(turns), tokenizer)
        if whole != ids:
            raise TokenizationMismatch(len(ids), len(whole))
        return _as_arrays(ids, np.asarray(mask, dtype=np.uint8))

    def tokenizer_problem(self, tokenizer: TextTokenizer) -> str | None:
        if tokenizer.bos_id is not None:
            return "it puts a BOS in front of every piece (a Qwen tokenizer puts none)"
        return _single_token_problem(tokenizer, (self.start, self.end))


TEMPLATES: dict[str, ConversationTemplate] = {
    t.name: t for t in (PlainTemplate(), VicunaV1Template(), MistralInstructTemplate(), QwenTemplate())
}


def get_template(name: str) -> ConversationTemplate:
    """The template called ``name``."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown conversation template {name!r}; known: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]
