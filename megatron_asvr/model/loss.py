"""The ASVR loss: L = L_text + lambda * sum over heads of mean_d CE_d, each globally normalised,
and what it reports.

L_text is normalised by the supervised answer tokens and L_visual by the
supervised image positions of the whole global batch (all micro-batches, all
data-parallel ranks), so the loss does not depend on how the batch is split.
megatron's schedules normalise by one count (``calculate_per_token_loss``):
the text count when there is text, else the visual count; the other term is
rescaled by the ratio of the global counts, known before the step.

A micro-batch's ``LossReport`` holds sums (never means), so reports add up over micro-batches
and ranks (``LossReport.reduce``); ``scalars`` divides once, for the log.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

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


@dataclass
class BranchReport:
    """One visual head's sums over its supervised rows."""

    ce: torch.Tensor  # [D] cross entropy per depth, summed over the rows
    correct: torch.Tensor  # [D] rows whose arg-max code is the target, per depth
    rows: torch.Tensor  # [1] supervised rows


@dataclass
class LossReport:
    """A micro-batch's (or a sum of micro-batches') loss sums, on the device."""

    text: torch.Tensor  # [2]: cross entropy summed over the supervised text tokens, their count
    branches: Dict[str, BranchReport] = field(default_factory=dict)  # "semantic" / "appearance"

    def flat(self) -> torch.Tensor:
        """Every number in one float64 vector: text, then each branch (by name) ce, correct, rows."""
        parts = [self.text] + [t for _, b in sorted(self.branches.items()) for t in (b.ce, b.correct, b.rows)]
        return torch.cat([p.double().flatten() for p in parts])

    def like(self, flat: torch.Tensor) -> "LossReport":
        """A report of this one's shape holding ``flat`` (as ``flat()`` lays it out)."""
        sizes = [self.text.numel()] + [t.numel() for _, b in sorted(self.branches.items())
                                       for t in (b.ce, b.correct, b.rows)]
        parts = iter(flat.split(sizes))
        text = next(parts)
        return LossReport(text, {name: BranchReport(next(parts), next(parts), next(parts))
                                 for name, _ in sorted(self.branches.items())})

    @staticmethod
    def reduce(reports: List["LossReport"], group=None) -> Optional["LossReport"]:
        """The micro-batches' reports summed on this rank, then over ``group`` (one all-reduce),
        in float64; None without reports (not the last pipeline stage)."""
        if not reports:
            return None
        flat = sum(r.flat() for r in reports)
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(flat, group=group)
        return reports[0].like(flat)

    def scalars(self) -> Dict[str, float]:
        """The logged numbers: ``loss/text``; per branch ``loss/visual_<branch>`` (mean over depths
        of the per-row CE) and per depth ``visual_<branch>/ce_depth<d>`` and ``acc_depth<d>``."""
        values = self.like(torch.tensor(self.flat().tolist(), dtype=torch.float64))  # host sync: one transfer
        total, count = values.text.tolist()
        out = {"loss/text": total / count if count else float("nan")}
        for branch, report in values.branches.items():
            rows = report.rows.item()
            if rows == 0:
                continue
            ce, correct = report.ce.tolist(), report.correct.tolist()
            out[f"loss/visual_{branch}"] = sum(ce) / len(ce) / rows
            for d in range(len(ce)):
                out[f"visual_{branch}/ce_depth{d}"] = ce[d] / rows
                out[f"visual_{branch}/acc_depth{d}"] = correct[d] / rows
        return out


def asvr_loss(
    output: dict, loss_mask: torch.Tensor, counts: torch.Tensor, asvr: ASVRConfig
) -> Tuple[torch.Tensor, torch.Tensor, LossReport]:
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
    report = LossReport(torch.stack([text_sum.detach(), n_text.float()]))
    for branch, (loss_sum, count, correct) in output["visual"].items():
        loss = loss + (loss_sum * visual_grad_scale(counts, asvr, len(loss_sum))).sum().to(loss.dtype)
        report.branches[branch] = BranchReport(loss_sum.detach(), correct.float(), count[:1].float())
    return loss, num_tokens.to(torch.int), report
