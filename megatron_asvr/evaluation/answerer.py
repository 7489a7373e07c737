"""Answers to benchmark items: greedy decoding, or the likeliest of an item's candidate answers.

Items are split over data-parallel replicas (replica r takes items r, r + n, ...)
and the answers gathered back, so every rank returns every answer.
"""

from dataclasses import dataclass
from typing import Dict, List

from megatron_asvr.evaluation.items import EvalItem
from megatron_asvr.evaluation.queries import QueryEncoder
from megatron_asvr.evaluation.runners import Runner

METHODS = ("generate", "likelihood")


@dataclass(frozen=True)
class Answer:
    text: str
    method: str  # generate | likelihood
    logprobs: tuple = ()  # per candidate answer (likelihood)


def replica_share(items: List[EvalItem], rank: int, size: int) -> List[EvalItem]:
    """Data-parallel replica ``rank``'s items: runs of consecutive questions on one image stay together
    (the image is then decoded, and with the KV cache encoded, once), the runs dealt out in turn."""
    runs: List[List[EvalItem]] = []
    for item in items:
        if runs and item.image is not None and runs[-1][-1].image == item.image:
            runs[-1].append(item)
        else:
            runs.append([item])
    return [item for run in runs[rank::size] for item in run]


class Answerer:
    def __init__(self, runner: Runner, encoder: QueryEncoder, max_new_tokens: int = 16, batch_size: int = 32):
        self.runner, self.encoder = runner, encoder
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.eos_id = encoder.tokenizer.eos_id

    def generate_ids(self, items: List[EvalItem]) -> List[List[int]]:
        """Greedy decoding until EOS (not included), ``max_new_tokens`` ids, or the model's last position."""
        outputs = []
        for start in range(0, len(items), self.batch_size):
            queries = [self.encoder.prompt(item) for item in items[start:start + self.batch_size]]
            outputs += self.runner.generate(queries, self.max_new_tokens, self.eos_id, self.encoder.max_length)
        return outputs

    def generate(self, items: List[EvalItem]) -> List[str]:
        """The greedy answers' text, stripped."""
        return [self.encoder.tokenizer.decode(ids).strip() for ids in self.generate_ids(items)]

    def choose(self, items: List[EvalItem]) -> List[Answer]:
        """The candidate (``item.choices``) whose answer text is likeliest after the prompt;
        ties go to the earlier candidate."""
        answers = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start:start + self.batch_size]
            queries = [q for item in chunk for q in self.encoder.answers(item, list(item.choices))]
            scores = iter(self.runner.answer_logprobs(queries))
            for item in chunk:
                logprobs = tuple(next(scores) for _ in item.choices)
                best = max(range(len(logprobs)), key=lambda i: (logprobs[i], -i))
                answers.append(Answer(item.choices[best], "likelihood", logprobs))
        return answers

    def answer(self, items: List[EvalItem], method: str) -> Dict[str, Answer]:
        """question_id -> Answer for every item. ``likelihood`` applies to items with candidate
        answers; the others (short answers) are generated."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        rank, size = self.runner.data_parallel
        mine = replica_share(items, rank, size)
        by_likelihood = [i for i in mine if method == "likelihood" and i.choices]
        by_generation = [i for i in mine if not (method == "likelihood" and i.choices)]
        local = [(i.question_id, a) for i, a in zip(by_likelihood, self.choose(by_likelihood))]
        local += [(i.question_id, Answer(t, "generate")) for i, t in zip(by_generation, self.generate(by_generation))]
        return dict(self.runner.gather(local))
