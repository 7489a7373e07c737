"""Greedy generation with megatron's static KV cache (``StaticInferenceContext``).

    prefill:  prompt embeddings (vision encoder + projector: once per query) -> decoder layers,
              which write every position's keys and values into the micro-batch's cache
    decode:   one position per step, [b, 1, h] through the pipeline, attending to the cache

Each micro-batch keeps its own context (megatron allocates its per-layer [positions, rows, groups,
d] buffers in ``Attention._adjust_key_value_for_inference``), so megatron's forward-only pipeline
schedule runs the micro-batches of a step as in training (p2p shapes sent first: they differ).

Ragged prompts: right padding with one shared offset per micro-batch, as megatron's static
controller does. The prefill stops at the micro-batch's shortest prompt (where megatron's
``materialize_only_last_token_logits`` keeps the right row); longer prompts are fed on, one
position per decode step, from their cached embeddings (teacher forcing), their outputs unused
until their prompt ends. Every position thus keeps the uncached forward's RoPE angle and causal
mask. Queries are sorted by length first, so that a micro-batch's prompts differ little.

Rows end at EOS (not included), after ``max_new_tokens`` ids or at the model's last position.
Ended rows leave their micro-batch's cache (``swap_key_value_dict``) and an emptied micro-batch
leaves the step; the interleaved (virtual pipeline) schedule needs a fixed number of micro-batches,
so with virtual stages ended rows ride along to the last step instead.

Sequence parallelism is off while generating (a [b, 1] step cannot be split over TP ranks): the
same weights, with all-reduces in place of reduce-scatter / all-gather.
"""

import contextlib
from dataclasses import dataclass
from functools import partial
from typing import Iterator, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.utils import get_attr_wrapped_model

from megatron_asvr.evaluation.queries import PAD_ID, Query, query_batch
from megatron_asvr.training.schedule import forward_only


@dataclass
class StepInput:
    """One micro-batch of a generation step, as ``forward_only`` hands it to the forward step."""

    tokens: torch.Tensor  # [b, s] zeros: the schedule reads its shape
    embeddings: Optional[torch.Tensor]  # [s, b, h] the first stage's input (None on later stages)
    context: StaticInferenceContext

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]

    def to(self, device) -> "StepInput":
        return self  # built on the device


class _MicroBatch:
    """The rows of one micro-batch still generating, and its cache."""

    def __init__(self, owners: List[Optional[int]], lengths: List[int], prompt: Optional[torch.Tensor],
                 capacity: int):
        self.owners = owners  # the query of each row; None: a filler row (results dropped)
        self.lengths = lengths  # each row's prompt positions
        self.prompt = prompt  # [S, b, h] prompt embeddings (first stage), S = the longest prompt
        self.context = StaticInferenceContext(len(owners), capacity)  # capacity: positions of the cache
        self.last = [0] * len(owners)  # each row's last generated id
        self.done = [owner is None for owner in owners]

    @property
    def offset(self) -> int:
        """Positions in the cache."""
        return self.context.sequence_len_offset

    def step_input(self, embed, device) -> StepInput:
        """The next positions: the prompt up to the shortest row's end (prefill), then one."""
        start = self.offset
        end = min(self.lengths) if start == 0 else start + 1
        embeddings = None
        if embed is not None:
            embeddings = self.prompt[start:end]  # [s, b, h]
            if start > 0:
                teacher = torch.tensor([start < n for n in self.lengths], device=device)  # [b] still in the prompt
                ids = torch.tensor(self.last, device=device)[:, None]  # [b, 1]
                fed = embed(ids, None, None, None, None)  # [1, b, h]
                embeddings = torch.where(teacher[None, :, None], self.prompt[min(start, len(self.prompt) - 1)], fed)
        return StepInput(torch.zeros(len(self.owners), end - start, dtype=torch.long, device=device), embeddings,
                         self.context)

    def record(self, ids: List[int], generated: List[List[int]], eos_id: int, max_new_tokens: int,
               max_length: int) -> None:
        """Take the step's greedy ``ids`` of the rows past their prompt into ``generated`` (by query)."""
        position = self.offset - 1  # the fed position whose next ids these are
        for row, (owner, token) in enumerate(zip(self.owners, ids)):
            if self.done[row] or position < self.lengths[row] - 1:
                continue
            self.last[row] = token
            if token == eos_id:
                self.done[row] = True
                continue
            generated[owner].append(token)
            length = self.lengths[row] + len(generated[owner])
            self.done[row] = len(generated[owner]) == max_new_tokens or length >= max_length

    def drop_ended(self) -> bool:
        """Ended rows leave the cache (megatron's ``swap_key_value_dict`` only permutes); whether any
        row is left."""
        rows = [r for r, done in enumerate(self.done) if not done]
        if rows and len(rows) < len(self.owners):
            self._keep(rows)
        return bool(rows)

    def _keep(self, rows: List[int]) -> None:
        memory = self.context.key_value_memory_dict
        for layer, (keys, values) in memory.items():
            memory[layer] = (keys[:, rows], values[:, rows])  # [positions, rows, groups, d]
        self.owners, self.lengths, self.last, self.done = (
            [values[r] for r in rows] for values in (self.owners, self.lengths, self.last, self.done))
        if self.prompt is not None:
            self.prompt = self.prompt[:, rows]


