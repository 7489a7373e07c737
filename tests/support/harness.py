"""Train a tiny model on fixed batches at any layout: the equivalence tests' engine.

Runs inside a rank started by ``multirank.run_ranks``. The same global batch is
cut into the same micro-batches at every layout (data-parallel rank r takes
the r-th contiguous block), so per-micro-batch losses, gradients and the
parameters after each step are comparable with the TP=PP=DP=1 run. A case
subclass says what model to build, what the batches are and how a
micro-batch runs.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch
from megatron.core import tensor_parallel

from megatron_asvr import runtime
from megatron_asvr.checkpoint.model import load_weights, save_weights
from megatron_asvr.config import FastPathsConfig, ParallelConfig
from megatron_asvr.data.batch import MicroBatch
from megatron_asvr.model.canonical import full_state, load_full_state
from megatron_asvr.model.loss import LossReport
from megatron_asvr.model.chunks import ChunkBuilder
from megatron_asvr.model.depth_mlps import BatchedDepthMLPs
from megatron_asvr.runtime.fast_paths import FastPaths, apply_megatron_patches
from megatron_asvr.training.trainer import OptimizerSettings, StepTask, Trainer

EVAL_STEP = 99  # the fixed batch used for evaluation only
# Every fast path on, as their CPU twins run them (runtime/fast_paths.py); the references run them off.
ALL_FAST_PATHS = FastPathsConfig(fused_adam=True, foreach_clip=True, wgrad_accumulation=True, bias_fusions=True,
                                 rms_norm="torch", attention="math", batched_head_mlp=True)


@dataclass
class Case:
    """What to train and how long: shared by the reference and every layout."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    steps: int = 3
    global_batch: int = 8
    micro_batch: int = 2
    seq_length: int = 16
    lr: float = 1e-3
    adam_eps: float = 1e-8
    clip_grad: float = 0.5
    params_dtype: torch.dtype = torch.float32
    seed: int = 1234
    bucket_size: Optional[int] = None  # DDP gradient bucket, in elements (None: megatron's default)
    fast_paths: FastPathsConfig = field(default_factory=FastPathsConfig)  # train.fast_paths (auto: off on CPU)
    master_weights: bool = True  # train.master_weights (False: pure bf16)

    def resolved_fast_paths(self) -> FastPaths:
        return FastPaths.resolve(self.fast_paths, torch.cuda.is_available())

    def transformer_changes(self):
        """The fast paths' TransformerConfig changes, with megatron patched for them (as the Trainer does before
        it builds): a chunk builder used outside the Trainer builds what the config asks for."""
        paths = self.resolved_fast_paths()
        apply_megatron_patches(paths)
        return paths.transformer_changes()

    # -- what subclasses define ------------------------------------------------
    def chunk_builder(self) -> ChunkBuilder:
        raise TypeError(f"{type(self).__name__} must define chunk_builder")

    def global_batch_data(self, step: int) -> List[MicroBatch]:
        """The global batch of ``step`` as micro-batches (identical at every layout)."""
        raise TypeError(f"{type(self).__name__} must define global_batch_data")

    def task(self) -> StepTask:
        raise TypeError(f"{type(self).__name__} must define task")


def _rank_micro_batches(case: Case, info, step: int):
    """This data-parallel rank's micro-batches of ``step``, and the global index of the first."""
    micro = case.global_batch_data(step)
    per_rank = len(micro) // info.dp_size
    first = info.dp_rank * per_rank
    return micro[first:first + per_rank], first


def _reported(reports: List[LossReport], first: int) -> List[tuple]:
    """(global micro-batch index, report) for each report of the last stage, on the host."""
    return [(first + i, r.like(r.flat().cpu())) for i, r in enumerate(reports)]


def _trainer(case: Case, initial: Optional[Dict[str, torch.Tensor]] = None) -> Trainer:
    info = runtime.initialize(case.parallel, seed=case.seed)
    optim = OptimizerSettings(lr=case.lr, clip_grad=case.clip_grad, adam_eps=case.adam_eps,
                              master_weights=case.master_weights)
    return Trainer(case.chunk_builder(), case.task(), case.parallel, optim, info, bucket_size=case.bucket_size,
                   init_weights=None if initial is None else lambda chunks: load_full_state(chunks, initial),
                   fast_paths=case.resolved_fast_paths())


