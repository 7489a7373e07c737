"""In-training evaluation: every ``train.eval_interval`` steps the held-out letter and yes/no
questions of ``train.eval_data`` are scored by answer likelihood on the model being trained
(no generation), and logged to TensorBoard under ``eval/``.

Prompts use the template of the training shards and the tokenizer they were made
with (``train.eval_tokenizer``, checked against the shards' manifest); images are
read from ``data.image_root`` in ``data.image_mode``. Numbers logged: ``accuracy``
and ``<category>/accuracy``, and ``true_choice_prob``, the mean probability of the
true answer among an item's candidates (smoother than accuracy on small sets).
"""

import math
from pathlib import Path
from typing import Dict, List

from megatron_asvr.config import ConfigError, ModelConfig, RunConfig
from megatron_asvr.data.shards import ShardDataset
from megatron_asvr.evaluation.answerer import Answer, Answerer
from megatron_asvr.evaluation.items import EvalItem
from megatron_asvr.evaluation.queries import QueryEncoder
from megatron_asvr.evaluation.runners import MegatronRunner
from megatron_asvr.evaluation.suites.jsonl import read_jsonl_benchmark, score_jsonl
from megatron_asvr.tokenizers.text import load_text_tokenizer
from megatron_asvr.training.loop import run


def true_choice_index(item: EvalItem) -> int:
    """Index of the true answer among ``item.choices`` (letters, or Yes / No)."""
    if item.kind == "choice":
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
    """Scores the held-out questions on the training model chunks (collective: every rank calls it)."""

    def __init__(self, config: RunConfig, model: ModelConfig, chunks, micro_batch: int):
        data = read_jsonl_benchmark(Path(config.train.eval_data), Path(config.data.image_root))
        self.items: List[EvalItem] = [item for item in data.items if item.choices]
        if not self.items:
            raise ConfigError(f"train.eval_data={config.train.eval_data!r} holds no letter or yes/no question")
        manifest = ShardDataset(config.data.shards).manifest.get("metadata", {})
        tokenizer = _tokenizer(config, manifest)
        encoder = QueryEncoder(tokenizer, manifest["template"], config.data.image_mode, model.vision.num_patches,
                               model.llm.max_sequence_length)
        runner = MegatronRunner(chunks, min(model.llm.vocab_size, tokenizer.vocab_size), micro_batch)
        self.answerer = Answerer(runner, encoder)

    @classmethod
    def for_trainer(cls, config: RunConfig, model: ModelConfig, trainer) -> "HeldOutScore":
        """The ``training.loop.run`` evaluator: scores the trainer's own model chunks."""
        return cls(config, model, trainer.model, config.train.micro_batch)

    def __call__(self) -> Dict[str, float]:
        answers = self.answerer.answer(self.items, "likelihood")
        scores = score_jsonl(self.items, {qid: a.text for qid, a in answers.items()})
        probs = [true_choice_prob(item, answers[item.question_id]) for item in self.items]
        scores["true_choice_prob"] = sum(probs) / len(probs)
        return scores

    def log(self, step: int, logger) -> Dict[str, float]:
        """Score, print one line and write ``eval/<name>`` scalars (on the logger's rank)."""
        scores = self()
        if logger.enabled:
            print(f"step {step} | held-out ({len(self.items)} questions, likelihood) | "
                  + " | ".join(f"{k} {v:.4f}" for k, v in scores.items()), flush=True)
        logger.log_scalars({f"eval/{name}": value for name, value in scores.items()}, step)
        return scores


def train(config: RunConfig) -> dict:
    """``training.loop.run`` with the held-out score every ``train.eval_interval`` steps."""
    return run(config, evaluator=HeldOutScore.for_trainer)
