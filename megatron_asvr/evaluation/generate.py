"""Greedy generation with megatron's static KV cache (``StaticInferenceContext``).

    prefill:  prompt embeddings (vision encoder + projector: once per distinct image) -> decoder layers,
              micro-batch by micro-batch, which write every position's keys and values into
              their cache's rows (``batch_size_offset``)
    decode:   one position per step for all rows of a cache, [b, 1, h] through the pipeline,
              attending to the cache

A cache is one megatron context (per-layer [positions, rows, groups, d] buffers, allocated in
``Attention._adjust_key_value_for_inference``) with one shared position offset. Megatron's
forward-only pipeline schedule runs a step's micro-batches (prefill slices or whole caches) as in
training, sending each one's shape first (they differ).

Ragged prompts: right padding with one shared offset per cache, as megatron's static controller
does. The prefill stops at the cache's shortest prompt (where megatron's
``materialize_only_last_token_logits`` keeps the right row); longer prompts are fed on, one
position per decode step, from their cached embeddings (teacher forcing), their outputs unused
until their prompt ends. Every position thus keeps the uncached forward's RoPE angle and causal
mask. Queries are sorted by length; a cache takes consecutive ones whose prompts are at most
``max_new_tokens`` longer than its first (feeding them costs no more steps than an answer), so
that a decode step is a few large forwards, not one per micro-batch.

Rows end at EOS (not included), after ``max_new_tokens`` ids or at the model's last position.
Ended rows leave their cache and an emptied cache leaves the step. The interleaved (virtual
pipeline) schedule needs the same number of micro-batches, a multiple of PP, in every step: there
each cache is one micro-batch, filler caches make up the count, and ended rows ride along to the
last step.

Sequence parallelism is off while generating (a [b, 1] step cannot be split over TP ranks): the
same weights, with all-reduces in place of reduce-scatter / all-gather.
"""

import contextlib
from dataclasses import dataclass
from functools import partial
from typing import Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.utils import get_attr_wrapped_model

from megatron_asvr.evaluation.queries import PAD_ID, Query, query_batch
from megatron_asvr.training.schedule import eval_mode, forward_only

# Prefill forwards keep nothing for a backward and make the last position's logits only: they take more
# rows than a scoring micro-batch, as many as stay within this many positions (and at least micro_batch).
PREFILL_POSITIONS = 8192


def _rows_within(positions: int, per_row: int, at_least: int) -> int:
    return max(at_least, positions // max(per_row, 1))


@dataclass
class StepInput:
    """One micro-batch of a generation step, as ``forward_only`` hands it to the forward step."""

    tokens: torch.Tensor  # [b, s] zeros: the schedule reads its shape
    embeddings: Optional[torch.Tensor]  # [s, b, h] the first stage's input (None on later stages)
    context: StaticInferenceContext
    first_row: int  # of the context's rows

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]

    def to(self, device) -> "StepInput":
        return self  # built on the device


class _Cache:
    """Rows still generating that share one KV cache."""

    def __init__(self, owners: List[Optional[int]], lengths: List[int], prompt: Optional[torch.Tensor],
                 capacity: int, prefill_rows: int):
        self.owners = owners  # the query of each row; None: a filler row (results dropped)
        self.lengths = lengths  # each row's prompt positions
        self.prompt = prompt  # [S, b, h] prompt embeddings (first stage), S = the longest prompt
        self.context = StaticInferenceContext(len(owners), capacity)  # capacity: positions of the cache
        self.last = [0] * len(owners)  # each row's last generated id
        self.done = [owner is None for owner in owners]
        self.prefill_rows = prefill_rows  # rows per prefill micro-batch

    @property
    def offset(self) -> int:
        """Positions in the cache."""
        return self.context.sequence_len_offset

    def step_inputs(self, embed, device) -> List[StepInput]:
        """The next positions: the prompts up to the shortest one's end in micro-batches of
        ``prefill_rows`` rows (prefill), then one for every row."""
        start = self.offset
        end = min(self.lengths) if start == 0 else start + 1
        size = self.prefill_rows if start == 0 else len(self.owners)
        inputs = []
        for first in range(0, len(self.owners), size):
            rows = slice(first, first + size)
            embeddings = None
            if embed is not None:
                embeddings = self.prompt[start:end, rows]  # [s, b, h]
                if start > 0:
                    teacher = torch.tensor([start < n for n in self.lengths], device=device)  # [b] in the prompt
                    ids = torch.tensor(self.last, device=device)[:, None]  # [b, 1]
                    fed = embed(ids, None, None, None, None)  # [1, b, h]
                    prompt = self.prompt[min(start, len(self.prompt) - 1)]  # [b, h]
                    embeddings = torch.where(teacher[None, :, None], prompt, fed)
            tokens = torch.zeros(len(self.owners[rows]), end - start, dtype=torch.long, device=device)
            inputs.append(StepInput(tokens, embeddings, self.context, first))
        return inputs

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
            memory = self.context.key_value_memory_dict
            for layer, (keys, values) in memory.items():
                memory[layer] = (keys[:, rows], values[:, rows])  # [positions, rows, groups, d]
            self.owners, self.lengths, self.last, self.done = (
                [values[r] for r in rows] for values in (self.owners, self.lengths, self.last, self.done))
            if self.prompt is not None:
                self.prompt = self.prompt[:, rows]
        return bool(rows)


def _forward_step(vocab_limit: int, data_iterator: Iterator[StepInput], model):
    step = next(data_iterator)
    step.context.batch_size_offset = step.first_row  # where its keys and values go in the cache
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


