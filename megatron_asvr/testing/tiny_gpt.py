"""A tiny LLaMA-shaped GPT trained on fixed batches, at any layout: the foundation's test case.

Runs inside a rank started by ``multirank.run_ranks``. The same global batch is
cut into the same micro-batches at every layout (data-parallel rank r takes
the r-th contiguous block of micro-batches), so per-micro-batch losses and
the parameters after each step are comparable with the TP=PP=DP=1 run.
"""

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional

import torch
from megatron.core import tensor_parallel

from megatron_asvr import runtime
from megatron_asvr.config import LLMConfig, ParallelConfig
from megatron_asvr.model.llm import build_llm, llm_transformer_config
from megatron_asvr.model.specs import resolve_backend
from megatron_asvr.model.canonical import full_state, load_full_state
from megatron_asvr.training.parallel_model import (
    DataParallelSettings,
    build_model_chunks,
    build_optimizer,
    wrap_data_parallel,
)
from megatron_asvr.training.checkpoint import load_model, save_model
from megatron_asvr.training.step import evaluate, train_step

EVAL_STEP = 99  # the fixed batch used for evaluation only

TINY_LLAMA = LLMConfig(
    num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2,
    ffn_hidden_size=96, vocab_size=256, max_sequence_length=32,
)


@dataclass
class Case:
    """What to train and how long: shared by the reference and every layout."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    llm: LLMConfig = field(default_factory=lambda: TINY_LLAMA)
    steps: int = 3
    global_batch: int = 8
    micro_batch: int = 2
    seq_length: int = 16
    lr: float = 1e-3
    clip_grad: float = 0.5
    params_dtype: torch.dtype = torch.float32
    seed: int = 1234


def fixed_batches(case: Case, step: int) -> List[Dict[str, torch.Tensor]]:
    """The global batch of ``step`` as micro-batches (identical at every layout)."""
    g = torch.Generator().manual_seed(1000 + step)
    n, s = case.global_batch, case.seq_length
    tokens = torch.randint(0, case.llm.vocab_size, (n, s + 1), generator=g)
    loss_mask = (torch.rand(n, s, generator=g) > 0.2).float()
    micro = []
    for i in range(0, n, case.micro_batch):
        sl = slice(i, i + case.micro_batch)
        micro.append(
            dict(
                tokens=tokens[sl, :-1],
                labels=tokens[sl, 1:],
                loss_mask=loss_mask[sl],
                position_ids=torch.arange(s).expand(case.micro_batch, s),
            )
        )
    return micro


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])  # [b, s]
    return per_token, partial(_loss_func, batch["loss_mask"])


def _loss_func(loss_mask, per_token):
    loss_sum = (per_token.float() * loss_mask).sum()
    count = loss_mask.sum().to(torch.int)
    return loss_sum, count, {"lm loss": torch.stack([loss_sum.detach(), loss_mask.sum()])}


def build(case: Case):
    """Initialise the runtime and build the DDP-wrapped chunks and optimizer for ``case``."""
    info = runtime.initialize(case.parallel, seed=case.seed)
    case.llm.validate(case.parallel)
    backend = resolve_backend("local")
    config = llm_transformer_config(case.llm, case.parallel, backend, params_dtype=case.params_dtype)
    chunks = build_model_chunks(
        lambda pre, post, vp: build_llm(case.llm, config, backend, pre, post, vp), info.device
    )
    return info, config, chunks


def _rank_micro_batches(case: Case, info, step: int):
    """This data-parallel rank's micro-batches of ``step``, and the global index of the first."""
    num_micro = case.global_batch // case.micro_batch // info.dp_size
    first = info.dp_rank * num_micro
    return fixed_batches(case, step)[first:first + num_micro], first


def _iterators(model, micro):
    return [iter(micro) for _ in model] if len(model) > 1 else iter(micro)


def _reported(reports, first: int):
    """(global micro-batch index, loss sum, token count) per report of the last stage."""
    return [(first + i, *r["lm loss"].tolist()) for i, r in enumerate(reports)]


def evaluate_losses(case: Case, info, model, step: int = EVAL_STEP):
    """Forward-only losses on the batches of ``step`` (a batch never trained on by default)."""
    micro, first = _rank_micro_batches(case, info, step)
    reports = evaluate(_forward_step, _iterators(model, micro), model, len(micro), case.seq_length, case.micro_batch)
    return _reported(reports, first)


def _main_param_dtypes(optimizer) -> set:
    optimizers = getattr(optimizer, "chained_optimizers", [optimizer])
    return {p.dtype for opt in optimizers for group in opt.optimizer.param_groups for p in group["params"]}


def train(case: Case, initial: Optional[Dict[str, torch.Tensor]] = None, save_to: Optional[str] = None) -> dict:
    """Train ``case``; return the canonical initial params, losses, grad norms and params per step.

    With ``save_to``, the trained model is saved there as a dist checkpoint and
    its evaluation losses are returned too.
    """
    info, config, chunks = build(case)
    if initial is None:
        initial = full_state(chunks)
    else:
        load_full_state(chunks, initial)
    settings = DataParallelSettings(distributed_optimizer=case.parallel.distributed_optimizer)
    model = wrap_data_parallel(chunks, settings)
    optimizer = build_optimizer(
        model, lr=case.lr, clip_grad=case.clip_grad, distributed_optimizer=settings.distributed_optimizer
    )
    tracker_states = tensor_parallel.get_cuda_rng_tracker().get_states()
    out = {
        "initial": initial, "losses": [], "grad_norms": [], "params": [], "rank": info.rank,
        "tp_rank": info.tp_rank, "dp_rank": info.dp_rank,
        "model_parallel_rng": tracker_states["model-parallel-rng"].clone(),
        "main_param_dtypes": _main_param_dtypes(optimizer),
    }
    for step in range(case.steps):
        micro, first = _rank_micro_batches(case, info, step)
        result = train_step(_forward_step, _iterators(model, micro), model, optimizer, len(micro), case.seq_length, case.micro_batch)
        out["losses"].append(_reported(result.reports, first))
        out["grad_norms"].append(result.grad_norm)
        out["params"].append(full_state(model))
    if save_to is not None:
        save_model(model, Path(save_to))
        out["eval"] = evaluate_losses(case, info, model)
    runtime.destroy()
    return out


def evaluate_checkpoint(case: Case, directory: str) -> list:
    """Load a dist checkpoint at ``case``'s layout and return its evaluation losses."""
    info, _, chunks = build(case)
    model = wrap_data_parallel(chunks, DataParallelSettings())
    load_model(model, Path(directory))
    losses = evaluate_losses(case, info, model)
    runtime.destroy()
    return losses
