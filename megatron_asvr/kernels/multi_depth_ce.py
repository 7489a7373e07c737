"""Fused multi-depth linear + cross-entropy, vocab-parallel, without [D, N, V] logits.

Depth d's classifier is ``logits_d = h[d] @ W_d.T + b_d``, split over the ranks of a
tensor-parallel group by contiguous vocab slices. The op walks the depths one after the other
and each depth's rows in chunks of ``chunk_rows`` (from a memory budget, a multiple of 64),
reusing one [chunk_rows, V_local] logits buffer. There are no column tiles: with the chunk rows,
V_local and E multiples of 64 every GEMM is aligned. One loop, two modes:

- ``grads_in_forward`` (3 GEMMs per depth and chunk): the logits GEMM; one kernel reduces each
  row to its log-sum-exp, target logit and arg-max and overwrites the logits in place with the
  gradient ``(softmax - one_hot) * scale_d``; grad_h of the chunk from one GEMM over the whole
  local vocabulary (written once, one rounding); the weight gradient accumulated in fp32 (beta = 1
  over the chunks), the bias gradient summed in fp32. With a split vocabulary the chunk's row
  statistics are all-gathered first (one small collective) and a second kernel writes the
  gradient. Backward only scales the gradients by the per-depth grad_output.
- ``recompute`` (4 GEMMs): the forward keeps the row statistics only; backward recomputes the
  logits with the same loop and forms the gradients. For memory-critical runs.

Training (megatron's gradient-accumulation fusion): given ``grad_scale``, the per-depth
grad_output the loss will deliver (known before the step), grads_in_forward makes its gradients
already scaled and backward only checks, on the device, that the grad_output is that scale.
With ``main_grad`` the classifiers' weight and bias gradients accumulate straight into their
``param.main_grad`` (fp32) and backward hands megatron's DDP a dummy gradient with
``grad_added_to_main_grad`` set, so no weight gradient is held from forward to backward. A
forward without autograd (``torch.no_grad``, as in an activation checkpoint's first pass) makes
no gradients, so a recomputed forward accumulates exactly once.

Every rank gets the full grad_h, summed over the group per depth. grads_in_forward holds it from
forward to backward as a row shard: each depth's partial grad_h is reduce-scattered over the
group's ranks by rows in the forward and all-gathered in backward (the traffic of one all-reduce,
split in two), so a rank holds [D, N / tp, E]; recompute all-reduces it in backward. The
statistics and the losses are fp32.
"""

import functools
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron_asvr.kernels.backends import Kernels, select_kernels
from megatron_asvr.kernels.main_grad import added_to_main_grad

MODES = ("grads_in_forward", "recompute")
# The mode when neither the call nor ASVR_CE_MODE names one, on every device: measured faster than
# recompute at the head's shape on CPU (tools/bench_fused_ce.py), as on CUDA.
DEFAULT_MODE = "grads_in_forward"
DEFAULT_CHUNK_BYTES = 64 * 2**20  # the logits buffer of one chunk when chunk_rows is not given
ROW_ALIGN = 64  # default chunks are a multiple of this many rows
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)
NO_ID = torch.iinfo(torch.int64).max  # arg-max candidate of a rank that does not hold the maximum
# A GEMM of bf16 operands into an fp32 result (torch >= 2.8, CUDA only)
ADDMM_DTYPE_OUT = "dtype_out" in torch.ops.aten.addmm.overloads()


