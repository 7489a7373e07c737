"""What the trainer runs for the ASVR model: megatron's forward-step function and the loss counts."""

from functools import partial
from typing import List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_asvr.config import ASVRConfig
from megatron_asvr.data.batch import MicroBatch
from megatron_asvr.model.loss import asvr_loss, visual_grad_scale


def packed_seq_params(batch: MicroBatch) -> Optional[PackedSeqParams]:
    """THD parameters of a packed micro-batch (attention and RoPE restart at each sample), else None."""
    if batch.cu_seqlens is None:
        return None
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=batch.cu_seqlens, cu_seqlens_kv=batch.cu_seqlens,
                           max_seqlen_q=batch.max_seqlen, max_seqlen_kv=batch.max_seqlen)


class ASVRTask:
    """``forward_step`` for ``ASVRModel`` stages; ``prepare`` sets the global loss counts."""

    def __init__(self, asvr: ASVRConfig):
        self.asvr = asvr

    def prepare(self, micro: List[MicroBatch], last_stage: bool) -> None:
        """On the last stage: the supervised text tokens and visual rows of the global batch
        (every micro-batch, every data-parallel rank), summed on the device."""
        if not last_stage:
            return
        counts = torch.stack([
            torch.stack([m.loss_mask.sum(dtype=torch.float64),
                         torch.full((), m.visual_rows.numel() if m.visual_rows is not None else 0,
                                    dtype=torch.float64, device=m.loss_mask.device)])
            for m in micro
        ]).sum(0)  # [2]
        group = parallel_state.get_data_parallel_group()
        if dist.get_world_size(group) > 1:
            dist.all_reduce(counts, group=group)
        for m in micro:
            m.loss_counts = counts

    def forward_step(self, data_iterator, model):
        batch: MicroBatch = next(data_iterator)
        grad_scales = None  # on the last stage: what each head's loss sums will get in backward
        if batch.loss_counts is not None:
            grad_scales = {branch: visual_grad_scale(batch.loss_counts, self.asvr, getattr(self.asvr, branch).depth)
                           for branch in self.asvr.branches}
        output = model(
            tokens=batch.tokens,
            position_ids=batch.position_ids,
            image_index=batch.image_index,
            images=batch.images,
            input_codes=batch.input_codes,
            labels=batch.labels,
            visual_targets=batch.visual_targets,
            visual_rows=batch.visual_rows,
            visual_grad_scale=grad_scales,
            packed_seq_params=packed_seq_params(batch),
        )
        # The loss function only runs on the last stage.
        return output, partial(asvr_loss, loss_mask=batch.loss_mask, counts=batch.loss_counts, asvr=self.asvr)
