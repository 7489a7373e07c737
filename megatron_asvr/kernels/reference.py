"""Naive multi-depth cross-entropy: materialised logits + F.cross_entropy per depth.

The reference the fused op is tested and benchmarked against. It takes the full
(unsharded) classifiers: weights[d] [V_pad_d, E] with V_pad_d >= vocab_sizes[d].
"""

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


def naive_multi_depth_cross_entropy(
    hidden: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Optional[Sequence[torch.Tensor]],
    targets: torch.Tensor,
    vocab_sizes: Sequence[int],
    row_mask: Optional[torch.Tensor] = None,
    depth_weights: Optional[Sequence[float]] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss_sum [D] fp32, count [D] int64, correct [D] int64) of hidden [D, N, E], as
    multi_depth_cross_entropy."""
    if row_mask is not None:
        hidden, targets = hidden[:, row_mask], targets[row_mask]
    losses, counts, corrects = [], [], []
    for d, h in enumerate(hidden.unbind(0)):  # [M, E] per depth
        v = vocab_sizes[d]
        bias = None if biases is None else biases[d][:v]
        logits = F.linear(h, weights[d][:v], bias).float()  # [M, V_d]
        weight = 1.0 if depth_weights is None else float(depth_weights[d])
        losses.append(weight * F.cross_entropy(logits, targets[:, d], reduction="sum"))
        counts.append(torch.tensor(targets.shape[0], device=hidden.device))
        corrects.append((logits.argmax(dim=1) == targets[:, d]).sum())
    return torch.stack(losses), torch.stack(counts), torch.stack(corrects)