@functools.lru_cache(maxsize=256)
def _device_constant(values: Tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small constant tensor on ``device``, copied there once: a blocking host-to-device copy
    per call would be a host sync."""
    return torch.tensor(values, dtype=dtype, device=device)


def chunk_rows_for(budget_bytes: int, width: int, element_size: int) -> int:
    """Rows of a chunk whose [rows, width] logits fit ``budget_bytes``: a multiple of ROW_ALIGN."""
    return max(ROW_ALIGN, budget_bytes // (width * element_size) // ROW_ALIGN * ROW_ALIGN)


def default_mode(device: torch.device) -> str:
    """$ASVR_CE_MODE when set, else DEFAULT_MODE (the same on every ``device``, measured)."""
    mode = os.environ.get("ASVR_CE_MODE")
    if mode:
        if mode not in MODES:
            raise ValueError(f"ASVR_CE_MODE={mode!r}: expected one of {MODES}")
        return mode
    return DEFAULT_MODE


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
        """Global target ids [M, D] -> this rank's column of each target, or -1: [D, M]."""
        start = _device_constant(self.start, torch.int64, targets.device).unsqueeze(1)
        width = _device_constant(self.width, torch.int64, targets.device).unsqueeze(1)
        local = targets.t() - start
        return torch.where((local >= 0) & (local < width), local, -1).contiguous()


@dataclass(frozen=True)
class _Plan:
    """Everything about one call that is not a tensor."""

    shard: VocabShard
    chunk_rows: int
    kernels: Kernels
    group: Optional[dist.ProcessGroup]  # None when the vocab is not split
    has_bias: bool
    mode: str  # one of MODES
    main_grad: bool  # classifier gradients accumulate into param.main_grad
    scaled: bool  # grads_in_forward made its gradients with grad_scale: backward only checks it
    need: Tuple[bool, ...]  # gradient wanted: hidden, W_0..W_{D-1}[, b_0..b_{D-1}]


def _chunks(rows: int, chunk_rows: int):
    for begin in range(0, rows, chunk_rows):
        yield begin, min(rows, begin + chunk_rows)


def _addmm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: int) -> None:
    """acc <- beta * acc + a @ b (beta 0 or 1), the product accumulated in acc's dtype."""
    if a.dtype == acc.dtype:
        if beta:
            acc.addmm_(a, b)
        else:
            torch.mm(a, b, out=acc)
    elif acc.is_cuda and ADDMM_DTYPE_OUT:  # bf16 operands, fp32 accumulator: one rounding at the end
        torch.addmm(acc, a, b, beta=beta, out_dtype=acc.dtype, out=acc)
    else:  # no mixed-dtype GEMM here (CPU, or torch < 2.8): the product is rounded to bf16 once
        product = torch.mm(a, b)
        if beta:
            acc.add_(product)
        else:
            acc.copy_(product)


