"""TransformerConfig fields every model of this project shares: layout, precision, fusions."""

import torch

from megatron_asvr.config import ParallelConfig


def model_parallel_kwargs(parallel: ParallelConfig, params_dtype: torch.dtype) -> dict:
    """Layout, precision and pipeline-communication settings for a TransformerConfig."""
    interleaved = parallel.virtual_pipeline is not None
    return dict(
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        # Losses are (sum, count) per micro-batch; the schedule and
        # finalize_model_grads normalise by the global count.
        calculate_per_token_loss=True,
        # As Megatron-LM: interleaving overlaps p2p with compute using separate sends.
        # Batched p2p at PP=2 with a virtual pipeline swaps activations and gradients
        # (prev and next rank coincide; NVIDIA/Megatron-LM#750, #1450): the
        # pp2_virtual2 equivalence test catches it.
        overlap_p2p_comm=interleaved,
        batch_p2p_comm=not interleaved,
        # Pseudo-freeing a stage's output after its isend is safe with NCCL (the
        # send already holds the pointer on its stream) but not with gloo, which
        # reads the storage later: with overlapped p2p it sends freed memory.
        deallocate_pipeline_outputs=torch.cuda.is_available(),
    )


def fusion_kwargs(backend: str) -> dict:
    """Fused kernels: on with Transformer Engine (GPU), off for the local CPU-capable path."""
    fused = backend == "transformer_engine"
    return dict(
        bias_activation_fusion=fused,
        bias_dropout_fusion=fused,
        apply_rope_fusion=fused,
        gradient_accumulation_fusion=fused,
        masked_softmax_fusion=False,  # attention softmax lives inside SDPA / TE attention
        persist_layer_norm=False,
    )


def recompute_kwargs(mode: str) -> dict:
    """Activation recompute: ``none``, ``selective`` (core attention) or ``full`` (every layer)."""
    if mode == "selective":
        return {"recompute_granularity": "selective"}
    if mode == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    return {}
