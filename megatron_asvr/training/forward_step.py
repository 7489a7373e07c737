"""The forward-step function megatron's schedules call for the ASVR model."""

from functools import partial

from megatron_asvr.config import ASVRConfig
from megatron_asvr.model.loss import asvr_loss


def make_forward_step(asvr: ASVRConfig):
    """forward_step(data_iterator, model) -> (output, loss_func) for ``ASVRModel`` stages.

    A micro-batch is a dict (see ``megatron_asvr.data.sequence``) carrying
    ``loss_counts``, the global batch's supervised counts (``model.loss.global_counts``).
    """

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(
            tokens=batch["tokens"],
            position_ids=batch["position_ids"],
            image_mask=batch["image_mask"],
            images=batch.get("images"),
            input_codes=batch.get("input_codes"),
            labels=batch.get("labels"),
            visual_targets=batch.get("visual_targets"),
            visual_row_mask=batch.get("visual_row_mask"),
        )
        # The loss function only runs on the last stage, the only one given loss_counts.
        return output, partial(asvr_loss, loss_mask=batch.get("loss_mask"), counts=batch.get("loss_counts"), asvr=asvr)

    return forward_step
