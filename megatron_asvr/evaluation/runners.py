"""Runners: forward queries through a model and return greedy next tokens or answer log-probabilities.

``MegatronRunner`` runs our model chunks (any TP / PP, DDP-wrapped or not) through
megatron's forward-only pipeline schedule; the last stage reduces the logits to one
number per query (next token id, or summed log-probability of the answer ids),
which is broadcast over the pipeline so that every rank continues identically.
Ids beyond ``vocab_limit`` (tensor-parallel padding, llava-hf's appended tokens)
are never predicted and take no probability mass. There is no KV cache: each
decoding step forwards the whole sequence again.
"""

from abc import ABC, abstractmethod
from typing import Callable, List, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region, vocab_parallel_cross_entropy

from megatron_asvr.data.batch import MicroBatch, build_micro_batch
from megatron_asvr.evaluation.queries import Query, to_sample
from megatron_asvr.training.schedule import forward_only
from megatron_asvr.training.task import logits_step


def micro_batches(queries: List[Query], micro_batch: int, length_multiple: int = 1,
                  count_multiple: int = 1) -> List[MicroBatch]:
    """Micro-batches of ``queries``, right-padded to their longest expanded length rounded up to
    ``length_multiple`` (sequence parallelism splits it over TP ranks); the micro-batches are
    filled up with copies of the last query (results dropped) to a multiple of ``count_multiple``
    micro-batches (the interleaved schedule runs them in groups of PP)."""
    seq_length = -(-max(q.length for q in queries) // length_multiple) * length_multiple
    padded = queries + [queries[-1]] * (-len(queries) % (micro_batch * count_multiple))
    batches = []
    for start in range(0, len(padded), micro_batch):
        group = padded[start:start + micro_batch]
        pixels = [q.pixels for q in group if q.pixels is not None]
        batches.append(build_micro_batch([to_sample(q, seq_length) for q in group],
                                         images=torch.cat(pixels) if pixels else None))  # [sum T, 3, H, W]
    return batches


def last_positions(batch: MicroBatch, device) -> torch.Tensor:
    """[b] each query's last position (its next id is predicted there)."""
    return torch.tensor(batch.sample_lengths, device=device) - 1


class Runner(ABC):
    """What the answerer needs from a model; ``data_parallel`` = (rank, size) of this replica."""

    vocab_limit: int
    data_parallel: Tuple[int, int] = (0, 1)

    @abstractmethod
    def next_tokens(self, queries: List[Query]) -> List[int]:
        """The greedy next id after each query's ids."""

    @abstractmethod
    def answer_logprobs(self, queries: List[Query]) -> List[float]:
        """sum of log p(id) over each query's ids from ``scored_from`` on."""

    def gather(self, values: list) -> list:
        """Concatenate ``values`` of every data-parallel replica in rank order."""
        return values


# --- reductions on the last pipeline stage (vocabulary split over TP ranks) ------------------------


def _vocab_slice_mask(logits: torch.Tensor, vocab_limit: int) -> torch.Tensor:
    """True for this TP rank's logit columns that are not tokens. logits [..., V/tp]."""
    width = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * width
    return torch.arange(start, start + width, device=logits.device) >= vocab_limit


def greedy_ids(logits: torch.Tensor, batch: MicroBatch, vocab_limit: int) -> torch.Tensor:
    """logits [b, s, V/tp] -> argmax id at each sample's last position [b]."""
    rows = logits[torch.arange(logits.shape[0], device=logits.device), last_positions(batch, logits.device)]
    return gather_from_tensor_model_parallel_region(rows.float())[:, :vocab_limit].argmax(-1)  # [b]


def answer_logprob(logits: torch.Tensor, batch: MicroBatch, vocab_limit: int) -> torch.Tensor:
    """logits [b, s, V/tp] -> summed log-probability of the labels where loss_mask is 1 [b]."""
    masked = logits.float().masked_fill(_vocab_slice_mask(logits, vocab_limit), float("-inf"))
    ce = vocab_parallel_cross_entropy(masked, batch.labels)  # [b, s]
    return -(ce * batch.loss_mask).sum(-1)


class MegatronRunner(Runner):
    """Our model chunks through the forward-only schedule (every rank of the job calls it)."""

    def __init__(self, chunks: List[torch.nn.Module], vocab_limit: int, micro_batch: int = 4):
        self.chunks, self.vocab_limit, self.micro_batch = chunks, vocab_limit, micro_batch
        self.device = next(chunks[0].parameters()).device
        self.data_parallel = (parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size())

    def next_tokens(self, queries: List[Query]) -> List[int]:
        return [int(v) for v in self._run(queries, greedy_ids)]

    def answer_logprobs(self, queries: List[Query]) -> List[float]:
        return self._run(queries, answer_logprob)

    def _run(self, queries: List[Query], reduce: Callable) -> List[float]:
        config = self.chunks[0].config
        batches = micro_batches(
            queries, self.micro_batch, config.tensor_model_parallel_size if config.sequence_parallel else 1,
            config.pipeline_model_parallel_size if len(self.chunks) > 1 else 1,
        )
        collect = logits_step(lambda logits, batch: reduce(logits, batch, self.vocab_limit).double())
        reports = forward_only(collect, self.chunks, batches)
        count = len(batches) * self.micro_batch
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            values = torch.cat(reports)  # [count]
        else:
            values = torch.zeros(count, dtype=torch.float64, device=self.device)
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(values, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                           group=parallel_state.get_pipeline_model_parallel_group())
        return values[: len(queries)].tolist()

    def gather(self, values: list) -> list:
        rank, size = self.data_parallel
        if size == 1:
            return values
        parts = [None] * size
        dist.all_gather_object(parts, values, group=parallel_state.get_data_parallel_group())
        return [v for part in parts for v in part]
