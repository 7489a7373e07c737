"""In-training evaluation (``training.run``'s evaluator): every ``train.eval_interval`` steps the
held-out letter and yes/no questions of ``train.eval_data`` are scored by answer likelihood on
the model being trained (no generation), and logged to TensorBoard under ``eval/``.

Prompts use the template of the training shards and the tokenizer they were made
with (``train.eval_tokenizer``, checked against the shards' manifest); images are
read from ``data.image_root`` in ``data.image_mode``. Numbers logged: ``accuracy``
and ``<category>/accuracy``, and ``true_choice_prob``, the mean probability of the
true answer among an item's candidates (smoother than accuracy on small sets).
"""

import math
from pathlib import Path
from typing import Dict, List

import torch

from megatron_asvr.config import ConfigError, RunConfig
from megatron_asvr.data.shards import ShardDataset
from megatron_asvr.evaluation.answerer import Answer, Answerer
from megatron_asvr.evaluation.items import EvalItem
from megatron_asvr.evaluation.queries import QueryEncoder
from megatron_asvr.evaluation.runners import MegatronRunner
from megatron_asvr.evaluation.suites.jsonl import read_jsonl_benchmark, score_jsonl
from megatron_asvr.tokenizers.text import load_text_tokenizer


def true_choice_index(item: EvalItem) -> int:
    """Index of the true answer among ``item.choices`` (letters, or Yes / No)."""
    if item.answer_type == "choice":
        return item.choices.index(item.answer["letter"])
    return [c.lower() for c in item.choices].index(item.answer)


def true_choice_prob(item: EvalItem, answer: Answer) -> float:
    """softmax over the candidates' log-probabilities, at the true answer."""
    top = max(answer.logprobs)
    weights = [math.exp(lp - top) for lp in answer.logprobs]
    return weights[true_choice_index(item)] / sum(weights)


def _tokenizer(config: RunConfig, manifest: dict):
    tokenizer = load_text_tokenizer(config.train.eval_tokenizer)
    theirs = manifest.get("tokenizer", {}).get("md5")
    ours = tokenizer.describe().get("md5")
    if theirs and ours != theirs:
        raise ConfigError(
            f"train.eval_tokenizer={config.train.eval_tokenizer!r} (md5 {ours}) is not the tokenizer the shards "
            f"in {config.data.shards} were made with (md5 {theirs})"
        )
    return tokenizer


class HeldOutScore:
    """Scores the held-out questions on the training model's chunks (``training.loop.Evaluator``)."""

    def __init__(self, config: RunConfig):
        config.train.validate()
        data = read_jsonl_benchmark(Path(config.train.eval_data), Path(config.data.image_root))
        self.items: List[EvalItem] = [item for item in data.items if item.choices]
        if not self.items:
            raise ConfigError(f"train.eval_data={config.train.eval_data!r} holds no letter or yes/no question")
        manifest = ShardDataset(config.data.shards).manifest.get("metadata", {})
        self.tokenizer = _tokenizer(config, manifest)
        model = config.model
        self.encoder = QueryEncoder(self.tokenizer, manifest["template"], config.data.image_mode,
                                    model.vision.num_patches, model.llm.max_sequence_length)
        self.vocab_limit = min(model.llm.vocab_size, self.tokenizer.vocab_size)
        self.micro_batch = config.train.micro_batch
        self.description = f"held-out ({len(self.items)} questions, likelihood)"

    def __call__(self, model: List[torch.nn.Module]) -> Dict[str, float]:
        """accuracy, <category>/accuracy and true_choice_prob (collective: every rank calls it)."""
        answerer = Answerer(MegatronRunner(model, self.vocab_limit, self.micro_batch), self.encoder)
        answers = answerer.answer(self.items, "likelihood")
        scores = score_jsonl(self.items, {qid: a.text for qid, a in answers.items()})
        probs = [true_choice_prob(item, answers[item.question_id]) for item in self.items]
        scores["true_choice_prob"] = sum(probs) / len(probs)
        return scores
