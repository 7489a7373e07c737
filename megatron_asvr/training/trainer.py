"""The trainer: this rank's model chunks, DDP, optimizer and scheduler, and THE training step.

    Trainer(build_chunk, task, parallel, optim, info)
        .train_step(micro_batches) -> StepResult      (tools/train.py, the benchmark, the tests)
        .evaluate(micro_batches)   -> loss reports    (forward only, same task)
        .save(...) / .resume(...)                     (model, optimizer, scheduler, RNG, data position)

One step: the micro-batches go to the device (the only move), the task annotates
them (the global loss counts, reduced on the device), megatron's pipeline
schedule runs forward and backward, the last stage's loss reports are reduced
over data-parallel ranks (``LossReport.reduce``), then one all-reduce gives every
rank the step's counts (``StepCounts``), among them whether any rank saw a
non-finite loss or gradient. A finite step runs the optimizer and the
learning-rate schedule; a non-finite one is skipped (``nan_policy``). The host
waits for the device at three points per step, each marked ``host sync``: the
step's counts, the clipping norm inside megatron's optimizer step, and the loss
report (last stage). Each wait on other ranks is named (``runtime.waits``), for
the watchdog's line.
"""

from contextlib import contextmanager
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Protocol, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module, MegatronModule
from megatron.core.utils import get_attr_wrapped_model

from megatron_asvr.checkpoint.training_state import load_training, save_training
from megatron_asvr.config import ParallelConfig
from megatron_asvr.data.batch import MicroBatch
from megatron_asvr.model.chunks import ChunkBuilder, build_model_chunks
from megatron_asvr.model.loss import LossReport
from megatron_asvr.runtime import RankInfo
from megatron_asvr.runtime.waits import waiting_for
from megatron_asvr.training.schedule import forward_backward, forward_only


def _model_groups(parallel: ParallelConfig, dp_size: int) -> str:
    """The groups a step's forward and backward wait on: "the tensor- and data-parallel groups"."""
    dims = [dim for dim, size in (("tensor", parallel.tensor_parallel), ("pipeline", parallel.pipeline_parallel),
                                     ("data", dp_size)) if size > 1]
    if not dims:
        return "no other rank"
    if len(dims) == 1:
        return f"the {dims[0]}-parallel group"
    return f"the {', '.join(k + '-' for k in dims[:-1])} and {dims[-1]}-parallel groups"


class NonFiniteError(RuntimeError):
    """The loss or the gradients stayed non-finite: training stopped without applying them."""


class StepTask(Protocol):
    """What a model is trained on: megatron's forward-step function and the per-step annotations."""

    def forward_step(self, data_iterator, model):
        """(output, loss_func) for the next micro-batch of ``data_iterator``; ``loss_func`` returns
        (loss, num_tokens, LossReport)."""

    def prepare(self, micro: List[MicroBatch], last_stage: bool) -> None:
        """Annotate this rank's micro-batches (on the device) before the schedule runs."""


@dataclass
class OptimizerSettings:
    """AdamW and its learning-rate schedule (cosine or constant after a linear warm-up)."""

    lr: float
    min_lr: float = 0.0
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    adam_betas: Tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    decay_style: str = "constant"  # constant | cosine
    warmup_steps: int = 0
    total_steps: int = 1
    nan_policy: str = "skip"  # skip (up to max_consecutive_skips in a row) | stop
    max_consecutive_skips: int = 5


# -- the chunks wrapped for data parallelism, and their optimizer ------------------------------------


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


