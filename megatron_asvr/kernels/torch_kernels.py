"""Plain-torch twins of the csrc kernels of the fused multi-depth cross-entropy.

Same arguments and results as csrc/fused_ce_cpu.cpp and csrc/fused_ce_cuda.cu (see
csrc/fused_ce_layout.h): logits [rows, width] hold one chunk of one depth; columns >= valid
are vocabulary padding; targets [rows] is the target's column in the chunk or -1; scale is a
float32 [1] tensor.
"""

from typing import Tuple

import torch


def row_stats(
    logits: torch.Tensor, targets: torch.Tensor, valid: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: max, sum of exp(z - max), target logit (0 where not owned), first arg-max; each [rows].

    Without valid columns: (-inf, 0, 0, -1).
    """
    rows = logits.shape[0]
    if valid == 0 or rows == 0:
        f32 = dict(dtype=torch.float32, device=logits.device)
        return (torch.full((rows,), float("-inf"), **f32), torch.zeros(rows, **f32), torch.zeros(rows, **f32),
                torch.full((rows,), -1, dtype=torch.int64, device=logits.device))
    z = logits[:, :valid].float()  # [rows, valid]
    argmax = z.argmax(dim=1)  # first maximal column
    max_ = z.gather(1, argmax.unsqueeze(1)).squeeze(1)
    sumexp = torch.exp(z - max_.unsqueeze(1)).sum(dim=1)
    owned = (targets >= 0) & (targets < valid)
    picked = z.gather(1, targets.clamp(0, valid - 1).unsqueeze(1)).squeeze(1)
    return max_, sumexp, torch.where(owned, picked, 0.0), argmax


def softmax_grad_(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor,
                  valid: int) -> None:
    """In place: logits <- (exp(z - lse) - one_hot(target)) * scale; padding columns <- 0."""
    z = logits[:, :valid].float()  # [rows, valid]
    grad = torch.exp(z - lse.unsqueeze(1))
    if valid:  # one-hot subtracted without a host sync (no nonzero)
        owned = (targets >= 0) & (targets < valid)
        grad.scatter_add_(1, targets.clamp(0, valid - 1).unsqueeze(1), -owned.to(grad.dtype).unsqueeze(1))
    logits[:, :valid] = grad * scale
    logits[:, valid:] = 0


def ce_rows_(logits: torch.Tensor, targets: torch.Tensor, valid: int,
             scale: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row log-sum-exp, target logit and first arg-max ([rows] each, as row_stats); the logits
    become the gradient in place (softmax_grad_ with that log-sum-exp)."""
    max_, sumexp, target_logit, argmax = row_stats(logits, targets, valid)
    lse = max_ + torch.log(sumexp)
    softmax_grad_(logits, targets, lse, scale, valid)
    return lse, target_logit, argmax
