"""The training run: set-up, automatic resume, steps through the trainer, logging, checkpoints.

    run(config, evaluator)
        config (+ codebook sizes) -> runtime -> Trainer (chunks, DDP, AdamW + cosine)
        -> resume (latest complete checkpoint) -> loader -> Trainer.train_step ... -> checkpoints

Checkpoints every ``save_interval`` steps, on SIGTERM, and at the end; a run
that finds a checkpoint in ``save_dir`` resumes from it exactly (weights,
optimizer, schedule, RNG, data position): after a SIGKILL, and under
``torchrun --max-restarts N`` within the job. A failed save is retried once, then
``train.save_failure`` decides; every wait on other ranks is named and watched
(``runtime.waits``: ``train.distributed_timeout_minutes``).
"""

import dataclasses
import functools
import json
import os
import signal
from pathlib import Path
from typing import Dict, List, Optional, Protocol, Tuple

import torch

from megatron_asvr import runtime
from megatron_asvr.checkpoint.directory import newest_for_every_rank
from megatron_asvr.checkpoint.model import VISUAL_HEADS, load_weights
from megatron_asvr.checkpoint.training_state import save_retried
from megatron_asvr.config import ConfigError, RunConfig, to_dict
from megatron_asvr.data.loader import (
    BatchingSettings,
    GlobalBatchOrder,
    SampleBuilder,
    StageNeeds,
    TrainLoader,
    stage_needs,
)
from megatron_asvr.data.packing import length_multiple_for
from megatron_asvr.data.shards import ShardDataset
from megatron_asvr.data.targets import VisualTargets
from megatron_asvr.model.flops import micro_batch_flops
from megatron_asvr.model.specs import resolve_backend
from megatron_asvr.model.transformer_defaults import recompute_kwargs
from megatron_asvr.model.vlm import stage_builder
from megatron_asvr.runtime.device import dtype_of
from megatron_asvr.runtime.fast_paths import FastPaths
from megatron_asvr.runtime.waits import Watchdog, waiting_for
from megatron_asvr.tokenizers.visual import load_directory_codebooks, tokenizer_directory_files
from megatron_asvr.training.metrics import MetricsLogger, StepTimings, Stopwatch, TensorBoardSink, WandbSink
from megatron_asvr.training.recipe_changes import SCHEDULE_POLICIES, SavedRun, describe_changes, total_steps
from megatron_asvr.training.task import ASVRTask
from megatron_asvr.training.trainer import OptimizerSettings, Trainer


class Evaluator(Protocol):
    """An in-training score (``evaluation.in_training.HeldOutScore``), run every ``train.eval_interval``
    steps by every rank (collective), on the model as the trainer holds it."""

    description: str  # what is scored, for the log line

    def __call__(self, model: List[torch.nn.Module]) -> Dict[str, float]:
        """Scores by name (logged as ``eval/<name>``)."""


def optimizer_settings(config: RunConfig, steps: int) -> OptimizerSettings:
    t = config.train
    return OptimizerSettings(
        lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay, clip_grad=t.clip_grad,
        adam_betas=(t.adam_beta1, t.adam_beta2), adam_eps=t.adam_eps, decay_style="cosine",
        warmup_steps=int(round(t.warmup_ratio * steps)), total_steps=steps, nan_policy=t.nan_policy,
        max_consecutive_skips=t.max_consecutive_skips, scheduler_on_load=SCHEDULE_POLICIES[t.resume_lr_schedule][2],
        master_weights=t.master_weights,
    )


def load_codebooks(config: RunConfig) -> Tuple[Dict[str, List[torch.Tensor]], RunConfig]:
    """(codebook vectors per branch, ``config`` with their sizes in ``model.asvr``) from
    ``train.visual_tokenizer``: the run's config from here on."""
    asvr = config.model.asvr
    branches = sorted(set(asvr.branches) | ({"semantic"} if asvr.discrete_input else set()))
    if not branches:
        return {}, config
    books, specs = load_directory_codebooks(config.train.visual_tokenizer, branches)
    model = dataclasses.replace(config.model, asvr=dataclasses.replace(asvr, **specs))
    return books, dataclasses.replace(config, model=model)


def metric_sinks(config: RunConfig) -> list:
    """TensorBoard (train.tensorboard) and W&B (train.wandb_project) sinks of the logging rank."""
    t = config.train
    sinks = [TensorBoardSink(str(Path(t.save_dir) / "tensorboard"))] if t.tensorboard else []
    if t.wandb_project:
        sinks.append(WandbSink(t.wandb_project, t.wandb_mode, t.save_dir, to_dict(config)))
    return sinks


REPORT_STEPS = 50  # steps the batching report plans ahead (lengths only: no image is read)


