"""The ASVR loss: L = L_text + lambda * sum over heads of mean_d CE_d, each globally normalised.

L_text is normalised by the supervised answer tokens and L_visual by the
supervised image positions of the whole global batch (all micro-batches, all
data-parallel ranks), so the loss does not depend on how the batch is split.
megatron's schedules normalise by one count (``calculate_per_token_loss``):
the text count when there is text, else the visual count; the other term is
rescaled by the ratio of the global counts, known before the step.
"""

from dataclasses import dataclass
from typing import Dict, Iterable, Tuple

import torch
import torch.distributed as dist

from megatron_asvr.config import ASVRConfig


@dataclass(frozen=True)
class LossCounts:
    """Supervised answer tokens and image positions in the global batch."""

    text: int
    visual: int


def global_counts(micro_batches: Iterable[dict], group=None) -> LossCounts:
    """Sum this rank's micro-batches' counts over the data-parallel ``group`` (last stage)."""
    local = torch.zeros(2, dtype=torch.float64)
    for batch in micro_batches:
        local[0] += batch["loss_mask"].sum()
        local[1] += batch["visual_row_mask"].sum()
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(local, group=group)
    return LossCounts(text=int(local[0]), visual=int(local[1]))


def asvr_loss(
    output: dict, loss_mask: torch.Tensor, counts: LossCounts, asvr: ASVRConfig
) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
    """megatron loss-function result for one micro-batch: (loss, num_tokens, report)."""
    text_sum = (output["text"].float() * loss_mask).sum()
    n_text = loss_mask.sum()
    visual_rows = next(iter(output["visual"].values()))[1][0] if output["visual"] else n_text.new_zeros(())
    if counts.text > 0:
        scale, num_tokens = float(counts.text), n_text
    else:
        scale, num_tokens = float(counts.visual), visual_rows.to(n_text.dtype)
    loss = text_sum * (scale / counts.text) if counts.text > 0 else text_sum * 0.0
    report = {"text": torch.stack([text_sum.detach(), n_text.float()])}
    for branch, (loss_sum, count, correct) in output["visual"].items():
        if counts.visual > 0:
            loss = loss + asvr.loss_weight * (scale / counts.visual) * loss_sum.sum() / len(loss_sum)
        report[f"visual/{branch}/ce"] = loss_sum.detach()
        report[f"visual/{branch}/correct"] = correct.float()
        report[f"visual/{branch}/rows"] = count[:1].float()
    return loss, num_tokens.to(torch.int), report
