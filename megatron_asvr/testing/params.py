"""Parameters in one layout-independent form, for equivalence tests across TP / PP / DP.

The canonical form of a model is a dict of full (un-sharded) tensors keyed by
the names a TP=1 / PP=1 model would use: tensor-parallel shards are gathered
along their ``partition_dim`` (the gated-MLP FC1 as [gate; up] halves),
and a pipeline stage's local layer indices become global layer numbers.
Each rank returns the canonical tensors of its own chunks; ``merge_ranks``
joins them and checks that replicas agree bitwise.
"""

from typing import Dict, Iterable, List

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.transformer_layer import TransformerLayer


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    while hasattr(chunk, "module"):  # DDP, Float16Module
        chunk = chunk.module
    return chunk


def _canonical_names(chunk: torch.nn.Module) -> Dict[str, str]:
    """Local parameter name -> canonical name (global layer numbers)."""
    prefixes = {}
    for name, module in chunk.named_modules():
        if isinstance(module, TransformerLayer):
            parent = name.rsplit(".", 1)[0]
            prefixes[name + "."] = f"{parent}.{module.layer_number - 1}."
    result = {}
    for name, _ in chunk.named_parameters():
        canonical = name
        for local, global_ in prefixes.items():
            if name.startswith(local):
                canonical = global_ + name[len(local):]
                break
        result[name] = canonical
    return result


def _glu_params(chunk: torch.nn.Module) -> set:
    """Names of gated-MLP FC1 parameters (stored per TP rank as [gate_r; up_r])."""
    names = set()
    for name, module in chunk.named_modules():
        if isinstance(module, MLP) and module.config.gated_linear_unit:
            names.update(f"{name}.linear_fc1.{p}" for p, _ in module.linear_fc1.named_parameters())
    return names


def _tp_sharded(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def full_state(model: Iterable[torch.nn.Module]) -> Dict[str, torch.Tensor]:
    """This rank's parameters, TP-gathered, under canonical names (collective over TP)."""
    group = parallel_state.get_tensor_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    state = {}
    for chunk in map(_unwrap, model):
        names, glu = _canonical_names(chunk), _glu_params(chunk)
        for name, param in chunk.named_parameters():
            value = param.detach().clone()
            if _tp_sharded(param) and tp > 1:
                shards = [torch.empty_like(value) for _ in range(tp)]
                dist.all_gather(shards, value.contiguous(), group=group)
                dim = param.partition_dim
                if name in glu:
                    halves = [s.chunk(2, dim=dim) for s in shards]
                    value = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
                else:
                    value = torch.cat(shards, dim=dim)
            state[names[name]] = value
    return state


@torch.no_grad()
def load_full_state(model: Iterable[torch.nn.Module], full: Dict[str, torch.Tensor]) -> None:
    """Copy this rank's shard of each canonical tensor into the model."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    for chunk in map(_unwrap, model):
        names, glu = _canonical_names(chunk), _glu_params(chunk)
        for name, param in chunk.named_parameters():
            value = full[names[name]]
            if _tp_sharded(param) and tp > 1:
                dim = param.partition_dim
                if name in glu:
                    value = torch.cat([half.chunk(tp, dim=dim)[rank] for half in value.chunk(2, dim=dim)], dim=dim)
                else:
                    value = value.chunk(tp, dim=dim)[rank]
            param.copy_(value)


def merge_ranks(states: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Join the ranks' canonical states; replicas of a tensor must agree bitwise."""
    merged: Dict[str, torch.Tensor] = {}
    for rank, state in enumerate(states):
        for name, value in state.items():
            if name in merged and not torch.equal(merged[name], value):
                diff = (merged[name].float() - value.float()).abs().max().item()
                raise AssertionError(f"replicas of {name} differ on rank {rank} (max abs diff {diff:.3g})")
            merged.setdefault(name, value)
    return merged
