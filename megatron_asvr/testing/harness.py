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
from megatron_asvr.config import ParallelConfig
from megatron_asvr.model.canonical import full_state, load_full_state
from megatron_asvr.checkpoint_format import load_model, save_model
from megatron_asvr.model.chunks import ChunkBuilder, build_model_chunks
from megatron_asvr.training.parallel_model import (
    DataParallelSettings,
    build_optimizer,
    params_synced,
    wrap_data_parallel,
)
from megatron_asvr.training.step import evaluate, forward_backward

EVAL_STEP = 99  # the fixed batch used for evaluation only


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

    # -- what subclasses define ------------------------------------------------
    def chunk_builder(self) -> ChunkBuilder:
        raise TypeError(f"{type(self).__name__} must define chunk_builder")

    def global_batch_data(self, step: int) -> List[dict]:
        """The global batch of ``step`` as micro-batches (identical at every layout)."""
        raise TypeError(f"{type(self).__name__} must define global_batch_data")

    def forward_step(self, data_iterator, model):
        raise TypeError(f"{type(self).__name__} must define forward_step")

    def prepare(self, micro_batches: List[dict]) -> List[dict]:
        """Hook to annotate this rank's micro-batches before a step (e.g. global loss counts)."""
        return micro_batches


def _rank_micro_batches(case: Case, info, step: int):
    """This data-parallel rank's micro-batches of ``step``, and the global index of the first."""
    micro = case.global_batch_data(step)
    per_rank = len(micro) // info.dp_size
    first = info.dp_rank * per_rank
    return case.prepare(micro[first:first + per_rank]), first


def _iterators(model, micro):
    return [iter(micro) for _ in model] if len(model) > 1 else iter(micro)


def _reported(reports, first: int) -> List[tuple]:
    """(global micro-batch index, report dict) for each report of the last stage."""
    return [(first + i, {k: v.detach().clone() for k, v in r.items()}) for i, r in enumerate(reports)]


def _build(case: Case):
    info = runtime.initialize(case.parallel, seed=case.seed)
    return info, build_model_chunks(case.chunk_builder(), info.device)


def _main_param_dtypes(optimizer) -> set:
    optimizers = getattr(optimizer, "chained_optimizers", [optimizer])
    return {p.dtype for opt in optimizers for group in opt.optimizer.param_groups for p in group["params"]}


def train(case: Case, initial: Optional[Dict[str, torch.Tensor]] = None, save_to: Optional[str] = None) -> dict:
    """Train ``case``; return the canonical initial params, and per step the loss reports,
    grad norm, gradients (before the update) and params (after it).

    With ``save_to``, the trained model is saved there as a dist checkpoint and its
    evaluation reports are returned too.
    """
    info, chunks = _build(case)
    if initial is None:
        initial = full_state(chunks)
    else:
        load_full_state(chunks, initial)
    settings = DataParallelSettings.of(case.parallel)
    model = wrap_data_parallel(chunks, settings)
    optimizer = build_optimizer(
        model, lr=case.lr, clip_grad=case.clip_grad, adam_eps=case.adam_eps,
        distributed_optimizer=settings.distributed_optimizer,
    )
    out = {
        "initial": initial, "reports": [], "grad_norms": [], "grads": [], "params": [],
        "rank": info.rank, "tp_rank": info.tp_rank, "dp_rank": info.dp_rank,
        "model_parallel_rng": tensor_parallel.get_cuda_rng_tracker().get_states()["model-parallel-rng"].clone(),
        "main_param_dtypes": _main_param_dtypes(optimizer),
    }
    for step in range(case.steps):
        micro, first = _rank_micro_batches(case, info, step)
        reports = forward_backward(case.forward_step, _iterators(model, micro), model, optimizer, len(micro), case.seq_length, case.micro_batch)
        if not case.parallel.distributed_optimizer:  # the distributed optimizer keeps only shards
            out["grads"].append(full_state(model, attr="main_grad"))
        _, grad_norm, _ = optimizer.step()
        out["reports"].append(_reported(reports, first))
        out["grad_norms"].append(grad_norm)
        with params_synced(model):
            out["params"].append(full_state(model))
    if save_to is not None:
        with params_synced(model):
            save_model(model, Path(save_to))
            out["eval"] = evaluate_reports(case, info, model)
    runtime.destroy()
    return out


def evaluate_reports(case: Case, info, model, step: int = EVAL_STEP) -> List[tuple]:
    """Forward-only reports on the batches of ``step`` (a batch never trained on by default)."""
    micro, first = _rank_micro_batches(case, info, step)
    reports = evaluate(case.forward_step, _iterators(model, micro), model, len(micro), case.seq_length, case.micro_batch)
    return _reported(reports, first)


def evaluate_checkpoint(case: Case, directory: str) -> List[tuple]:
    """Load a dist checkpoint at ``case``'s layout and return its evaluation reports."""
    info, chunks = _build(case)
    model = wrap_data_parallel(chunks, DataParallelSettings())
    load_model(model, Path(directory))
    reports = evaluate_reports(case, info, model)
    runtime.destroy()
    return reports


def merged_reports(results: List[dict], key: str = "reports") -> Dict[tuple, dict]:
    """{(step, micro-batch): report} over the last-stage ranks (one per DP rank)."""
    merged = {}
    for result in results:
        steps = result[key] if key == "reports" else [result[key]]
        for step, reports in enumerate(steps):
            for micro, report in reports:
                merged[(step, micro)] = report
    return merged

