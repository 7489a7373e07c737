"""Fused multi-depth linear + cross-entropy, vocab-parallel, without [N, D, V] logits.

For each depth d the classifier is ``logits_d = h[:, d] @ W_d.T + b_d``, split over
the ranks of a tensor-parallel group by contiguous vocab slices. The forward pass
walks row chunks: per chunk one GEMM per depth fills a buffer of
``chunk_rows x sum(V_local_d)`` logits and one kernel (csrc/, or the plain-torch
twin) reduces every (row, depth) to its max, sum of exponentials, target logit and
arg-max. Those statistics are combined over the ranks as in megatron's
vocab-parallel cross entropy (max all-reduce, rescaled sum-exp all-reduce, target
logit from the owning rank) plus an arg-min of global ids for the top-1. Backward
walks the same number of tiles, cut by vocab columns instead of rows (all rows, a
1/k slice of every depth's columns, about the same buffer): it recomputes the
tile's logits, overwrites them in place with ``(softmax - one_hot) * dloss_d``
(one kernel for all depths) and forms the gradients with GEMMs. Cutting by columns
writes each row of grad_W and grad_b exactly once (no read-modify-write of the
weight gradient per chunk, no repeated bf16 rounding); grad_h accumulates over the
tiles in fp32 and is all-reduced over the group, so every rank gets the full
gradient.
"""

import functools
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron_asvr.kernels.backends import Kernels, select_kernels

# Logits buffer of one chunk when chunk_rows is not given.
DEFAULT_CHUNK_BYTES = 64 * 2**20
COLUMN_ALIGN = 64  # backward tiles are cut at multiples of this many columns
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)