# -- what a step returns ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StepCounts:
    """What one step counted over the global batch: every rank's numbers summed by the step's one
    all-reduce (each counted once: the TP x PP ranks of a replica share its samples)."""

    non_finite: bool  # some rank's loss or gradients were not finite: the update is skipped
    stop: bool  # some rank asked the run to stop after this step
    dropped: int  # samples masked out as too long
    unreadable: int  # samples masked out as their images could not be read
    image_positions: int
    real_tokens: int  # non-padding positions
    computed_positions: int  # positions the model computed (padding included)
    flops: float  # of the real work (0 without the trainer's ``flops_of``)

    @classmethod
    def of_this_rank(cls, micro: List[MicroBatch], stop_requested: bool, unreadable: int,
                     flops: float) -> "StepCounts":
        """This rank's counts, known on the host before anything runs (``non_finite`` comes later,
        from the device)."""
        return cls(
            non_finite=False, stop=stop_requested, dropped=sum(m.dropped for m in micro), unreadable=unreadable,
            image_positions=sum(m.num_image_positions for m in micro),
            real_tokens=sum(sum(m.sample_lengths) for m in micro),
            computed_positions=sum(m.computed_positions for m in micro), flops=flops,
        )

    @classmethod
    def from_sums(cls, sums: List[float], replicas: int) -> "StepCounts":
        """The job's counts from the all-reduced vector (``astuple`` order); ``replicas``: the ranks
        of a data-parallel replica, which each counted its samples."""
        non_finite, stop, *counts, flops = sums
        return cls(non_finite > 0, stop > 0, *(int(c) // replicas for c in counts), flops / replicas)


@dataclass(frozen=True)
class StepResult:
    """What one step did, on the host (losses only on the last pipeline stage)."""

    step: int
    lr: float  # the rate this step used
    grad_norm: Optional[float]  # None when the step was skipped
    samples: int  # global batch
    counts: StepCounts
    losses: Dict[str, float]  # ``LossReport.scalars`` of the global batch
    reports: List[LossReport]  # per micro-batch (last stage)

    @property
    def skipped(self) -> bool:
        return self.counts.non_finite

    @property
    def stop(self) -> bool:
        return self.counts.stop


class Trainer:
    """One rank's share of the training job (every rank constructs one and calls the same methods)."""

    def __init__(self, build_chunk: ChunkBuilder, task: StepTask, parallel: ParallelConfig,
                 optim: OptimizerSettings, info: RankInfo,
                 init_weights: Optional[Callable[[list], None]] = None, bucket_size: Optional[int] = None,
                 flops_of: Optional[Callable[[List[MicroBatch]], float]] = None):
        """``init_weights(chunks)`` may load weights before the chunks are wrapped for DDP;
        ``flops_of(micro_batches)``: the FLOPs of this rank's micro-batches (for the step's count)."""
        self.task, self.optim, self.info, self.flops_of = task, optim, info, flops_of
        self.chunks = build_model_chunks(build_chunk, info.device)
        if init_weights is not None:
            init_weights(self.chunks)
        settings = DataParallelSettings.of(parallel)
        if bucket_size is not None:
            settings.bucket_size = bucket_size
        self.model = wrap_data_parallel(self.chunks, settings)
        self.optimizer = build_optimizer(
            self.model, lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
            clip_grad=optim.clip_grad, adam_betas=optim.adam_betas, adam_eps=optim.adam_eps,
            distributed_optimizer=settings.distributed_optimizer,
        )
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=optim.lr, min_lr=optim.min_lr, lr_warmup_steps=optim.warmup_steps,
            lr_decay_steps=max(optim.total_steps, optim.warmup_steps + 1), lr_decay_style=optim.decay_style,
            start_wd=optim.weight_decay, end_wd=optim.weight_decay, wd_incr_steps=max(optim.total_steps, 1),
            wd_incr_style="constant",
        )
        self.first_stage = any(get_attr_wrapped_model(c, "pre_process") for c in self.model)
        self.last_stage = any(get_attr_wrapped_model(c, "post_process") for c in self.model)
        self.step, self.consumed_samples, self.consecutive_skips = 0, 0, 0
        self.peers = _model_groups(parallel, info.dp_size)
        self._grad_buffers = [b.grad_data for m in self.model for b in m.buffers + m.expert_parallel_buffers]

    # -- the step -------------------------------------------------------------------------------

    def _to_device(self, micro: List[MicroBatch]) -> List[MicroBatch]:
        micro = [m.to(self.info.device) for m in micro]
        self.task.prepare(micro, self.last_stage)
        return micro

    def train_step(self, micro: List[MicroBatch], stop_requested: bool = False, unreadable: int = 0) -> StepResult:
        """Forward, backward and (when everything is finite) the optimizer step on this rank's
        micro-batches of the next global batch. ``stop_requested`` (e.g. SIGTERM seen here) is
        shared with every rank through the step's own all-reduce: ``StepResult.stop``;
        ``unreadable``: this rank's samples masked for unreadable images (counted there too)."""
        number = self.step + 1
        flops = self.flops_of(micro) if self.flops_of else 0.0
        mine = StepCounts.of_this_rank(micro, stop_requested, unreadable, flops)
        with waiting_for(self.peers, f"step {number}'s forward and backward"):
            micro = self._to_device(micro)
            reports = forward_backward(self.task.forward_step, self.model, self.optimizer, micro)
            summed = LossReport.reduce(reports, parallel_state.get_data_parallel_group()) if self.last_stage else None
        with waiting_for("every rank", f"step {number}'s all-reduce"):
            counts = self._over_the_job(mine, summed)
        lr = self.optimizer.param_groups[0]["lr"]
        grad_norm = None
        if counts.non_finite:
            self.consecutive_skips += 1
            if self.optim.nan_policy == "stop" or self.consecutive_skips > self.optim.max_consecutive_skips:
                raise NonFiniteError(
                    f"step {number}: non-finite loss or gradients ({self.consecutive_skips} consecutive); "
                    f"stopped without applying them (train.nan_policy={self.optim.nan_policy})")
        else:
            self.consecutive_skips = 0
            with waiting_for(self.peers, f"step {number}'s optimizer step"):
                _, grad_norm, _ = self.optimizer.step()  # host sync inside megatron: the clipping norm
            self.scheduler.step(increment=1)
        self.step += 1
        samples = sum(m.num_samples for m in micro) * self.info.dp_size  # the global batch
        self.consumed_samples += samples
        return StepResult(step=self.step, lr=lr, grad_norm=grad_norm, samples=samples, counts=counts,
                          losses=summed.scalars() if summed is not None else {}, reports=reports)

    def _over_the_job(self, mine: StepCounts, summed: Optional[LossReport]) -> StepCounts:
        """Every rank's counts and non-finite checks summed: one all-reduce."""
        vector = torch.tensor(astuple(mine), dtype=torch.float64).to(self.info.device, non_blocking=True)
        # A sum per gradient buffer (one pass, nothing the size of the buffer allocated): any inf or
        # NaN element makes it non-finite.
        checks = [torch.isfinite(g.sum()) for g in self._grad_buffers]
        if summed is not None:
            checks.append(torch.isfinite(summed.flat()).all())
        if checks:
            vector[0] = (~torch.stack(checks)).sum()  # ranks' non-finite checks, in place of non_finite
        dist.all_reduce(vector)
        # host sync: skipping the update must be decided on the host, by every rank alike.
        return StepCounts.from_sums(vector.tolist(), self.info.world_size // self.info.dp_size)

    @torch.no_grad()
    def evaluate(self, micro: List[MicroBatch]) -> List[LossReport]:
        """Forward-only loss reports on ``micro`` (last stage), parameters gathered first."""
        micro = self._to_device(micro)
        with self.synced():
            return forward_only(self.task.forward_step, self.model, micro)

    @contextmanager
    def synced(self):
        """The parameters all-gathered for reading (with overlapped param gather they may lag)."""
        with params_synced(self.model):
            yield

    # -- state ----------------------------------------------------------------------------------

    def save(self, save_dir: Path, model_config: dict, run_config: dict, keep_last: int = 3) -> Path:
        """Checkpoint the full training state after ``self.step`` (collective); refuses non-finite weights."""
        with self.synced():
            finite = torch.stack([torch.isfinite(p).all() for c in self.model for p in c.parameters()]).all()
            if not finite:  # host sync, once per checkpoint
                raise NonFiniteError(f"parameters are not finite at step {self.step}: refusing to checkpoint")
            return save_training(save_dir, self.step, self.model, self.optimizer, self.scheduler,
                                 self.consumed_samples, model_config, run_config, keep_last)

    def resume(self, directory: Path) -> bool:
        """Restore everything from a checkpoint; return whether the layout was the same (RNG restored)."""
        progress = load_training(directory, self.model, self.optimizer, self.scheduler)
        self.step, self.consumed_samples = progress.step, progress.consumed_samples
        return progress.same_layout
