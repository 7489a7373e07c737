"""megatron's pipeline schedules over our micro-batches: forward + backward for the training step,
forward only for evaluation, ``--verify`` and ``Trainer.evaluate``.

    forward_backward(forward_step, model, optimizer, micro) -> loss reports (last stage)
    forward_only(forward_step, model, micro)                 -> what each micro-batch's loss
                                                                function returned (last stage)

``forward_step(data_iterator, model) -> (output, loss_func)`` is megatron's forward-step
function; ``training.task`` builds it for the training loss (``ASVRTask``) and for logits
(``logits_step``).
"""

from typing import Any, Callable, List, Tuple

import torch
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_asvr.data.batch import MicroBatch

ForwardStep = Callable  # (data_iterator, model) -> (output, loss_func)


def schedule_shape(model: List[torch.nn.Module], micro: List[MicroBatch]) -> Tuple[int, int]:
    """(sequence length, micro-batch size) for megatron's schedule. Micro-batches padded to their
    longest sample differ in length: the pipeline then sends each one's shape first."""
    lengths = {m.tokens.shape[1] for m in micro}
    model[0].config.variable_seq_lengths = len(lengths) > 1
    return max(lengths), micro[0].rows


def _run(forward_step: ForwardStep, model: List[torch.nn.Module], micro: List[MicroBatch],
         forward_only_: bool) -> List[Any]:
    seq_length, rows = schedule_shape(model, micro)
    # one iterator, or one per model chunk with a virtual pipeline
    iterators = [iter(micro) for _ in model] if len(model) > 1 else iter(micro)
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators,
        model=model,
        num_microbatches=len(micro),
        seq_length=seq_length,
        micro_batch_size=rows,
        forward_only=forward_only_,
    )


def forward_backward(forward_step: ForwardStep, model: List[torch.nn.Module], optimizer: MegatronOptimizer,
                     micro: List[MicroBatch]) -> List[Any]:
    """Zero the gradients, then forward and backward over ``micro`` (on the device already).

    Gradients end up reduced over data-parallel ranks and normalised by the global
    token count the loss function reports (``calculate_per_token_loss``).
    Returns the loss function's reports per micro-batch (last stage only).
    """
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    return _run(forward_step, model, micro, False)


@torch.no_grad()
def forward_only(forward_step: ForwardStep, model: List[torch.nn.Module], micro: List[MicroBatch]) -> List[Any]:
    """Forward only over ``micro`` (moved to the model's device), the chunks in eval mode; what
    each micro-batch's loss function returned (last stage only)."""
    device = next(model[0].parameters()).device
    micro = [m.to(device) for m in micro]
    for chunk in model:
        chunk.eval()
    try:
        return _run(forward_step, model, micro, True)
    finally:
        for chunk in model:
            chunk.train()