def _main_param_dtypes(optimizer) -> set:
    optimizers = getattr(optimizer, "chained_optimizers", [optimizer])
    return {p.dtype for opt in optimizers for group in opt.optimizer.param_groups for p in group["params"]}


def _fused_adam(optimizer) -> bool:
    """Whether the inner torch AdamW steps fused (every group alike, else an error)."""
    optimizers = getattr(optimizer, "chained_optimizers", [optimizer])
    flags = {bool(group.get("fused")) for opt in optimizers for group in opt.optimizer.param_groups}
    assert len(flags) == 1, flags
    return flags.pop()


def _record_grads_before_update(trainer: Trainer, grads: list) -> None:
    """Append the canonical reduced gradients to ``grads`` each time the optimizer is about to step."""
    step = trainer.optimizer.step

    def recording_step():
        grads.append(full_state(trainer.model, attr="main_grad"))
        return step()

    trainer.optimizer.step = recording_step


def train_case(case: Case, initial: Optional[Dict[str, torch.Tensor]] = None, save_to: Optional[str] = None) -> dict:
    """Train ``case`` through ``Trainer.train_step``; return the canonical initial params, and per
    step the loss reports, grad norm, gradients (reduced, before clipping and the update) and
    params (after the update).

    With ``save_to``, the trained model is saved there as a dist checkpoint and its
    evaluation reports are returned too.
    """
    trainer = _trainer(case, initial)
    info = trainer.info
    out = {
        "initial": full_state(trainer.chunks) if initial is None else initial,
        "reports": [], "grad_norms": [], "grads": [], "params": [],
        "rank": info.rank, "tp_rank": info.tp_rank, "dp_rank": info.dp_rank,
        "model_parallel_rng": tensor_parallel.get_cuda_rng_tracker().get_states()["model-parallel-rng"].clone(),
        "main_param_dtypes": _main_param_dtypes(trainer.optimizer),
        "fused_adam": _fused_adam(trainer.optimizer),
        "batched_head_mlp": any(isinstance(m, BatchedDepthMLPs) for chunk in trainer.chunks for m in chunk.modules()),
        "grad_buckets": sum(len(buffer.buckets) for chunk in trainer.model for buffer in chunk.buffers),
    }
    if not case.parallel.distributed_optimizer:  # the distributed optimizer keeps only shards
        _record_grads_before_update(trainer, out["grads"])
    for step in range(case.steps):
        micro, first = _rank_micro_batches(case, info, step)
        result = trainer.train_step(micro)
        assert not result.skipped, f"step {step} was skipped as non-finite"
        out["reports"].append(_reported(result.reports, first))
        out["grad_norms"].append(result.grad_norm)
        with trainer.synced():
            out["params"].append(full_state(trainer.model))
    if save_to is not None:
        with trainer.synced():
            save_weights(trainer.model, Path(save_to))
        out["eval"] = evaluate_reports(case, trainer)
    runtime.destroy()
    return out


def evaluate_reports(case: Case, trainer: Trainer, step: int = EVAL_STEP) -> List[tuple]:
    """Forward-only reports on the batches of ``step`` (a batch never trained on by default)."""
    micro, first = _rank_micro_batches(case, trainer.info, step)
    return _reported(trainer.evaluate(micro), first)


def evaluate_checkpoint(case: Case, directory: str) -> List[tuple]:
    """Load a dist checkpoint at ``case``'s layout and return its evaluation reports."""
    return load_checkpoint(case, directory)["eval"]


def load_checkpoint(case: Case, directory: str) -> dict:
    """Load a dist checkpoint at ``case``'s layout: its evaluation reports and canonical parameters."""
    trainer = _trainer(case)
    load_weights(trainer.model, Path(directory))
    out = {"eval": evaluate_reports(case, trainer), "params": full_state(trainer.model)}
    runtime.destroy()
    return out


def merged_reports(results: List[dict], key: str = "reports") -> Dict[tuple, dict]:
    """{(step, micro-batch): report} over the last-stage ranks (one per DP rank)."""
    merged = {}
    for result in results:
        steps = result[key] if key == "reports" else [result[key]]
        for step, reports in enumerate(steps):
            for micro, report in reports:
                merged[(step, micro)] = report
    return merged
