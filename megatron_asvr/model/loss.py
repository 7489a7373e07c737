"""The ASVR loss: L = L_text + lambda * sum over heads of mean_d CE_d, each globally normalised.

L_text is normalised by the supervised answer tokens and L_visual by the
supervised image positions of the whole global batch (all micro-batches, all
data-parallel ranks), so the loss does not depend on how the batch is split.
megatron's schedules normalise by one count (``calculate_per_token_loss``):
the text count when there is text, else the visual count; the other term is
rescaled by the ratio of the global counts, known before the step.
"""

from typing import Dict, Tuple

import torch

from megatron_asvr.config import ASVRConfig


def visual_grad_scale(counts: torch.Tensor, asvr: ASVRConfig, depth: int) -> torch.Tensor:
    """[depth] fp32: each depth's factor in the loss, i.e. d loss / d loss_sum_d of a head's
    per-depth CE sums: lambda x (megatron's normalising count) / visual count / depth.

    From the global counts ``counts`` [2], known before the step: the fused CE makes its
    gradients with it in the forward (model/head.py), and asvr_loss weighs by the same tensor,
    so the gradient autograd delivers is this scale exactly.
    """
    text_count, visual_count = counts[0], counts[1]
    # megatron divides by the summed num_tokens: the text count, or the visual count without text.
    scale = torch.where(text_count > 0, text_count, visual_count)
    weight = asvr.loss_weight * scale / visual_count.clamp(min=1) / depth  # 0 rows: loss_sum is 0 too
    return weight.float().expand(depth)


def asvr_loss(
    output: dict, loss_mask: torch.Tensor, counts: torch.Tensor, asvr: ASVRConfig
) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
    """megatron loss-function result for one micro-batch: (loss, num_tokens, report).

    ``counts`` [2] (device, float64): the global batch's supervised text tokens and
    visual rows. Branch-free, so the host never waits for the device to read them.
    """
    has_text = counts[0] > 0
    text_sum = (output["text"].float() * loss_mask).sum()
    n_text = loss_mask.sum()
    visual_rows = next(iter(output["visual"].values()))[1][0] if output["visual"] else n_text.new_zeros(())
    num_tokens = torch.where(has_text, n_text, visual_rows.to(n_text.dtype))
    loss = torch.where(has_text, text_sum, text_sum * 0.0)
    report = {"text": torch.stack([text_sum.detach(), n_text.float()])}
    for branch, (loss_sum, count, correct) in output["visual"].items():
        loss = loss + (loss_sum * visual_grad_scale(counts, asvr, len(loss_sum))).sum().to(loss.dtype)
        report[f"visual/{branch}/ce"] = loss_sum.detach()
        report[f"visual/{branch}/correct"] = correct.float()
        report[f"visual/{branch}/rows"] = count[:1].float()
    return loss, num_tokens.to(torch.int), report
