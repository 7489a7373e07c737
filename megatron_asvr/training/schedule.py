"""megatron's pipeline schedules: forward + backward for the trainer, forward only for it and inference."""

from typing import Any, Callable, Iterator, List, Union

import torch
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.pipeline_parallel import get_forward_backward_func


def forward_backward(
    forward_step_func: Callable,
    data_iterator: Union[Iterator, List[Iterator]],
    model: List[torch.nn.Module],
    optimizer: MegatronOptimizer,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
) -> List[Any]:
    """Zero the gradients, then forward and backward over ``num_microbatches``.

    ``data_iterator`` is one iterator, or one per model chunk with a virtual pipeline.
    Gradients end up reduced over data-parallel ranks and normalised by the global
    token count the loss function reports (``calculate_per_token_loss``).
    Returns the loss function's reports per micro-batch (last stage only).
    """
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    return _run_schedule(forward_step_func, data_iterator, model, num_microbatches, seq_length, micro_batch_size, False)


@torch.no_grad()
def forward_only(
    forward_step_func: Callable,
    data_iterator: Union[Iterator, List[Iterator]],
    model: List[torch.nn.Module],
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
) -> List[Any]:
    """Forward only over ``num_microbatches``; the loss reports (last stage only)."""
    for chunk in model:
        chunk.eval()
    try:
        return _run_schedule(forward_step_func, data_iterator, model, num_microbatches, seq_length, micro_batch_size, True)
    finally:
        for chunk in model:
            chunk.train()


def _run_schedule(forward_step_func, data_iterator, model, num_microbatches, seq_length, micro_batch_size, forward_only):
    return get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=data_iterator,
        model=model,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
