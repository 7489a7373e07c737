"""The training run: set-up, automatic resume, the step loop on megatron's schedules, checkpoints.

    config -> runtime -> tokenizer codebooks -> model stage(s) -> DDP -> AdamW + cosine
           -> resume (latest complete checkpoint) -> loader -> steps -> checkpoints

Each step: this rank's micro-batches, the global loss counts (last stage),
forward/backward through megatron's pipeline schedule, a NaN/Inf guard over
every rank (a bad step is skipped, never applied), the optimizer and learning
rate steps, metrics. Checkpoints every ``save_interval`` steps, on SIGTERM, and
at the end; a run that finds a checkpoint in ``save_dir`` resumes from it.
"""

import dataclasses
import math
import os
import signal
from pathlib import Path
from typing import Callable, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.utils import get_attr_wrapped_model

from megatron_asvr import runtime
from megatron_asvr.config import CodebookSpec, ConfigError, RunConfig, to_dict
from megatron_asvr.data.loader import GlobalBatchOrder, SampleBuilder, TrainLoader, stage_needs
from megatron_asvr.data.shards import ShardDataset
from megatron_asvr.data.targets import VisualTargets
from megatron_asvr.evaluation.in_training import HeldOutScore
from megatron_asvr.model.loss import global_counts
from megatron_asvr.model.specs import resolve_backend
from megatron_asvr.model.transformer_defaults import recompute_kwargs
from megatron_asvr.model.vlm import stage_builder
from megatron_asvr.tokenizers import visual
from megatron_asvr.training import checkpoint as ckpt
from megatron_asvr.training.flops import StepShape, step_flops
from megatron_asvr.training.forward_step import make_forward_step
from megatron_asvr.training.metrics import MetricsLogger, Stopwatch, reduce_reports, step_losses
from megatron_asvr.model.chunks import build_model_chunks
from megatron_asvr.training.parallel_model import (
    DataParallelSettings,
    build_optimizer,
    params_synced,
    wrap_data_parallel,
)
from megatron_asvr.training.step import forward_backward

CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class NonFiniteError(RuntimeError):
    """The loss or the gradients stayed non-finite: training stopped without applying them."""


def tokenizer_files(directory: str):
    """(config.json, the one checkpoint file) of a DualToken-format tokenizer directory."""
    directory = Path(directory)
    checkpoints = sorted(p for p in directory.iterdir() if p.suffix in CHECKPOINT_SUFFIXES) if directory.is_dir() else []
    if not (directory / "config.json").is_file() or len(checkpoints) != 1:
        raise ConfigError(
            f"train.visual_tokenizer={str(directory)!r} must hold config.json and one checkpoint "
            f"({'/'.join(CHECKPOINT_SUFFIXES)}); found {[p.name for p in checkpoints]}"
        )
    return directory / "config.json", checkpoints[0]


def load_codebooks(directory: str, kinds: List[str]):
    """Per-kind codebook vectors (padding rows removed) and their CodebookSpec, from a
    DualToken-format tokenizer directory."""
    config_path, checkpoint_path = tokenizer_files(directory)
    books, specs = {}, {}
    for kind in kinds:
        meta, books[kind] = visual.load_codebooks(config_path, checkpoint_path, kind)
        specs[kind] = CodebookSpec(sizes=list(meta.codebook_sizes), dim=meta.code_width)
    return books, specs


