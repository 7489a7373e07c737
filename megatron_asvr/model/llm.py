"""The language model: megatron's GPTModel with LLaMA / Mistral / Qwen settings."""

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_asvr.config import LLMConfig, ParallelConfig
from megatron_asvr.model.transformer_defaults import fusion_kwargs, model_parallel_kwargs
from megatron_asvr.model.specs import block_spec


def padded_vocab_size(vocab_size: int, tensor_parallel: int, divisible_by: int = 128) -> int:
    """The vocabulary rounded up to ``divisible_by`` and to a multiple of ``tensor_parallel``.

    Unlike Megatron-LM's rounding to ``divisible_by x tensor_parallel``, the result
    does not change with TP whenever the rounded size already divides (32000 and
    16384 do for TP in 1, 2, 4, 8), so checkpoints reshard without reshaping.
    """
    padded = -(-vocab_size // divisible_by) * divisible_by
    while padded % tensor_parallel:
        padded += divisible_by
    return padded


def llm_transformer_config(
    llm: LLMConfig,
    parallel: ParallelConfig,
    backend: str,
    params_dtype: torch.dtype = torch.float32,
    **overrides,
) -> TransformerConfig:
    """megatron's TransformerConfig for a LLaMA-architecture decoder (and Qwen's biases, q/k norm, head width)."""
    kwargs = dict(
        num_layers=llm.num_layers,
        hidden_size=llm.hidden_size,
        num_attention_heads=llm.num_attention_heads,
        num_query_groups=llm.kv_heads,
        ffn_hidden_size=llm.ffn_hidden_size,
        kv_channels=llm.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=llm.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=llm.qkv_bias,
        qk_layernorm=llm.qk_norm,
        hidden_dropout=llm.hidden_dropout,
        attention_dropout=llm.attention_dropout,
        init_method_std=llm.init_method_std,
        window_size=(llm.sliding_window - 1, 0) if llm.sliding_window else None,
        num_layers_in_first_pipeline_stage=llm.layers_in_first_stage if parallel.pipeline_parallel > 1 else None,
        num_layers_in_last_pipeline_stage=llm.layers_in_last_stage if parallel.pipeline_parallel > 1 else None,
        **model_parallel_kwargs(parallel, params_dtype),
        **fusion_kwargs(backend),
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_llm(
    llm: LLMConfig,
    config: TransformerConfig,
    backend: str,
    pre_process: bool,
    post_process: bool,
    vp_stage: Optional[int] = None,
) -> GPTModel:
    """This pipeline stage's part of the decoder (embedding on the first, LM head on the last)."""
    return GPTModel(
        config=config,
        transformer_layer_spec=block_spec(config, backend, vp_stage=vp_stage),
        vocab_size=padded_vocab_size(llm.vocab_size, config.tensor_model_parallel_size),
        max_sequence_length=llm.max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=not llm.untie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(llm.rotary_base),
        vp_stage=vp_stage,
    )