def _forward_step(vocab_limit: int, data_iterator: Iterator[StepInput], model):
    step = next(data_iterator)
    output = model(tokens=step.tokens, position_ids=None, decoder_input=step.embeddings,
                   inference_context=step.context)
    return output, partial(_greedy, vocab_limit)


def _greedy(vocab_limit: int, output: dict):
    """megatron's two-value loss-function result: no loss, the greedy id of each row [b]."""
    logits = output["logits"]  # [b, 1, V] the last fed position's, gathered over TP ranks
    return torch.zeros((), device=logits.device), logits[:, -1, :vocab_limit].float().argmax(-1)


@contextlib.contextmanager
def sequence_parallel_off(chunks: List[torch.nn.Module]):
    """Sequence parallelism off in every module and config of ``chunks`` while in the context."""
    switched = {}
    for chunk in chunks:
        for module in chunk.modules():
            for owner in (module, getattr(module, "config", None)):
                if getattr(owner, "sequence_parallel", None) is True:
                    switched[id(owner)] = owner
    for owner in switched.values():
        owner.sequence_parallel = False
    try:
        yield
    finally:
        for owner in switched.values():
            owner.sequence_parallel = True


def _run_step(chunks, batches: List[_MicroBatch], embed, vocab_limit: int, device) -> List[List[int]]:
    """One prefill or decode step of every micro-batch; their rows' greedy ids, on every rank."""
    inputs = [batch.step_input(embed, device) for batch in batches]
    reports = forward_only(partial(_forward_step, vocab_limit), chunks, inputs)
    for batch, step in zip(batches, inputs):
        batch.context.increment_sequence_len_offset(step.tokens.shape[1])
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        ids = torch.cat(reports)  # [sum b]
    else:
        ids = torch.zeros(sum(step.rows for step in inputs), dtype=torch.long, device=device)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(ids, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    # host sync: which rows end decides the next step's rows and shapes
    ids = ids.tolist()
    split, start = [], 0
    for step in inputs:
        split.append(ids[start:start + step.rows])
        start += step.rows
    return split


@torch.no_grad()
def generate_with_cache(chunks: List[torch.nn.Module], queries: List[Query], micro_batch: int, max_new_tokens: int,
                        eos_id: int, max_length: int, vocab_limit: int) -> List[List[int]]:
    """Greedy ids after each query until EOS (not included), ``max_new_tokens`` ids or ``max_length``
    positions: the same ids as ``Runner.generate``'s reference (collective over the model's ranks)."""
    if not queries:
        return []
    device = next(chunks[0].parameters()).device
    order = sorted(range(len(queries)), key=lambda i: queries[i].length)
    groups: List[List[Optional[int]]] = [order[i:i + micro_batch] for i in range(0, len(order), micro_batch)]
    interleaved = len(chunks) > 1
    if interleaved:  # the schedule runs micro-batches in groups of PP: filler rows make up the count
        groups += [[None]] * (-len(groups) % parallel_state.get_pipeline_model_parallel_world_size())
    filler = Query([PAD_ID], None, [], 1)  # one text position: no vision encoder work
    members = [[filler if q is None else queries[q] for q in group] for group in groups]
    spans = [[q.length for q in group] for group in members]
    # decode steps after the prefill: to the longest prompt's end, then the answer's ids
    steps = [max(n) - min(n) + max_new_tokens for n in spans]
    if interleaved:  # every micro-batch steps until all have ended
        steps = [max(steps)] * len(steps)
    first_stage = get_attr_wrapped_model(chunks[0], "pre_process")
    embed = get_attr_wrapped_model(chunks[0], "input_embeddings") if first_stage else None
    generated = [[] for _ in queries]
    with sequence_parallel_off(chunks):
        batches = []
        for group, rows, lengths, reach in zip(groups, members, spans, steps):
            prompt = None
            if embed is not None:
                batch = query_batch(rows, max(lengths)).to(device)
                prompt = embed(batch.tokens, batch.position_ids, batch.image_index, batch.images, None)  # [S, b, h]
            batches.append(_MicroBatch(list(group), lengths, prompt, min(lengths) + reach))
        while batches:
            for batch, ids in zip(batches, _run_step(chunks, batches, embed, vocab_limit, device)):
                batch.record(ids, generated, eos_id, max_new_tokens, max_length)
            if interleaved:  # every micro-batch steps until all have ended
                batches = [] if all(all(b.done) for b in batches) else batches
            else:
                batches = [b for b in batches if b.drop_ended()]
    return generated
