"""Parameters in one layout-independent form: full tensors under TP=1 / PP=1 names.

The canonical form of a model is a dict of full (un-sharded) tensors keyed by
the names a TP=1 / PP=1 local-spec model uses: tensor-parallel shards are
gathered along their ``partition_dim`` (the gated-MLP FC1 as [gate; up]
halves), a stacked parameter is split into its slices (``stacked_names``: the
head's batched depth MLPs, model/depth_mlps.py), and a pipeline stage's local
layer indices become global layer numbers. HF import fills a model at any layout from it; the equivalence tests
compare layouts in it (each rank returns its own chunks; ``merge_ranks`` joins
them and checks that replicas agree bitwise).
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


# Transformer Engine fuses the pre-norms into the following linear; canonical
# names are the local spec's, so TE and local checkpoints share one form.
_TE_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}


def _local_spec_name(name: str) -> str:
    for te_name, local in _TE_NAMES.items():
        if name.endswith(te_name):
            return name[: -len(te_name)] + local
    return name


def _canonical_names(chunk: torch.nn.Module) -> Dict[str, str]:
    """Local parameter name -> canonical name (global layer numbers, local-spec names)."""
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
        result[name] = _local_spec_name(canonical)
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


def _split_names(canonical: str, param: torch.Tensor) -> List[str]:
    """The canonical names of a stacked parameter's slices along dim 0 (``param.stacked_names``, relative
    to its module: model/depth_mlps.py), or [canonical] for any other parameter."""
    stacked = getattr(param, "stacked_names", None)
    if stacked is None:
        return [canonical]
    module = canonical.rsplit(".", 1)[0]
    return [f"{module}.{sub}" for sub in stacked]


def full_state(model: Iterable[torch.nn.Module], attr: str = "data") -> Dict[str, torch.Tensor]:
    """This rank's parameters (or their ``attr``, e.g. DDP's ``main_grad``), TP-gathered,
    under canonical names (collective over TP). Parameters without ``attr`` are left out."""
    group = parallel_state.get_tensor_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    state = {}
    for chunk in map(_unwrap, model):
        names, glu = _canonical_names(chunk), _glu_params(chunk)
        for name, param in chunk.named_parameters():
            if getattr(param, attr, None) is None:
                continue
            value = getattr(param, attr).detach().clone()
            if _tp_sharded(param) and tp > 1:
                shards = [torch.empty_like(value) for _ in range(tp)]
                dist.all_gather(shards, value.contiguous(), group=group)
                dim = param.partition_dim
                if name in glu:
                    halves = [s.chunk(2, dim=dim) for s in shards]
                    value = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
                else:
                    value = torch.cat(shards, dim=dim)
            if hasattr(param, "stacked_names"):  # one tensor per slice, each with its own storage
                state.update(zip(_split_names(names[name], param), (v.clone() for v in value.unbind(0))))
            else:
                state[names[name]] = value
    return state


@torch.no_grad()
def load_full_state(
    model: Iterable[torch.nn.Module], full: Dict[str, torch.Tensor], strict: bool = True
) -> List[str]:
    """Copy this rank's shard of each canonical tensor into the model; return the names loaded.

    ``strict``: every parameter of the model must be in ``full`` (extra entries,
    e.g. other pipeline stages' layers, are always allowed).
    """
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    loaded, missing = [], []
    for chunk in map(_unwrap, model):
        names, glu = _canonical_names(chunk), _glu_params(chunk)
        for name, param in chunk.named_parameters():
            split = _split_names(names[name], param)
            absent = [n for n in split if n not in full]
            if absent:
                missing.extend(absent)
                continue
            value = torch.stack([full[n] for n in split]) if hasattr(param, "stacked_names") else full[split[0]]
            if _tp_sharded(param) and tp > 1:
                dim = param.partition_dim
                if name in glu:
                    value = torch.cat([half.chunk(tp, dim=dim)[rank] for half in value.chunk(2, dim=dim)], dim=dim)
                else:
                    value = value.chunk(tp, dim=dim)[rank]
            if value.shape != param.shape:
                raise ValueError(f"{names[name]}: shard shape {tuple(value.shape)} != parameter shape "
                                 f"{tuple(param.shape)}")
            param.copy_(value)
            loaded.extend(split)
    if strict and missing:
        raise KeyError(f"{len(missing)} parameters missing from the loaded state, e.g. {missing[:5]}")
    return loaded


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
