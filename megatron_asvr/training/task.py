"""What the schedules run the ASVR model for: its training loss (``ASVRTask``), or its logits
(``logits_step``: evaluation and ``--verify``). Both feed the model from a ``MicroBatch``."""

from functools import partial
from typing import Any, Callable, List, Optional

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


def model_inputs(batch: MicroBatch, targets: bool) -> dict:
    """``ASVRModel.forward``'s arguments; without ``targets`` (labels, visual targets) its last
    stage returns logits instead of the losses' terms."""
    inputs = dict(tokens=batch.tokens, position_ids=batch.position_ids, image_index=batch.image_index,
                  images=batch.images, input_codes=batch.input_codes, packed_seq_params=packed_seq_params(batch))
    if targets:
        inputs.update(labels=batch.labels, visual_targets=batch.visual_targets, visual_rows=batch.visual_rows)
    return inputs


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
        inputs = model_inputs(batch, targets=True)
        if batch.loss_counts is not None:  # on the last stage: what each head's loss sums get in backward
            inputs["visual_grad_scale"] = {branch: visual_grad_scale(batch.loss_counts, self.asvr,
                                                                     getattr(self.asvr, branch).depth)
                                           for branch in self.asvr.branches}
        output = model(**inputs)
        # The loss function only runs on the last stage.
        return output, partial(asvr_loss, loss_mask=batch.loss_mask, counts=batch.loss_counts, asvr=self.asvr)


def _collected(collect: Callable[[torch.Tensor, MicroBatch], Any], batch: MicroBatch, output: dict):
    """megatron's two-value loss-function result: no loss (forward only), ``collect``'s value."""
    logits = output["logits"]  # [b, s, V/tp]
    return torch.zeros((), device=logits.device), collect(logits, batch)


def logits_step(collect: Callable[[torch.Tensor, MicroBatch], Any]):
    """A forward step that runs the model on a micro-batch's inputs alone and hands the last stage's
    logits [b, s, V/tp] with the batch to ``collect``, whose values ``forward_only`` returns."""

    def forward_step(data_iterator, model):
        batch: MicroBatch = next(data_iterator)
        return model(**model_inputs(batch, targets=False)), partial(_collected, collect, batch)

    return forward_step
