"""Plain-torch twins of the csrc kernels of the fused multi-depth cross-entropy.

Same buffer layout and results as csrc/fused_ce_cpu.cpp and csrc/fused_ce_cuda.cu
(see csrc/fused_ce_layout.h): a flat buffer holds, per depth d, a row-major
[rows, width[d]] block of logits; columns >= valid[d] are vocabulary padding;
targets [rows, D] is the target's column in the block or -1.
"""

from typing import Iterator, Sequence, Tuple

import torch


def _blocks(logits: torch.Tensor, rows: int, width: Sequence[int]) -> Iterator[torch.Tensor]:
    """Depth blocks of the flat buffer, each a [rows, width[d]] view."""
    offset = 0
    for w in width:
        yield logits[offset : offset + rows * w].view(rows, w)
        offset += rows * w


def row_stats(
    logits: torch.Tensor, targets: torch.Tensor, width: Sequence[int], valid: Sequence[int]
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per (row, depth): max, sum of exp(z - max), target logit, first arg-max; each [rows, D].

    Rows of a depth without valid columns get (-inf, 0, 0, -1).
    """
    rows, depths = targets.shape
    f32 = dict(dtype=torch.float32, device=logits.device)
    max_ = torch.full((rows, depths), float("-inf"), **f32)
    sumexp = torch.zeros(rows, depths, **f32)
    target_logit = torch.zeros(rows, depths, **f32)
    argmax = torch.full((rows, depths), -1, dtype=torch.int64, device=logits.device)
    for d, block in enumerate(_blocks(logits, rows, width)):
        if valid[d] == 0 or rows == 0:
            continue
        z = block[:, : valid[d]].float()  # [rows, valid_d]
        argmax[:, d] = z.argmax(dim=1)  # first maximal column
        max_[:, d] = z.gather(1, argmax[:, d : d + 1]).squeeze(1)
        sumexp[:, d] = torch.exp(z - max_[:, d : d + 1]).sum(dim=1)
        owned = (targets[:, d] >= 0) & (targets[:, d] < valid[d])
        picked = z.gather(1, targets[:, d : d + 1].clamp(0, valid[d] - 1)).squeeze(1)
        target_logit[:, d] = torch.where(owned, picked, 0.0)
    return max_, sumexp, target_logit, argmax


def softmax_grad_(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    scale: torch.Tensor,
    width: Sequence[int],
    valid: Sequence[int],
) -> None:
    """In place: each block <- (exp(z - lse) - one_hot(target)) * scale[d]; padding <- 0."""
    rows = targets.shape[0]
    for d, block in enumerate(_blocks(logits, rows, width)):
        z = block[:, : valid[d]].float()  # [rows, valid_d]
        grad = torch.exp(z - lse[:, d : d + 1])
        owned = (targets[:, d] >= 0) & (targets[:, d] < valid[d])  # [rows]
        if valid[d]:  # one-hot subtracted without a host sync (no nonzero)
            column = targets[:, d].clamp(0, valid[d] - 1).unsqueeze(1)  # [rows, 1]
            grad.scatter_add_(1, column, -owned.to(grad.dtype).unsqueeze(1))
        block[:, : valid[d]] = grad * scale[d]
        block[:, valid[d] :] = 0