class _Gradients:
    """Where one sweep's gradients go: grad of the selected rows [D, M, E], and per classifier its
    ``main_grad`` (accumulated) or a new tensor of the parameter's dtype (accumulated in fp32)."""

    def __init__(self, plan: _Plan, hidden: torch.Tensor, params: Sequence[torch.Tensor], num_rows: int):
        depths = hidden.shape[0]
        self.plan, self.depths, self.num_rows = plan, depths, num_rows
        # grads_in_forward over a split vocabulary holds grad_h until backward as a 1 / tp row shard
        # (reduce-scattered in the forward, all-gathered in backward: the all-reduce's traffic, split);
        # each depth's partial rows are made in one of two [M_pad, E] buffers, taken in turn
        self.sharded = plan.need[0] and plan.group is not None and plan.mode == "grads_in_forward"
        tp = plan.group.size() if self.sharded else 1
        padded, embed = -(-num_rows // tp) * tp, hidden.shape[2]
        self.rows = None  # [D, M, E] grad_h (all-reduced over the group, if any)
        self.shard = self.buffers = None
        if self.sharded:
            self.shard = hidden.new_empty(depths, padded // tp, embed)  # [D, M_pad / tp, E]
            self.buffers = [hidden.new_zeros(padded, embed) for _ in range(min(2, depths))]  # padding rows stay 0
            self.pending = [None] * len(self.buffers)  # the reduce-scatter reading each buffer
        elif plan.need[0]:
            self.rows = hidden.new_empty(depths, num_rows, embed)
        self.params = list(params)
        self.chunked = num_rows > plan.chunk_rows
        self.handles = []  # in-flight all-reduces / reduce-scatters of grad_h
        self.grads: List[Optional[torch.Tensor]] = [None] * len(params)  # returned (not main_grad)
        self._accumulator: Optional[torch.Tensor] = None  # fp32 [V, E] for chunked bf16 weights
        self._accumulating: Optional[int] = None  # the param whose gradient the accumulator holds

    def _weight_target(self, i: int, first: bool) -> Tuple[torch.Tensor, int]:
        """(tensor the weight gradient of param i accumulates into, beta of this chunk)."""
        param = self.params[i]
        if self.plan.main_grad:
            return param.main_grad, 1
        if param.dtype == torch.float32 or not self.chunked:  # written in its dtype, one rounding
            if first:
                self.grads[i] = torch.empty_like(param)
            return self.grads[i], 0 if first else 1
        if self._accumulator is None or self._accumulator.shape[0] < param.shape[0]:
            self._accumulator = torch.empty(param.shape, dtype=torch.float32, device=param.device)
        self._accumulating = i
        return self._accumulator[: param.shape[0]], 0 if first else 1

    def add_chunk(self, d: int, begin: int, grad_logits: torch.Tensor, h: torch.Tensor,
                  weight: torch.Tensor) -> None:
        """The gradients of one chunk from its gradient w.r.t. the logits [r, V_local] (GEMMs 2, 3)."""
        first = begin == 0
        if self.sharded:
            slot = d % len(self.buffers)
            if first and self.pending[slot] is not None:  # the buffer's previous depth is reduced
                self.pending[slot].wait()
            torch.mm(grad_logits, weight, out=self.buffers[slot][begin : begin + h.shape[0]])  # [r, E]
        elif self.rows is not None:
            torch.mm(grad_logits, weight, out=self.rows[d, begin : begin + h.shape[0]])  # [r, E]
        if self.plan.need[1 + d]:
            target, beta = self._weight_target(1 + d, first)
            _addmm_(target, grad_logits.t(), h, beta)  # [V_local, E]
        b = 1 + self.depths + d
        if self.plan.has_bias and self.plan.need[b]:
            column_sums = grad_logits.sum(dim=0, dtype=torch.float32)  # [V_local]
            if self.plan.main_grad:
                self.params[b].main_grad.add_(column_sums)
            elif first:
                self.grads[b] = column_sums
            else:
                self.grads[b].add_(column_sums)

    def finish_depth(self, d: int) -> None:
        """Depth d is done: start its grad_h all-reduce; weight and bias gradients to their dtype."""
        if self.sharded:
            slot = d % len(self.buffers)
            self.pending[slot] = dist.reduce_scatter_tensor(self.shard[d], self.buffers[slot], group=self.plan.group,
                                                            async_op=True)
            self.handles.append(self.pending[slot])
        elif self.rows is not None and self.plan.group is not None:
            self.handles.append(dist.all_reduce(self.rows[d], group=self.plan.group, async_op=True))
        for i in (1 + d, 1 + self.depths + d):
            if i >= len(self.params) or not self.plan.need[i] or self.plan.main_grad:
                continue
            if self._accumulating == i:  # chunked bf16 weight: rounded once, from fp32
                self.grads[i] = self._accumulator[: self.params[i].shape[0]].to(self.params[i].dtype)
            elif self.grads[i] is None:  # no rows
                self.grads[i] = torch.zeros_like(self.params[i])
            elif self.grads[i].dtype != self.params[i].dtype:  # fp32 bias sums
                self.grads[i] = self.grads[i].to(self.params[i].dtype)

    def finish(self) -> None:
        for handle in self.handles:
            handle.wait()
        self.handles, self._accumulator, self.buffers, self.pending = [], None, None, None

    def scale_(self, grad_loss: torch.Tensor) -> None:
        """Multiply every gradient by its depth's grad_output [D], in place (no host sync)."""
        for rows in (self.rows, self.shard):
            if rows is not None:
                rows.mul_(grad_loss.view(-1, 1, 1))
        for i, grad in enumerate(self.grads):
            if grad is not None:
                grad.mul_(grad_loss[(i - 1) % self.depths])

    def hidden_grad(self, hidden_shape: torch.Size, row_index: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """grad_h [D, N, E] (the selected rows' gradient scattered into zeros when ``row_index`` is given)."""
        if self.sharded:  # the row shards back together, one all-gather per depth
            full = self.shard.new_empty(self.depths, self.shard.shape[1] * self.plan.group.size(), self.shard.shape[2])
            handles = [dist.all_gather_into_tensor(full[d], self.shard[d], group=self.plan.group, async_op=True)
                       for d in range(self.depths)]
            for handle in handles:
                handle.wait()
            self.rows, self.shard = full[:, : self.num_rows], None
        if self.rows is None or row_index is None:
            return self.rows
        return self.rows.new_zeros(hidden_shape).index_copy_(1, row_index, self.rows)

    def param_grads(self) -> List[Optional[torch.Tensor]]:
        """The parameters' gradients; with main_grad, megatron's protocol (kernels/main_grad.py)."""
        if not self.plan.main_grad:
            return self.grads[1:]
        return [added_to_main_grad(param) if need else None
                for param, need in zip(self.params[1:], self.plan.need[1:])]


def _logits(buffer: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
    """GEMM 1: the chunk's logits [r, V_local] in the front of the flat buffer."""
    out = buffer[: h.shape[0] * weight.shape[0]].view(h.shape[0], weight.shape[0])
    if bias is None:
        torch.mm(h, weight.t(), out=out)
    else:
        torch.addmm(bias, h, weight.t(), out=out)
    return out


def _combine_over_ranks(group: dist.ProcessGroup, local: torch.Tensor):
    """Local (max, sumexp, target logit) [r, 3] -> global (lse, target logit, max) [r] each, from
    one all-gather; every rank combines the same numbers in rank order (identical results)."""
    world = dist.get_world_size(group)
    gathered = local.new_empty((world * local.shape[0], 3))
    dist.all_gather_into_tensor(gathered, local, group=group)
    gathered = gathered.view(world, -1, 3)  # [tp, r, 3]
    max_ = gathered[..., 0].max(dim=0).values
    sumexp = (gathered[..., 1] * torch.exp(gathered[..., 0] - max_)).sum(dim=0)  # ranks without codes: 0
    return max_ + torch.log(sumexp), gathered[..., 2].sum(dim=0), max_


def _chunk_statistics(plan: _Plan, d: int, logits: torch.Tensor, targets: torch.Tensor,
                      scale: Optional[torch.Tensor]):
    """(lse, target logit, arg-max candidate) [r] of a chunk's logits; with ``scale`` [1] the logits
    become the gradient (softmax - one_hot) * scale in place. The candidate is the global id of the
    row's first maximum where this rank holds the global maximum, else NO_ID."""
    valid = plan.shard.valid[d]
    if plan.group is None:
        if scale is not None:
            return plan.kernels.ce_rows_(logits, targets, valid, scale)
        max_, sumexp, target_logit, argmax = plan.kernels.row_stats(logits, targets, valid)
        return max_ + torch.log(sumexp), target_logit, argmax
    max_, sumexp, target_logit, argmax = plan.kernels.row_stats(logits, targets, valid)
    lse, target_logit, global_max = _combine_over_ranks(plan.group, torch.stack([max_, sumexp, target_logit], 1))
    if scale is not None:
        plan.kernels.softmax_grad_(logits, targets, lse, scale, valid)
    candidate = torch.where((argmax >= 0) & (max_ == global_max), argmax + plan.shard.start[d], NO_ID)
    return lse, target_logit, candidate


def _sweep(plan: _Plan, hidden: torch.Tensor, row_index: Optional[torch.Tensor], targets: torch.Tensor,
           weights: Sequence[torch.Tensor], biases: Optional[Sequence[torch.Tensor]],
           scale: Optional[torch.Tensor] = None, grads: Optional[_Gradients] = None,
           lse: Optional[torch.Tensor] = None):
    """The op's loop over depths and row chunks of hidden [D, N, E] (rows ``row_index``, or all).

    targets [D, M]: local columns. Without ``scale``: row statistics only. With ``scale`` [D]:
    the gradients too, into ``grads``, from statistics computed here, or, given ``lse`` [D, M]
    (recompute's backward), from those. Returns (lse, target logit, arg-max candidate) [D, M]
    when it computed statistics.
    """
    depths, num_rows = targets.shape
    stats = None
    if lse is None:
        f32 = dict(dtype=torch.float32, device=hidden.device)
        stats = (torch.empty(depths, num_rows, **f32), torch.empty(depths, num_rows, **f32),
                 torch.empty(depths, num_rows, dtype=torch.int64, device=hidden.device))
    chunk = min(plan.chunk_rows, num_rows)
    buffer = hidden.new_empty(chunk * max(plan.shard.width))  # one chunk's logits
    rows_buffer = hidden.new_empty(chunk * hidden.shape[2]) if row_index is not None else None
    for d in range(depths):
        weight, bias = weights[d], None if biases is None else biases[d]
        depth_scale = None if scale is None else scale[d : d + 1]
        for begin, end in _chunks(num_rows, plan.chunk_rows):
            if row_index is None:
                h = hidden[d, begin:end]  # [r, E]
            else:
                h = torch.index_select(hidden[d], 0, row_index[begin:end],
                                       out=rows_buffer[: (end - begin) * hidden.shape[2]].view(end - begin, -1))
            logits = _logits(buffer, h, weight, bias)  # [r, V_local]
            if lse is None:
                for full, part in zip(stats, _chunk_statistics(plan, d, logits, targets[d, begin:end], depth_scale)):
                    full[d, begin:end] = part
            else:
                plan.kernels.softmax_grad_(logits, targets[d, begin:end], lse[d, begin:end], depth_scale,
                                           plan.shard.valid[d])
            if grads is not None:
                grads.add_chunk(d, begin, logits, h, weight)
        if grads is not None:
            grads.finish_depth(d)
    if grads is not None:
        grads.finish()
    return stats


def _outputs(plan: _Plan, stats, targets: torch.Tensor, depth_weights: torch.Tensor):
    """(loss_sum [D], count [D], correct [D]) from the statistics [D, M] of the rows' targets [M, D]."""
    lse, target_logit, candidate = stats
    if plan.group is not None:  # the lowest global id among the ranks holding the maximum
        dist.all_reduce(candidate, op=dist.ReduceOp.MIN, group=plan.group)
    depths, num_rows = lse.shape
    loss_sum = (lse - target_logit).sum(dim=1) * depth_weights
    count = torch.full((depths,), num_rows, dtype=torch.int64, device=lse.device)
    correct = (candidate == targets.t()).sum(dim=1)
    return loss_sum, count, correct


def _split(plan: _Plan, params: Sequence[torch.Tensor], depths: int):
    return params[:depths], (params[depths:] if plan.has_bias else None)


class _MultiDepthCrossEntropy(torch.autograd.Function):
    """Autograd of the fused op; params = (W_0..W_{D-1}[, b_0..b_{D-1}])."""

    @staticmethod
    def forward(ctx, plan: _Plan, hidden, targets, row_index, depth_weights, grad_scale, *params):
        depths = hidden.shape[0]
        weights, biases = _split(plan, params, depths)
        targets = targets if row_index is None else targets.index_select(0, row_index)  # [M, D]
        local = plan.shard.local_targets(targets)  # [D, M]
        if plan.mode == "grads_in_forward":
            scale = depth_weights if grad_scale is None else depth_weights * grad_scale
            grads = _Gradients(plan, hidden, (hidden, *params), local.shape[1])
            stats = _sweep(plan, hidden, row_index, local, weights, biases, scale=scale, grads=grads)
            ctx.grads, ctx.grad_scale = grads, grad_scale
            ctx.save_for_backward(row_index)
        else:
            stats = _sweep(plan, hidden, row_index, local, weights, biases)
            ctx.save_for_backward(hidden, local, stats[0], depth_weights, row_index, *params)
        ctx.plan, ctx.hidden_shape = plan, hidden.shape
        loss_sum, count, correct = _outputs(plan, stats, targets, depth_weights)
        ctx.mark_non_differentiable(count, correct)
        return loss_sum, count, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_count, _grad_correct):
        plan: _Plan = ctx.plan
        if plan.mode == "grads_in_forward":
            grads, ctx.grads = ctx.grads, None
            if grads is None:
                raise RuntimeError(
                    "multi_depth_cross_entropy: backward ran twice, but mode='grads_in_forward' made its "
                    "gradients in the forward and the first backward consumed them; use mode='recompute' "
                    "to backward more than once (retain_graph=True)"
                )
            if plan.scaled:  # checked on the device: no host sync; a mismatch stops at the next sync
                torch._assert_async(
                    torch.all(grad_loss == ctx.grad_scale),
                    "multi_depth_cross_entropy: the loss's gradient differs from the grad_scale its "
                    "gradients were made with (the loss weights or megatron's loss scaling changed)",
                )
            else:
                grads.scale_(grad_loss)
            (row_index,) = ctx.saved_tensors
        else:
            hidden, local, lse, depth_weights, row_index, *params = ctx.saved_tensors
            weights, biases = _split(plan, params, hidden.shape[0])
            grads = _Gradients(plan, hidden, (hidden, *params), local.shape[1])
            scale = (grad_loss.float() * depth_weights).contiguous()  # [D]
            _sweep(plan, hidden, row_index, local, weights, biases, scale=scale, grads=grads, lse=lse)
        return (None, grads.hidden_grad(ctx.hidden_shape, row_index), None, None, None, None,
                *grads.param_grads())


def _check_inputs(hidden, weights, biases, targets, vocab_sizes, row_mask, row_index, world_size) -> None:
    """Raise ValueError naming the argument, depth and problem for malformed inputs."""
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [D, N, E], got shape {tuple(hidden.shape)}")
    depths, n, embed = hidden.shape
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
    limit = _device_constant(tuple(vocab_sizes), torch.int64, targets.device)
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


def _per_depth(values, depths: int, device: torch.device, name: str) -> torch.Tensor:
    """A [D] fp32 tensor on ``device`` from a tensor (kept on its device) or a sequence (cached)."""
    if torch.is_tensor(values):
        values = values.detach().to(device=device, dtype=torch.float32)
    else:
        values = _device_constant(tuple(float(v) for v in values), torch.float32, device)
    if values.shape != (depths,):
        raise ValueError(f"{name} must have {depths} entries, got {tuple(values.shape)}")
    return values.contiguous()


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
    mode: Optional[str] = None,
    grad_scale: Optional[torch.Tensor] = None,
    main_grad: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-depth cross-entropy sums of D vocab-parallel classifiers over hidden [D, N, E].

    weights[d] [V_local_d, E] (and biases[d] [V_local_d] or None) are rank r's slice of depth d's
    padded classifier, global ids [r * V_local_d, (r + 1) * V_local_d); ids >= vocab_sizes[d] are
    padding. targets [N, D] are global ids; rows where row_mask [N] is False count for nothing;
    ``row_index`` [M] (the rows that count, instead of a mask) spares the host sync that counting a
    mask's rows costs. hidden must be identical on all ranks of ``group``. Returns, summed over the
    group and identical on every rank: loss_sum [D] fp32 (depth_weights[d] * sum of CE_d;
    differentiable w.r.t. hidden, weights, biases), count [D] int64 (rows that count) and correct
    [D] int64 (top-1 hits, ties to the lowest id). At most ``chunk_rows`` rows of logits exist at a
    time (default: a 64 MiB buffer, rounded down to a multiple of 64 rows).

    ``mode``: "grads_in_forward" or "recompute" (module docstring); default ``default_mode``.
    ``grad_scale`` [D]: the gradient the caller's backward will deliver to loss_sum, known before
    the step; grads_in_forward then makes its gradients scaled by it, and backward checks it on the
    device. ``main_grad``: the weight and bias gradients accumulate into each parameter's
    ``main_grad`` (megatron's DDP buffers), in the forward for grads_in_forward (which then needs
    ``grad_scale``), in the backward for recompute.
    """
    world_size = dist.get_world_size(group) if group is not None else 1
    _check_inputs(hidden, weights, biases, targets, vocab_sizes, row_mask, row_index, world_size)
    depths = hidden.shape[0]
    mode = mode or default_mode(hidden.device)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    shard = VocabShard.of_rank(
        [w.shape[0] for w in weights], vocab_sizes, dist.get_rank(group) if group is not None else 0
    )
    if chunk_rows is None:
        chunk_rows = chunk_rows_for(DEFAULT_CHUNK_BYTES, max(shard.width), hidden.element_size())
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if row_mask is not None:
        row_index = torch.nonzero(row_mask).squeeze(1)  # host sync (the output's size): pass row_index instead
    params = tuple(weights) + (tuple(biases) if biases is not None else ())
    need = (hidden.requires_grad,) + tuple(p.requires_grad for p in params)
    differentiable = torch.is_grad_enabled() and any(need)
    if main_grad and differentiable:
        missing = [i for i, p in enumerate(params) if p.requires_grad and not hasattr(p, "main_grad")]
        if missing:
            raise ValueError(f"main_grad=True but classifier parameters {missing} have no .main_grad "
                             "(megatron's DistributedDataParallel gives them one)")
        if mode == "grads_in_forward" and grad_scale is None:
            raise ValueError("main_grad=True in mode 'grads_in_forward' needs grad_scale: the gradients "
                             "accumulate in the forward, before the loss's gradient is known")
    plan = _Plan(
        shard=shard,
        chunk_rows=chunk_rows,
        kernels=select_kernels(hidden.device, backend),
        group=group if world_size > 1 else None,
        has_bias=biases is not None,
        mode=mode,
        main_grad=main_grad,
        scaled=mode == "grads_in_forward" and grad_scale is not None,
        need=need,
    )
    depth_weights = _per_depth([1.0] * depths if depth_weights is None else depth_weights, depths,
                               hidden.device, "depth_weights")
    if grad_scale is not None:
        grad_scale = _per_depth(grad_scale, depths, hidden.device, "grad_scale")
    if not differentiable:  # row statistics only: no gradient is made or accumulated
        with torch.no_grad():
            selected = targets if row_index is None else targets.index_select(0, row_index)
            weights_, biases_ = _split(plan, params, depths)
            stats = _sweep(plan, hidden, row_index, shard.local_targets(selected), weights_, biases_)
            return _outputs(plan, stats, selected, depth_weights)
    return _MultiDepthCrossEntropy.apply(plan, hidden, targets, row_index, depth_weights, grad_scale, *params)
