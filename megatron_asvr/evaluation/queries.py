"""From benchmark items to token sequences with images: what a runner forwards.

A ``Query`` holds templated ids (one IMAGE_PLACEHOLDER per image), the image's
tiles and visual-position count, and for likelihood scoring the index of the
first answer id. ``to_sample`` expands it with the training code's
``build_sequence`` (labels are the next ids; ``loss_mask`` marks the answer).
"""

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple, Union

import torch

from megatron_asvr.config import Resample
from megatron_asvr.data.batch import MicroBatch, build_micro_batch
from megatron_asvr.data.images import image_token_count, preprocess_image
from megatron_asvr.data.sequence import SequenceSample, SequenceTooLong, build_sequence
from megatron_asvr.evaluation.items import EvalItem, load_item_image
from megatron_asvr.evaluation.prompts import generation_prompt, with_answer
from megatron_asvr.tokenizers.templates import get_template, tokenize_with_images
from megatron_asvr.tokenizers.text import TextTokenizer

PAD_ID = 0  # image positions and padding hold it, as in training
IMAGE_MEMO = 8  # preprocessed images a QueryEncoder keeps (the last ones asked for)


@dataclass(frozen=True)
class Query:
    """One sequence for a runner."""

    ids: List[int]  # templated ids, IMAGE_PLACEHOLDER where the image goes
    pixels: Optional[torch.Tensor]  # [T, 3, 384, 384] tiles of the image, None without one
    image_tokens: List[int]  # visual positions of each image
    scored_from: int  # first id whose log-probability counts (likelihood); len(ids) when generating

    @property
    def length(self) -> int:
        """Positions after the image placeholders are expanded."""
        return len(self.ids) - len(self.image_tokens) + sum(self.image_tokens)

    def extended(self, token: int) -> "Query":
        return dataclasses.replace(self, ids=self.ids + [token], scored_from=len(self.ids) + 1)


def to_sample(query: Query, seq_length: int) -> SequenceSample:
    """The query as a training sample of ``seq_length`` positions: tokens are all its ids,
    ``loss_mask[i]`` is 1 where ``labels[i]`` (= the id after position i) is an answer id."""
    ids = query.ids + [PAD_ID]  # build_sequence feeds ids[:-1]: every real id becomes an input
    supervised = [i >= query.scored_from for i in range(len(ids) - 1)] + [False]
    return build_sequence(ids, supervised, query.image_tokens, seq_length, PAD_ID)


def query_batch(queries: List[Query], seq_length: int) -> MicroBatch:
    """``queries`` as one micro-batch, right-padded to ``seq_length`` positions, their tiles in order."""
    pixels = [q.pixels for q in queries if q.pixels is not None]
    return build_micro_batch([to_sample(q, seq_length) for q in queries],
                             images=torch.cat(pixels) if pixels else None)  # [sum T, 3, H, W]


class QueryEncoder:
    """Prompts (and prompts with an answer) of items, tokenized as LLaVA's evaluation does."""

    def __init__(self, tokenizer: TextTokenizer, template: str, image_mode: str, patches_per_tile: int,
                 max_length: int, resample: Resample = "bicubic"):
        self.tokenizer, self.template = tokenizer, template
        self.image_mode, self.patches_per_tile, self.resample = image_mode, patches_per_tile, resample
        self.max_length = max_length  # the model's positions (llm.max_sequence_length)
        generation_prompt(template, "", False)  # an unknown template fails here, before any model work
        get_template(template).check_tokenizer(tokenizer)  # so does one the tokenizer cannot carry
        self._recent: "OrderedDict[Union[Path, bytes], Tuple[torch.Tensor, List[int]]]" = OrderedDict()

    def _image(self, item: EvalItem):
        """(pixels, visual positions) of the item's image. The last IMAGE_MEMO images are kept: the
        questions on one image (POPE's, MME's, the demo's) share one pixels tensor, decoded once, and
        the KV-cached generation runs the vision encoder once for them (evaluation/generate.py)."""
        if item.image is None:
            return None, []
        if item.image in self._recent:
            self._recent.move_to_end(item.image)
            return self._recent[item.image]
        image = load_item_image(item)
        count = image_token_count(*image.size, self.image_mode, patches_per_tile=self.patches_per_tile)
        self._recent[item.image] = preprocess_image(image, self.image_mode, resample=self.resample), [count]
        if len(self._recent) > IMAGE_MEMO:
            self._recent.popitem(last=False)
        return self._recent[item.image]

    def prompt(self, item: EvalItem) -> Query:
        """The generation prompt of ``item``."""
        pixels, counts = self._image(item)
        ids = tokenize_with_images(generation_prompt(self.template, item.prompt, pixels is not None), self.tokenizer)
        return self._checked(item, Query(ids, pixels, counts, len(ids)))

    def answers(self, item: EvalItem, answers: List[str]) -> List[Query]:
        """One query per candidate answer (the image loaded once), scored from the first id where the
        full text's tokenization leaves the prompt's (the prompt's end, unless a merge crosses it)."""
        pixels, counts = self._image(item)
        prompt = generation_prompt(self.template, item.prompt, pixels is not None)
        prompt_ids = tokenize_with_images(prompt, self.tokenizer)
        queries = []
        for answer in answers:
            ids = tokenize_with_images(with_answer(self.template, prompt, answer), self.tokenizer)
            shared = next((i for i, (a, b) in enumerate(zip(ids, prompt_ids)) if a != b), len(prompt_ids))
            queries.append(self._checked(item, Query(ids, pixels, counts, shared)))
        return queries

    def _checked(self, item: EvalItem, query: Query) -> Query:
        if query.length > self.max_length:
            raise SequenceTooLong(f"question {item.question_id}: {query.length} positions (image included) exceed "
                                  f"the model's {self.max_length}")
        return query