def report_batching(loader: TrainLoader, save_dir: Path, info: runtime.RankInfo) -> None:
    """How the next steps' samples fill their micro-batches on this rank: one line on the first rank,
    and batching_report.json in the save directory."""
    report = loader.batching_report(REPORT_STEPS)
    if info.rank == 0:
        print(f"batching ({loader.steps.batching.batching}, next {REPORT_STEPS} steps, rank 0): "
              f"{report.describe()}", flush=True)
        save_dir.mkdir(parents=True, exist_ok=True)
        (save_dir / "batching_report.json").write_text(json.dumps(
            {"batching": loader.steps.batching.batching, "steps": REPORT_STEPS, **dataclasses.asdict(report),
             "fill": report.fill}, indent=1) + "\n")


class _SigtermFlag:
    """Set on SIGTERM (a preemption: torchrun passes it on, Slurm sends it to every process): the loop
    checkpoints after the current step and stops. The rank's helpers ignore it
    (``runtime.child_processes``), so they live until the save is written."""

    def __init__(self):
        self.raised = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.raised = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def build_trainer(config: RunConfig, info: runtime.RankInfo, codebooks, steps: int,
                  llm_changes: Optional[dict] = None) -> Trainer:
    """The run's trainer (and the throughput benchmark's), its initial weights loaded from
    ``train.load`` if set; ``llm_changes``: to the LLM's TransformerConfig (the benchmark's FP8)."""
    model = config.model
    fast_paths = FastPaths.resolve(config.train.fast_paths, torch.cuda.is_available())
    every_part, llm_part = fast_paths.transformer_changes()
    builder = stage_builder(model, config.parallel, resolve_backend(model.transformer_impl), codebooks,
                            dtype_of(config.train.precision), {**llm_part, **(llm_changes or {})},
                            **every_part, **recompute_kwargs(config.train.recompute))

    def init_weights(chunks):
        loaded = load_weights(chunks, Path(config.train.load), optional=(VISUAL_HEADS,))
        if info.rank == 0:
            print(f"initial weights from {loaded}", flush=True)

    return Trainer(builder, ASVRTask(model.asvr), config.parallel, optimizer_settings(config, steps), info,
                   init_weights=init_weights if config.train.load else None,
                   flops_of=functools.partial(micro_batch_flops, model), fast_paths=fast_paths)


def build_loader(config: RunConfig, trainer: Trainer, shards: ShardDataset) -> TrainLoader:
    """This rank's resumable loader, from the trainer's data position."""
    info = trainer.info
    needs = stage_needs(trainer.first_stage, trainer.last_stage, config.model.asvr)
    targets = VisualTargets(config.data.targets) if config.data.targets else None
    return recipe_loader(config, shards, needs, targets, info.dp_rank, info.dp_size, config.data.num_workers,
                         trainer.consumed_samples, info.replica_group)


def recipe_loader(config: RunConfig, shards: ShardDataset, needs: StageNeeds, targets: Optional[VisualTargets],
                  dp_rank: int, dp_size: int, num_workers: int, consumed_samples: int,
                  replica_group=None) -> TrainLoader:
    """The loader ``config`` trains with at data-parallel rank ``dp_rank`` of ``dp_size``."""
    t, data, model = config.train, config.data, config.model
    builder = SampleBuilder(
        shards, Path(data.image_root), targets, model.asvr, data.seq_length, data.image_mode, needs,
        model.vision.num_patches, drop_too_long=data.drop_too_long, resample=model.vision.resample,
    )
    order = GlobalBatchOrder(len(shards), t.global_batch, t.seed,
                             shards.num_positions if data.group_by_length else None)
    return TrainLoader(order, builder, dp_rank, dp_size, batching_settings(config), model.asvr, needs, num_workers,
                       consumed_samples, replica_group, data.unreadable_image)


def batching_settings(config: RunConfig) -> BatchingSettings:
    p = config.parallel
    return BatchingSettings(
        config.data.batching, config.train.micro_batch, config.data.seq_length,
        length_multiple_for(p.tensor_parallel, p.sequence_parallel),
        micro_multiple=p.pipeline_parallel if p.virtual_pipeline else 1,  # the interleaved schedule's groups
    )


def resume(trainer: Trainer, saved: SavedRun, config: RunConfig, steps: int) -> None:
    """Resume from ``saved`` (stopping at ``steps``), after one line naming what the recipe changed since
    (ConfigError if a change is refused: ``recipe_changes``)."""
    changes = describe_changes(saved, config, trainer.scheduler, steps)
    if changes and trainer.info.rank == 0:
        print(changes, flush=True)
    with waiting_for("every rank", f"loading {saved.directory.name}"):
        same_layout = trainer.resume(saved.directory)
    if trainer.info.rank == 0:
        how = "" if same_layout else " (new layout: weights and optimizer resharded, RNG reseeded)"
        print(f"resumed from {saved.directory} at step {trainer.step}{how}", flush=True)


