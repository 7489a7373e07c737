"""Transformer layer specs: Transformer Engine on GPU, megatron-core local modules otherwise.

This is the one place that chooses between the two implementations; models
take the resulting ``ModuleSpec`` and never branch on the backend.

- ``transformer_engine``: TE linears with the input norm fused into the QKV and
  FC1 GEMMs, ``TEDotProductAttention`` (flash / cuDNN kernels, FP8 capable).
- ``local``: megatron's tensor-parallel linears, our norms (sequence-parallel
  aware) and ``SDPAttention`` (``F.scaled_dot_product_attention``).
"""

import importlib.util
from dataclasses import dataclass
from typing import Optional, get_args

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_asvr.config import ConfigError, TransformerImpl
from megatron_asvr.model.attention import SDPAttention
from megatron_asvr.model.norms import Norm

BACKENDS = get_args(TransformerImpl)  # auto, transformer_engine, local


def have_transformer_engine() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def resolve_backend(requested: str = "auto") -> str:
    """``auto`` is Transformer Engine when it is installed and a GPU is present."""
    if requested not in BACKENDS:
        raise ConfigError(f"transformer_impl must be one of {BACKENDS}, got {requested!r}")
    if requested == "auto":
        return "transformer_engine" if have_transformer_engine() and torch.cuda.is_available() else "local"
    if requested == "transformer_engine" and not have_transformer_engine():
        raise ConfigError("transformer_impl=transformer_engine but transformer_engine is not installed: "
                          "pip install '.[gpu]'")
    return requested


@dataclass(frozen=True)
class _Modules:
    norm: type  # a norm on its own (final norm; input norms when not fused)
    column: type  # column-parallel linear
    norm_column: type  # column-parallel linear with the preceding norm fused in (TE), else = column
    row: type
    core_attention: type
    fused_norm: bool


def _modules(backend: str) -> _Modules:
    if backend == "transformer_engine":
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TEDotProductAttention,
            TELayerNormColumnParallelLinear,
            TENorm,
            TERowParallelLinear,
        )

        return _Modules(
            TENorm, TEColumnParallelLinear, TELayerNormColumnParallelLinear, TERowParallelLinear,
            TEDotProductAttention, True,
        )
    return _Modules(Norm, ColumnParallelLinear, ColumnParallelLinear, RowParallelLinear, SDPAttention, False)


def norm_module(backend: str) -> type:
    """A stand-alone norm (RMSNorm or LayerNorm per ``config.normalization``)."""
    return _modules(backend).norm


def attention_spec(backend: str, attn_mask_type: AttnMaskType, fuse_input_norm: bool = False) -> ModuleSpec:
    """Self-attention: fused QKV (column-parallel over heads), core attention, row-parallel projection."""
    m = _modules(backend)
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": attn_mask_type},
        submodules=SelfAttentionSubmodules(
            linear_qkv=m.norm_column if fuse_input_norm else m.column,
            core_attention=m.core_attention,
            linear_proj=m.row,
            q_layernorm=IdentityOp,
            k_layernorm=IdentityOp,
        ),
    )


def mlp_submodules(backend: str, fuse_input_norm: bool = False) -> MLPSubmodules:
    """FC1 column-parallel, FC2 row-parallel."""
    m = _modules(backend)
    return MLPSubmodules(linear_fc1=m.norm_column if fuse_input_norm else m.column, linear_fc2=m.row)


def layer_spec(backend: str, attn_mask_type: AttnMaskType = AttnMaskType.causal) -> ModuleSpec:
    """A pre-norm transformer layer: causal for the LLM, ``no_mask`` for a ViT."""
    fused = _modules(backend).fused_norm
    input_norm = IdentityOp if fused else norm_module(backend)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=input_norm,
            self_attention=attention_spec(backend, attn_mask_type, fuse_input_norm=fused),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=input_norm,
            mlp=ModuleSpec(module=MLP, submodules=mlp_submodules(backend, fuse_input_norm=fused)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def block_spec(
    config: TransformerConfig,
    backend: str,
    attn_mask_type: AttnMaskType = AttnMaskType.causal,
    vp_stage: Optional[int] = None,
) -> TransformerBlockSubmodules:
    """The layers this pipeline stage (and virtual stage) builds, plus the final norm."""
    layer = layer_spec(backend, attn_mask_type)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=norm_module(backend))
