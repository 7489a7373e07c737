"""This rank's model chunks wrapped for data parallelism, and their optimizer."""

from contextlib import contextmanager
from dataclasses import dataclass
from typing import List, Optional

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.transformer.module import Float16Module, MegatronModule

from megatron_asvr.config import ParallelConfig


@dataclass
class DataParallelSettings:
    distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    grad_reduce_in_fp32: bool = True
    bucket_size: Optional[int] = None

    @classmethod
    def of(cls, parallel: ParallelConfig) -> "DataParallelSettings":
        return cls(
            distributed_optimizer=parallel.distributed_optimizer,
            overlap_grad_reduce=parallel.overlap_grad_reduce,
            overlap_param_gather=parallel.overlap_param_gather,
        )


def wrap_data_parallel(chunks: List[MegatronModule], settings: DataParallelSettings) -> List[DistributedDataParallel]:
    """megatron DDP around each chunk (bf16 chunks inside Float16Module); sets the schedule hooks."""
    config = chunks[0].config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=settings.grad_reduce_in_fp32,
        overlap_grad_reduce=settings.overlap_grad_reduce,
        overlap_param_gather=settings.overlap_param_gather,
        use_distributed_optimizer=settings.distributed_optimizer,
        bucket_size=settings.bucket_size,
    )
    if config.bf16 or config.fp16:
        chunks = [Float16Module(config, chunk) for chunk in chunks]
    wrapped = [
        # As Megatron-LM: only the first chunk is bucketed; the other chunks' grad
        # communication overlaps with compute anyway.
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    for model in wrapped:
        model.broadcast_params()

    # megatron's schedules take one hook, or one per chunk with a virtual pipeline.
    def hooks(fns):
        return fns[0] if len(fns) == 1 else fns

    config.no_sync_func = hooks([m.no_sync for m in wrapped])
    if settings.overlap_grad_reduce:
        config.grad_sync_func = hooks([m.start_grad_sync for m in wrapped])
    if settings.overlap_param_gather:
        config.param_sync_func = hooks([m.start_param_sync for m in wrapped])
    config.finalize_model_grads_func = finalize_model_grads
    return wrapped


def build_optimizer(
    model: List[DistributedDataParallel],
    lr: float,
    min_lr: float = 0.0,
    weight_decay: float = 0.0,
    clip_grad: float = 1.0,
    adam_betas=(0.9, 0.999),
    adam_eps: float = 1e-8,
    distributed_optimizer: bool = False,
) -> MegatronOptimizer:
    """megatron's AdamW (decoupled weight decay; none on biases and norms), fp32 main params."""
    config = model[0].config
    optimizer_config = OptimizerConfig(
        optimizer="adam",
        lr=lr,
        min_lr=min_lr,
        weight_decay=weight_decay,
        adam_beta1=adam_betas[0],
        adam_beta2=adam_betas[1],
        adam_eps=adam_eps,
        clip_grad=clip_grad,
        bf16=config.bf16,
        fp16=config.fp16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=distributed_optimizer,
    )
    return get_megatron_optimizer(optimizer_config, model)


@contextmanager
def params_synced(model: List[DistributedDataParallel]):
    """Parameters all-gathered for reading (checkpoint, evaluation, comparison).

    With ``overlap_param_gather`` the distributed optimizer's updated shards are
    only gathered by the next forward's pre-hooks; as Megatron-LM does around
    saves and evaluation, the hooks are lifted with a synchronous all-gather and
    put back afterwards.
    """
    overlapped = [m for m in model if m.ddp_config.overlap_param_gather]
    for m in overlapped:
        m.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for m in overlapped:
            m.enable_forward_pre_hook()