def _run_step(chunks, caches: List[_Cache], embed, vocab_limit: int, device) -> List[List[int]]:
    """One prefill or decode step of every cache; their rows' greedy ids, on every rank."""
    inputs = [cache.step_inputs(embed, device) for cache in caches]
    flat = [step for steps in inputs for step in steps]
    reports = forward_only(partial(_forward_step, vocab_limit), chunks, flat)
    for cache, steps in zip(caches, inputs):
        cache.context.increment_sequence_len_offset(steps[0].tokens.shape[1])
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        ids = torch.cat(reports)  # [sum b]
    else:
        ids = torch.zeros(sum(step.rows for step in flat), dtype=torch.long, device=device)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(ids, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    # host sync: which rows end decides the next step's rows and shapes
    ids = ids.tolist()
    split, start = [], 0
    for cache in caches:
        split.append(ids[start:start + len(cache.owners)])
        start += len(cache.owners)
    return split


def _cache_rows(queries: List[Query], micro_batch: int, max_new_tokens: int, interleaved: bool) -> List[List[int]]:
    """The queries (indices, by length) of each cache: consecutive ones at most ``max_new_tokens``
    positions longer than the cache's first; with virtual pipeline stages one micro-batch each."""
    order = sorted(range(len(queries)), key=lambda i: queries[i].length)
    if interleaved:
        return [order[i:i + micro_batch] for i in range(0, len(order), micro_batch)]
    groups = [[order[0]]]
    for i in order[1:]:
        if queries[i].length - queries[groups[-1][0]].length <= max_new_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _image_features(chunk: torch.nn.Module, queries: List[Query], micro_batch: int, device) -> Dict[int, torch.Tensor]:
    """id(pixels) -> the image's features [T, P, h]: the vision encoder and projector run once per distinct
    image (questions on one image share its pixels tensor: evaluation/queries.py), as many images per
    forward as a prefill's rows (``PREFILL_POSITIONS``)."""
    image_features = get_attr_wrapped_model(chunk, "image_features")
    distinct = list({id(q.pixels): q.pixels for q in queries if q.pixels is not None}.values())
    largest = max((q.image_tokens[0] for q in queries if q.pixels is not None), default=1)  # its positions
    step, made = _rows_within(PREFILL_POSITIONS, largest, micro_batch), {}
    for first in range(0, len(distinct), step):
        images = distinct[first:first + step]
        out = image_features(torch.cat(images).to(device), None)  # [sum T, P, h]
        made.update(zip(map(id, images), out.split([p.shape[0] for p in images])))
    return made


@torch.no_grad()
def generate_with_cache(chunks: List[torch.nn.Module], queries: List[Query], micro_batch: int, max_new_tokens: int,
                        eos_id: int, max_length: int, vocab_limit: int) -> List[List[int]]:
    """Greedy ids after each query until EOS (not included), ``max_new_tokens`` ids or ``max_length``
    positions: the same ids as ``Runner.generate``'s reference (collective over the model's ranks)."""
    if not queries:
        return []
    device = next(chunks[0].parameters()).device
    interleaved = len(chunks) > 1
    groups: List[List[Optional[int]]] = _cache_rows(queries, micro_batch, max_new_tokens, interleaved)
    if interleaved:  # the schedule runs micro-batches in groups of PP: filler rows make up the count
        groups += [[None]] * (-len(groups) % parallel_state.get_pipeline_model_parallel_world_size())
    filler = Query([PAD_ID], None, [], 1)  # one text position: no vision encoder work
    members = [[filler if q is None else queries[q] for q in group] for group in groups]
    spans = [[q.length for q in group] for group in members]
    # decode steps after the prefill: to the longest prompt's end, then the answer's ids
    steps = [max(n) - min(n) + max_new_tokens for n in spans]
    if interleaved:  # every cache steps until all have ended
        steps = [max(steps)] * len(steps)
    first_stage = get_attr_wrapped_model(chunks[0], "pre_process")
    embed = get_attr_wrapped_model(chunks[0], "input_embeddings") if first_stage else None
    generated = [[] for _ in queries]
    with sequence_parallel_off(chunks), eval_mode(chunks):  # eval: also the embeddings outside the schedule
        features = _image_features(chunks[0], queries, micro_batch, device) if first_stage else {}
        caches = []
        for group, rows, lengths, reach in zip(groups, members, spans, steps):
            prompt, prefill_rows = None, _rows_within(PREFILL_POSITIONS, max(lengths), micro_batch)
            if embed is not None:  # prompt embeddings, prefill micro-batch by micro-batch
                parts = []
                for first in range(0, len(rows), prefill_rows):
                    part = rows[first:first + prefill_rows]
                    batch = query_batch(part, max(lengths)).to(device)
                    made = [features[id(q.pixels)] for q in part if q.pixels is not None]
                    parts.append(embed(batch.tokens, batch.position_ids, batch.image_index, None, None,
                                       features=torch.cat(made) if made else None))
                prompt = torch.cat(parts, dim=1)  # [S, b, h]
            caches.append(_Cache(list(group), lengths, prompt, min(lengths) + reach, prefill_rows))
        while caches:
            for cache, ids in zip(caches, _run_step(chunks, caches, embed, vocab_limit, device)):
                cache.record(ids, generated, eos_id, max_new_tokens, max_length)
            if interleaved:  # every cache steps until all have ended
                caches = [] if all(all(c.done) for c in caches) else caches
            else:
                caches = [c for c in caches if c.drop_ended()]
    return generated
