"""The ASVR visual head(s) as their own safetensors + config.json, beside an HF export.

Tensor names are ours without the ``visual_heads.`` prefix (``<branch>.proj.*``,
``<branch>.layers.<i>.*``, ...) with two changes that make them layout-free:
the depth attention's fused QKV is split into ``q_proj`` / ``k_proj`` /
``v_proj`` ([heads x head_dim, E] each), and each depth classifier has exactly
``V_d`` rows (no tensor-parallel padding). ``config.json`` holds the head and
codebook settings needed to rebuild it.
"""

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, List

import torch

from megatron_asvr.config import ASVRConfig, CodebookSpec, ConfigError, HeadConfig, from_dict
from megatron_asvr.model.hf_rules import TensorRule, fused_qkv, same
from megatron_asvr.model.llm import padded_vocab_size

FORMAT = "megatron_asvr.visual_head"
PREFIX = "visual_heads."


def _classifier_rows(ours: str, name: str, rows: int, padded: int) -> TensorRule:
    def to_ours(t: List[torch.Tensor]) -> torch.Tensor:
        if t[0].shape[0] != rows:
            raise ValueError(f"{name} has {t[0].shape[0]} rows, the config says {rows} codes")
        return torch.cat([t[0], t[0].new_zeros(padded - rows, *t[0].shape[1:])])

    return TensorRule(ours, (name,), to_ours, lambda t: [t[:rows]])


def head_rules(asvr: ASVRConfig, tensor_parallel: int) -> List[TensorRule]:
    """Rules between our canonical head tensors and the exported names, for every branch."""
    head = asvr.head
    rules = []
    for branch in asvr.branches:
        codebook: CodebookSpec = getattr(asvr, branch)
        ours, out = f"{PREFIX}{branch}.", f"{branch}."
        names = [f"proj.linear_fc{i}.{param}" for i in (1, 2) for param in ("weight", "bias")]
        names += ["code_embed.weight", "code_embed.bias", "final_norm.weight"]
        for i in range(head.num_layers):
            layer = f"layers.{i}."
            names += [layer + n for n in ("norm1.weight", "norm2.weight", "attention.linear_proj.weight",
                                          "attention.linear_proj.bias")]
            names += [f"{layer}mlps.{d}.linear_fc{k}.weight" for d in range(codebook.depth) for k in (1, 2)]
            rules += [
                fused_qkv(f"{ours}{layer}attention.linear_qkv.{param}",
                          *(f"{out}{layer}attention.{p}_proj.{param}" for p in "qkv"),
                          head.num_attention_heads, head.num_attention_heads)
                for param in ("weight", "bias")
            ]
        rules += [same(ours + name, out + name) for name in names]
        for d, size in enumerate(codebook.sizes):
            padded = padded_vocab_size(size, tensor_parallel)
            rules += [
                _classifier_rows(f"{ours}classifiers.{d}.{param}", f"{out}classifiers.{d}.{param}", size, padded)
                for param in ("weight", "bias")
            ]
    return rules


def head_config(asvr: ASVRConfig, llm_hidden_size: int) -> Dict[str, Any]:
    return {
        "format": FORMAT,
        "llm_hidden_size": llm_hidden_size,
        "head": dataclasses.asdict(asvr.head),
        "branches": {branch: dataclasses.asdict(getattr(asvr, branch)) for branch in asvr.branches},
        "input": "the LLM's final normed hidden states at image positions",
    }


def write_head_config(directory: Path, asvr: ASVRConfig, llm_hidden_size: int) -> None:
    text = json.dumps(head_config(asvr, llm_hidden_size), indent=1) + "\n"
    (Path(directory) / "config.json").write_text(text, encoding="utf-8")


def read_head_config(directory: Path, base: ASVRConfig, llm_hidden_size: int) -> ASVRConfig:
    """``base`` with the head and codebook settings of the exported head at ``directory``."""
    path = Path(directory) / "config.json"
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot read the visual head config: {err}") from err
    if found.get("format") != FORMAT:
        raise ConfigError(f"{path}: format is {found.get('format')!r}, not {FORMAT!r}")
    if found.get("llm_hidden_size") != llm_hidden_size:
        raise ConfigError(f"{path}: llm_hidden_size={found.get('llm_hidden_size')} but the LLM has {llm_hidden_size}")
    branches = found.get("branches") or {}
    supervision = {("semantic",): "semantic", ("appearance",): "appearance",
                   ("appearance", "semantic"): "dual"}.get(tuple(sorted(branches)))
    if supervision is None:
        raise ConfigError(f"{path}: branches {sorted(branches)} are not semantic, appearance or both")
    specs = {branch: from_dict(CodebookSpec, spec, f"{path}: branches.{branch}.") for branch, spec in branches.items()}
    head = from_dict(HeadConfig, found.get("head"), f"{path}: head.")
    return dataclasses.replace(base, visual_loss=True, supervision=supervision, head=head, **specs)