def _precision(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return torch.bfloat16 if name == "bf16" else torch.float32


def _total_steps(config: RunConfig, num_samples: int) -> int:
    if config.train.steps is not None:
        return config.train.steps
    return max(1, int(config.train.epochs * num_samples) // config.train.global_batch)


def _scheduler(optimizer, config: RunConfig, total_steps: int) -> OptimizerParamScheduler:
    t = config.train
    warmup = int(round(t.warmup_ratio * total_steps))
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=max(total_steps, warmup + 1), lr_decay_style="cosine",
        start_wd=t.weight_decay, end_wd=t.weight_decay, wd_incr_steps=total_steps, wd_incr_style="constant",
    )


def _sum_over(count: int, group) -> int:
    value = torch.tensor([float(count)])
    dist.all_reduce(value, group=group)
    return int(value.item())


def _any_rank(flag: bool) -> bool:
    value = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _grads_finite(model) -> bool:
    return all(
        torch.isfinite(p.main_grad).all() for chunk in model for p in chunk.parameters() if getattr(p, "main_grad", None) is not None
    )


def _params_finite(model) -> bool:
    return all(torch.isfinite(p).all() for chunk in model for p in chunk.parameters())


class _SigtermFlag:
    """Set on SIGTERM: the loop checkpoints after the current step and stops."""

    def __init__(self):
        self.raised = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.raised = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def run(config: RunConfig, step_hook: Optional[Callable[[int, List[dict]], None]] = None) -> dict:
    """Train per ``config``; return {"history": per-step metrics, "checkpoint": last saved dir}.

    ``step_hook(step, micro_batches)`` may inspect or alter a step's micro-batches
    before they run (tests inject faults through it).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    config.validate(world_size)
    model_cfg = config.model
    branches = model_cfg.asvr.branches
    kinds = sorted(set(branches) | ({"semantic"} if model_cfg.asvr.discrete_input else set()))
    codebooks = {}
    if kinds:
        codebooks, specs = load_codebooks(config.train.visual_tokenizer, kinds)
        VisualTargets.check_made_with(config.data.targets, *tokenizer_files(config.train.visual_tokenizer), config.data.image_mode)
        model_cfg = dataclasses.replace(model_cfg, asvr=dataclasses.replace(model_cfg.asvr, **specs))

    info = runtime.initialize(config.parallel, seed=config.train.seed)
    dtype = _precision(config.train.precision)
    backend = resolve_backend(model_cfg.transformer_impl)
    builder = stage_builder(model_cfg, config.parallel, backend, codebooks, dtype, **recompute_kwargs(config.train.recompute))
    chunks = build_model_chunks(builder, info.device)
    if config.train.load:
        loaded = ckpt.load_weights(Path(config.train.load), chunks)
        if info.rank == 0:
            print(f"initial weights from {loaded}", flush=True)
    settings = DataParallelSettings.of(config.parallel)
    model = wrap_data_parallel(chunks, settings)
    t = config.train
    optimizer = build_optimizer(
        model, lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay, clip_grad=t.clip_grad, adam_betas=(t.adam_beta1, t.adam_beta2),
        adam_eps=t.adam_eps, distributed_optimizer=settings.distributed_optimizer,
    )

    shards = ShardDataset(config.data.shards)
    total_steps = _total_steps(config, len(shards))
    scheduler = _scheduler(optimizer, config, total_steps)
    start_step, consumed = 0, 0
    latest = ckpt.find_latest(Path(t.save_dir))
    if latest is not None:
        state = ckpt.load_checkpoint(latest, model, optimizer, scheduler)
        start_step, consumed = state["step"], state["consumed_samples"]
        if info.rank == 0:
            how = "" if state["same_layout"] else " (new layout: weights and optimizer resharded, RNG reseeded)"
            print(f"resumed from {latest} at step {start_step}{how}", flush=True)

    first_stage = any(get_attr_wrapped_model(c, "pre_process") for c in model)
    last_stage = any(get_attr_wrapped_model(c, "post_process") for c in model)
    needs = stage_needs(first_stage, last_stage, model_cfg.asvr)
    targets = VisualTargets(config.data.targets) if config.data.targets else None
    sample_builder = SampleBuilder(
        shards, Path(config.data.image_root), targets, model_cfg.asvr, config.data.seq_length,
        config.data.image_mode, needs, model_cfg.vision.num_patches, drop_too_long=config.data.drop_too_long,
    )
    lengths = shards.num_positions if config.data.group_by_length else None
    order = GlobalBatchOrder(len(shards), t.global_batch, t.seed, lengths)
    loader = TrainLoader(order, sample_builder, info.dp_rank, info.dp_size, t.micro_batch, model_cfg.asvr, needs,
                         config.data.num_workers, consumed)

    log_rank = info.rank == info.world_size - 1  # on the last stage: it holds the losses
    save_dir = Path(t.save_dir)
    logger = MetricsLogger(
        log_rank, total_steps, start_step, t.num_gpus_for_mfu or info.world_size, t.gpu_peak_tflops,
        str(save_dir / "tensorboard") if t.tensorboard else None, t.log_interval, torch.cuda.is_available(),
    )
    forward_step = make_forward_step(model_cfg.asvr)
    held_out = HeldOutScore(config, model_cfg, model, t.micro_batch) if t.eval_interval else None
    dp_group = parallel_state.get_data_parallel_group()
    sigterm, consecutive_skips, last_saved = _SigtermFlag(), 0, latest

    def save(step: int) -> Path:
        with params_synced(model):
            if not _params_finite(model):
                raise NonFiniteError(f"parameters are not finite at step {step}: refusing to checkpoint")
            return ckpt.save_checkpoint(save_dir, step, model, optimizer, scheduler, loader.consumed_samples,
                                        to_dict(model_cfg), to_dict(config), t.keep_last)

    try:
        for step in range(start_step + 1, total_steps + 1):
            watch = Stopwatch()
            micro = loader.next_step()
            data_time = watch.lap()
            if step_hook is not None:
                step_hook(step, micro)
            if last_stage:
                counts = global_counts(micro, dp_group)
                micro = [dict(m, loss_counts=counts) for m in micro]
            reports = forward_backward(forward_step, [iter(micro) for _ in model] if len(model) > 1 else iter(micro),
                                       model, optimizer, len(micro), config.data.seq_length, t.micro_batch)
            summed = reduce_reports(reports, dp_group) if last_stage else {}
            losses = step_losses(summed)
            bad = _any_rank(not all(math.isfinite(v) for v in losses.values()) or not _grads_finite(model))
            grad_norm, lr = None, optimizer.param_groups[0]["lr"]  # the rate this step uses
            if bad:
                consecutive_skips += 1
                if t.nan_policy == "stop" or consecutive_skips > t.max_consecutive_skips:
                    raise NonFiniteError(
                        f"step {step}: non-finite loss or gradients ({consecutive_skips} consecutive); "
                        f"stopped without applying them (train.nan_policy={t.nan_policy})"
                    )
                if log_rank:
                    print(f"step {step}: non-finite loss or gradients: step skipped ({consecutive_skips} in a row)", flush=True)
            else:
                consecutive_skips = 0
                _, grad_norm, _ = optimizer.step()
                scheduler.step(increment=1)
            step_time = watch.lap() + data_time
            samples = sum(m["tokens"].shape[0] for m in micro) * info.dp_size
            image_positions = sum(int(m["image_mask"].sum()) for m in micro) * info.dp_size
            shape = StepShape(samples, config.data.seq_length, image_positions // model_cfg.vision.num_patches, image_positions)
            logger.record(step, losses, grad_norm, bad, lr, samples * config.data.seq_length,
                          samples, step_flops(model_cfg, shape)["total"], step_time, data_time,
                          dropped=_sum_over(sum(m["dropped"] for m in micro), dp_group))
            if held_out is not None and step % t.eval_interval == 0:
                with params_synced(model):
                    held_out.log(step, logger)
            stop = _any_rank(sigterm.raised)
            if (t.save_interval and step % t.save_interval == 0) or stop or step == total_steps:
                last_saved = save(step)
            if stop:
                break
    finally:
        sigterm.restore()
        logger.close()
        history = logger.history
        runtime.destroy()
    return {"history": history, "checkpoint": str(last_saved) if last_saved else None}