def save(trainer: Trainer, config: RunConfig) -> Optional[Path]:
    """The trainer's state, saved per ``train.save_failure`` (``checkpoint.training_state.save_retried``)."""
    t = config.train
    return save_retried(lambda: trainer.save(Path(t.save_dir), to_dict(config.model), to_dict(config), t.keep_last),
                        Path(t.save_dir), trainer.step, t.save_failure)


def log_scores(scores: Dict[str, float], evaluator: Evaluator, step: int, logger: MetricsLogger) -> None:
    """One line (on the logging rank) and ``eval/<name>`` scalars."""
    if logger.enabled:
        print(f"step {step} | {evaluator.description} | " + " | ".join(f"{k} {v:.4f}" for k, v in scores.items()),
              flush=True)
    logger.log_scalars({f"eval/{name}": value for name, value in scores.items()}, step)


def run(config: RunConfig, evaluator: Optional[Evaluator] = None) -> dict:
    """Train per ``config``; return {"history": per-step metrics, "checkpoint": last saved dir, "step": the
    step it ended at (the last, or where SIGTERM stopped it)}. ``evaluator`` scores the model every
    ``train.eval_interval`` steps."""
    config.validate(int(os.environ.get("WORLD_SIZE", "1")))
    if config.train.eval_interval and evaluator is None:
        raise ConfigError("train.eval_interval is set but no evaluator was given: train through tools/train.py "
                          "or set train.eval_interval=0")
    codebooks, config = load_codebooks(config)
    if codebooks and config.data.targets:
        VisualTargets.check_made_with(config.data.targets, *tokenizer_directory_files(config.train.visual_tokenizer),
                                      config.data.image_mode, config.model.vision.resample)
    t = config.train
    sigterm = _SigtermFlag()  # from the start: a preemption during start-up stops after the first step
    watchdog = Watchdog(int(os.environ.get("RANK", "0")), t.distributed_timeout_minutes * 60, t.slow_step_factor)
    watchdog.start()
    try:
        with waiting_for("the other ranks", "start-up"):
            info = runtime.initialize(config.parallel, seed=t.seed, timeout_minutes=t.distributed_timeout_minutes)
            shards = ShardDataset(config.data.shards)
            save_dir = Path(t.save_dir)
            last_saved = newest_for_every_rank(save_dir)
            resumed = SavedRun.read(last_saved) if last_saved else None
            steps = total_steps(config, len(shards), resumed)
            trainer = build_trainer(config, info, codebooks, steps)
            if resumed:
                resume(trainer, resumed, config, steps)
            loader = build_loader(config, trainer, shards)
        report_batching(loader, save_dir, info)
        log_rank = info.rank == info.world_size - 1  # on the last stage: it holds the losses
        logger = MetricsLogger(
            log_rank, steps, trainer.step, t.num_gpus_for_mfu or info.world_size, t.gpu_peak_tflops,
            metric_sinks(config) if log_rank else (), t.log_interval, torch.cuda.is_available(),
        )
        try:
            while trainer.step < steps:
                number = trainer.step + 1
                with watchdog.step(number):
                    watch = Stopwatch()
                    with waiting_for("the data loader", f"step {number}'s batches"):
                        micro = loader.next_step()
                    data_time = watch.lap()
                    result = trainer.train_step(micro, stop_requested=sigterm.raised,
                                                unreadable=loader.unreadable_samples)
                    step_time = watch.lap() + data_time
                logger.record(result, StepTimings(step_s=step_time, data_s=data_time))
                if evaluator is not None and t.eval_interval and trainer.step % t.eval_interval == 0:
                    with trainer.synced(), waiting_for(trainer.peers, "the in-training evaluation"):
                        scores = evaluator(trainer.model)
                    log_scores(scores, evaluator, trainer.step, logger)
                saved = None
                if (t.save_interval and trainer.step % t.save_interval == 0) or result.stop or trainer.step == steps:
                    saved = save(trainer, config)
                    last_saved = saved or last_saved
                if result.stop:
                    if info.rank == 0:
                        print(f"stopped by SIGTERM after step {trainer.step}, "
                              f"{f'saved {saved}' if saved else 'its checkpoint not written'}; "
                              "the same command resumes from the newest checkpoint", flush=True)
                    break
        finally:
            logger.close()
    finally:
        with waiting_for("every rank", "the shutdown of the process groups"):
            runtime.destroy()
        watchdog.stop()
        sigterm.restore()
    return {"history": logger.history, "checkpoint": str(last_saved) if last_saved else None, "step": trainer.step}