@functools.lru_cache(maxsize=256)
def _device_ints(values: Tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A small constant int64 tensor on ``device``, copied there once: a blocking
    host-to-device copy per call would be a host sync."""
    return torch.tensor(values, device=device)


@dataclass(frozen=True)
class VocabShard:
    """This rank's contiguous slice of every depth's (padded) vocabulary."""

    start: Tuple[int, ...]  # global id of local column 0, per depth
    width: Tuple[int, ...]  # local columns V_local_d
    valid: Tuple[int, ...]  # local columns that are real codes (global id < V_d)

    @classmethod
    def of_rank(cls, local_sizes: Sequence[int], vocab_sizes: Sequence[int], rank: int) -> "VocabShard":
        start = tuple(rank * w for w in local_sizes)
        valid = tuple(max(0, min(w, v - s)) for w, v, s in zip(local_sizes, vocab_sizes, start))
        return cls(start, tuple(local_sizes), valid)

    def local_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """Global target ids [M, D] -> this rank's column of each target, or -1."""
        start = _device_ints(tuple(self.start), targets.device)
        width = _device_ints(tuple(self.width), targets.device)
        local = targets - start
        return torch.where((local >= 0) & (local < width), local, -1).contiguous()


@dataclass(frozen=True)
class _Plan:
    """Everything about one call that is not a tensor."""

    shard: VocabShard
    chunk_rows: int
    kernels: Kernels
    group: Optional[dist.ProcessGroup]  # None when the vocab is not split
    has_bias: bool


def _chunks(rows: int, chunk_rows: int):
    for begin in range(0, rows, chunk_rows):
        yield begin, min(rows, begin + chunk_rows)


def _depth_blocks(buffer: torch.Tensor, rows: int, width: Sequence[int]):
    """[rows, width[d]] views of a chunk's flat logits buffer, in depth order."""
    offset = 0
    for w in width:
        yield buffer[offset : offset + rows * w].view(rows, w)
        offset += rows * w


def _column_steps(width: Sequence[int], count: int) -> List[int]:
    """Columns per block of each depth for about ``count`` blocks, a multiple of COLUMN_ALIGN: a
    block's [rows, step] logits then have 16-byte aligned rows, which GEMM kernels need to run
    at full speed (unaligned blocks fell back to slow kernels on an H100)."""
    return [max(COLUMN_ALIGN, -(-math.ceil(w / count) // COLUMN_ALIGN) * COLUMN_ALIGN) for w in width]


def _column_blocks(width: Sequence[int], step: Sequence[int]):
    """Blocks of every depth's columns, ``step[d]`` wide: per block, (begin[d], end[d]) lists."""
    for k in range(max(math.ceil(w / s) for w, s in zip(width, step))):
        yield [min(k * s, w) for s, w in zip(step, width)], [min((k + 1) * s, w) for s, w in zip(step, width)]


def _fill_logits(buffer, hidden_chunk, weights, biases, width) -> None:
    """buffer <- logits of every depth for hidden_chunk [r, D, E], one GEMM per depth."""
    for d, block in enumerate(_depth_blocks(buffer, hidden_chunk.shape[0], width)):
        h = hidden_chunk[:, d]  # [r, E]
        if biases is None:
            torch.mm(h, weights[d].t(), out=block)
        else:
            torch.addmm(biases[d], h, weights[d].t(), out=block)


def _combine_over_ranks(plan: _Plan, max_, sumexp, target_logit, argmax):
    """Local statistics [M, D] -> global (log-sum-exp, target logit, arg-max global id)."""
    start = _device_ints(tuple(plan.shard.start), argmax.device)
    no_id = torch.iinfo(torch.int64).max
    global_arg = torch.where(argmax >= 0, argmax + start, no_id)
    if plan.group is None:
        return max_ + torch.log(sumexp), target_logit, global_arg
    global_max = max_.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=plan.group)
    sums = torch.stack([sumexp * torch.exp(max_ - global_max), target_logit])  # [2, M, D]
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=plan.group)
    candidate = torch.where(max_ == global_max, global_arg, no_id)
    dist.all_reduce(candidate, op=dist.ReduceOp.MIN, group=plan.group)
    return global_max + torch.log(sums[0]), sums[1], candidate


class _MultiDepthCrossEntropy(torch.autograd.Function):
    """Autograd of the fused op; params = (W_0..W_{D-1}[, b_0..b_{D-1}])."""

    @staticmethod
    def forward(ctx, plan: _Plan, hidden, targets, row_index, depth_weights, *params):
        depths = hidden.shape[1]
        weights = params[:depths]
        biases = params[depths:] if plan.has_bias else None
        rows = hidden if row_index is None else hidden.index_select(0, row_index)  # [M, D, E]
        rows = rows.contiguous()
        targets = targets if row_index is None else targets.index_select(0, row_index)  # [M, D]
        local_targets = plan.shard.local_targets(targets)  # [M, D]
        num_rows = rows.shape[0]

        stats = [
            torch.empty(num_rows, depths, dtype=dtype, device=hidden.device)
            for dtype in (torch.float32, torch.float32, torch.float32, torch.int64)
        ]  # max, sumexp, target logit, arg-max column: [M, D] each
        buffer = hidden.new_empty(min(plan.chunk_rows, num_rows) * sum(plan.shard.width))
        for begin, end in _chunks(num_rows, plan.chunk_rows):
            _fill_logits(buffer, rows[begin:end], weights, biases, plan.shard.width)
            chunk_stats = plan.kernels.row_stats(
                buffer, local_targets[begin:end], plan.shard.width, plan.shard.valid
            )
            for full, part in zip(stats, chunk_stats):
                full[begin:end] = part
        del buffer
        lse, target_logit, prediction = _combine_over_ranks(plan, *stats)  # [M, D] each

        loss_sum = (lse - target_logit).sum(dim=0) * depth_weights  # [D]
        count = torch.full((depths,), num_rows, dtype=torch.int64, device=hidden.device)
        correct = (prediction == targets).sum(dim=0)  # [D]
        ctx.plan = plan
        ctx.hidden_shape = hidden.shape
        ctx.save_for_backward(rows, local_targets, lse, depth_weights, row_index, *params)
        ctx.mark_non_differentiable(count, correct)
        return loss_sum, count, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_count, _grad_correct):
        plan: _Plan = ctx.plan
        rows, local_targets, lse, depth_weights, row_index, *params = ctx.saved_tensors
        num_rows, depths, _ = rows.shape
        weights = params[:depths]
        biases = params[depths:] if plan.has_bias else None
        need_hidden = ctx.needs_input_grad[1]
        need_weight = ctx.needs_input_grad[5 : 5 + depths]
        need_bias = ctx.needs_input_grad[5 + depths :] if plan.has_bias else (False,) * depths
        scale = (grad_loss.float() * depth_weights).contiguous()  # [D]: dloss_d * depth weight

        # grad_h sums over column blocks: fp32 accumulator [M, D, E].
        grad_rows = rows.new_zeros(rows.shape, dtype=torch.float32) if need_hidden else None
        grad_weights = [torch.empty_like(w) if need else None for w, need in zip(weights, need_weight)]
        grad_biases = [torch.empty(b.shape, dtype=torch.float32, device=b.device) for b in biases or ()]
        # about as many tiles as forward chunks: a buffer about the forward one's size
        step = _column_steps(plan.shard.width, max(1, math.ceil(num_rows / plan.chunk_rows)))
        buffer = rows.new_empty(num_rows * sum(step))
        for begin, end in _column_blocks(plan.shard.width, step):
            width = [e - b for b, e in zip(begin, end)]
            valid = [max(0, min(w, v - b)) for w, v, b in zip(width, plan.shard.valid, begin)]
            block_targets = local_targets - _device_ints(tuple(begin), rows.device)
            block_targets = torch.where(
                (block_targets >= 0) & (block_targets < _device_ints(tuple(width), rows.device)), block_targets, -1
            )
            block_weights = [w[b:e] for w, b, e in zip(weights, begin, end)]
            block_biases = None if biases is None else [x[b:e] for x, b, e in zip(biases, begin, end)]
            _fill_logits(buffer, rows, block_weights, block_biases, width)
            plan.kernels.softmax_grad_(buffer, block_targets, lse, scale, width, valid)
            for d, grad_logits in enumerate(_depth_blocks(buffer, num_rows, width)):  # [M, w_d]
                if grad_rows is not None and rows.dtype == torch.float32:
                    grad_rows[:, d].addmm_(grad_logits, block_weights[d])
                elif grad_rows is not None:
                    grad_rows[:, d] += torch.mm(grad_logits, block_weights[d])
                if grad_weights[d] is not None:
                    torch.mm(grad_logits.t(), rows[:, d], out=grad_weights[d][begin[d] : end[d]])
                if need_bias[d]:
                    grad_biases[d][begin[d] : end[d]] = grad_logits.sum(dim=0, dtype=torch.float32)
        del buffer

        grad_hidden = None
        if grad_rows is not None:
            grad_rows = grad_rows.to(rows.dtype)
            if plan.group is not None:
                dist.all_reduce(grad_rows, group=plan.group)
            if row_index is None:
                grad_hidden = grad_rows
            else:
                grad_hidden = grad_rows.new_zeros(ctx.hidden_shape).index_copy_(0, row_index, grad_rows)
        grad_biases = [g.to(b.dtype) if need else None for g, b, need in zip(grad_biases, biases or (), need_bias)]
        return (None, grad_hidden, None, None, None, *grad_weights, *grad_biases)


def _check_inputs(hidden, weights, biases, targets, vocab_sizes, row_mask, row_index, world_size) -> None:
    """Raise ValueError naming the argument, depth and problem for malformed inputs."""
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [N, D, E], got shape {tuple(hidden.shape)}")
    n, depths, embed = hidden.shape
    if hidden.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"hidden must be float32 or bfloat16, got {hidden.dtype}")
    for name, seq in (("weights", weights), ("vocab_sizes", vocab_sizes)) + (
        (("biases", biases),) if biases is not None else ()
    ):
        if len(seq) != depths:
            raise ValueError(f"{name} has {len(seq)} entries for D={depths} depths")
    for d, w in enumerate(weights):
        if w.dim() != 2 or w.shape[1] != embed or w.dtype != hidden.dtype or w.device != hidden.device:
            raise ValueError(
                f"weights[{d}] must be [V_local, {embed}] {hidden.dtype} on {hidden.device}, "
                f"got {tuple(w.shape)} {w.dtype} on {w.device}"
            )
        if w.shape[0] * world_size < vocab_sizes[d] or vocab_sizes[d] < 1:
            raise ValueError(
                f"depth {d}: vocab size {vocab_sizes[d]} does not fit {world_size} rank(s) x "
                f"{w.shape[0]} local classes"
            )
        if biases is not None and (
            biases[d].shape != (w.shape[0],) or biases[d].dtype != w.dtype or biases[d].device != w.device
        ):
            raise ValueError(
                f"biases[{d}] must be [{w.shape[0]}] {w.dtype} on {w.device}, got "
                f"{tuple(biases[d].shape)} {biases[d].dtype} on {biases[d].device}"
            )
    if targets.shape != (n, depths) or targets.dtype != torch.int64:
        raise ValueError(f"targets must be int64 [{n}, {depths}], got {targets.dtype} {tuple(targets.shape)}")
    if row_mask is not None and (row_mask.shape != (n,) or row_mask.dtype != torch.bool):
        raise ValueError(f"row_mask must be bool [{n}], got {row_mask.dtype} {tuple(row_mask.shape)}")
    if row_index is not None and (row_index.dim() != 1 or row_index.dtype != torch.int64 or row_mask is not None):
        raise ValueError(f"row_index must be int64 [M] and excludes row_mask, got {row_index.dtype} "
                         f"{tuple(row_index.shape)}{' and a row_mask' if row_mask is not None else ''}")
    limit = _device_ints(tuple(vocab_sizes), targets.device)
    checked = targets if row_index is None else targets.index_select(0, row_index)
    bad = (checked < 0) | (checked >= limit)
    if row_mask is not None:
        bad &= row_mask.unsqueeze(1)
    if targets.is_cuda:  # checked on the device, without a host sync: a bad id stops at the next sync
        torch._assert_async(~bad.any(), "multi_depth_cross_entropy: a target id is outside its depth's vocabulary")
    elif bool(bad.any()):  # host tensors: no device to wait for
        if row_index is not None:
            bad = torch.zeros_like(targets, dtype=torch.bool).index_copy_(0, row_index, bad)
        row, d = (int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(
            f"targets[{row}, {d}] = {int(targets[row, d])} is outside depth {d}'s vocabulary "
            f"[0, {vocab_sizes[d]})"
        )


def multi_depth_cross_entropy(
    hidden: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Optional[Sequence[torch.Tensor]],
    targets: torch.Tensor,
    vocab_sizes: Sequence[int],
    row_mask: Optional[torch.Tensor] = None,
    depth_weights: Optional[Sequence[float]] = None,
    group: Optional[dist.ProcessGroup] = None,
    chunk_rows: Optional[int] = None,
    backend: str = "auto",
    row_index: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-depth cross-entropy sums of D vocab-parallel classifiers over hidden [N, D, E].

    weights[d] [V_local_d, E] (and biases[d] [V_local_d] or None) are rank r's slice of
    depth d's padded classifier, global ids [r * V_local_d, (r + 1) * V_local_d);
    ids >= vocab_sizes[d] are padding. targets [N, D] are global ids; rows where
    row_mask [N] is False count for nothing; ``row_index`` [M] (the rows that count, instead
    of a mask) spares the host sync that counting a mask's rows costs. hidden must be identical on all ranks
    of ``group``. Returns, summed over the group and identical on every rank:
    loss_sum [D] fp32 (depth_weights[d] * sum of CE_d; differentiable w.r.t. hidden,
    weights, biases), count [D] int64 (unmasked rows) and correct [D] int64 (top-1
    hits, ties to the lowest id). At most ``chunk_rows`` rows of logits (default: a
    64 MiB buffer), or in backward as many logits over column slices, exist at a
    time. Statistics, losses and the grad_h accumulation are fp32.
    """
    world_size = dist.get_world_size(group) if group is not None else 1
    _check_inputs(hidden, weights, biases, targets, vocab_sizes, row_mask, row_index, world_size)
    depths = hidden.shape[1]
    shard = VocabShard.of_rank(
        [w.shape[0] for w in weights], vocab_sizes, dist.get_rank(group) if group is not None else 0
    )
    if chunk_rows is None:
        bytes_per_row = sum(shard.width) * hidden.element_size()
        chunk_rows = max(1, DEFAULT_CHUNK_BYTES // bytes_per_row)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if row_mask is not None:
        row_index = torch.nonzero(row_mask).squeeze(1)  # host sync (the output's size): pass row_index instead
    num_rows = hidden.shape[0] if row_index is None else row_index.numel()
    if num_rows > 0:  # equal chunks instead of a short tail
        chunk_rows = math.ceil(num_rows / math.ceil(num_rows / chunk_rows))
    plan = _Plan(
        shard=shard,
        chunk_rows=chunk_rows,
        kernels=select_kernels(hidden.device, backend),
        group=group if world_size > 1 else None,
        has_bias=biases is not None,
    )
    if depth_weights is None:
        depth_weights = torch.ones(depths, dtype=torch.float32, device=hidden.device)
    else:
        depth_weights = torch.as_tensor(depth_weights, dtype=torch.float32, device=hidden.device)
        if depth_weights.shape != (depths,):
            raise ValueError(f"depth_weights must have {depths} entries, got {tuple(depth_weights.shape)}")
    params = tuple(weights) + (tuple(biases) if biases is not None else ())
    return _MultiDepthCrossEntropy.apply(plan, hidden, targets, row_index, depth_weights.detach(), *params)
