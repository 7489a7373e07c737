"""Core attention through ``torch.nn.functional.scaled_dot_product_attention``.

A drop-in for megatron's ``DotProductAttention`` in local layer specs: same
constructor and forward signature, but no global memory buffer, GQA without
materialising repeated keys, and PyTorch's flash / memory-efficient kernels on
GPU (the math kernel on CPU). The backends SDPA may use, in priority order, are chosen when it is
built (``train.fast_paths.attention`` through ``runtime.fast_paths.kernel_choice``: cuDNN first with
CUDA). Packed sequences (THD, ``cu_seqlens``; megatron
squeezes the batch of one) attend within each sample, one SDPA call per sample:
the CPU twin of Transformer Engine's THD attention, computing the same function
at the same cost (sum of the samples' squared lengths, not the pack's).
"""

import inspect
import math
from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import divide
from torch.nn.attention import sdpa_kernel

from megatron_asvr.runtime.fast_paths import kernel_choice

# sdpa_kernel's priority order needs torch >= 2.6; before, the listed backends are allowed in torch's order.
_PRIORITY = {"set_priority": True} if "set_priority" in inspect.signature(sdpa_kernel).parameters else {}


class SDPAttention(MegatronModule):
    """softmax(q k^T * scale + mask) v over this rank's heads."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism needs Transformer Engine attention")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp_size = pg_collection.tp.size()
        self.attn_mask_type = attn_mask_type
        self.heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.groups_per_partition = divide(config.num_query_groups, tp_size)
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        window = is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number)
        self.window_size = config.window_size if window else None  # (left, right) positions
        self.backends = kernel_choice().sdpa_backends()  # [] = torch's own choice

    def _mask(self, sq: int, sk: int, mask_type: AttnMaskType, attention_mask, device):
        """Boolean mask, True where attending is allowed, or None for no mask."""
        allowed = None
        q_pos = torch.arange(sq, device=device)[:, None] + (sk - sq)  # [sq, 1]
        k_pos = torch.arange(sk, device=device)[None, :]  # [1, sk]
        if mask_type == AttnMaskType.causal:
            allowed = k_pos <= q_pos
        if self.window_size is not None:
            left, right = self.window_size  # -1: unbounded on that side
            if left >= 0:
                allowed = (q_pos - k_pos <= left) if allowed is None else allowed & (q_pos - k_pos <= left)
            if right >= 0:
                allowed = (k_pos - q_pos <= right) if allowed is None else allowed & (k_pos - q_pos <= right)
        if attention_mask is not None and mask_type != AttnMaskType.causal:
            keep = ~attention_mask  # megatron masks are True where attention is blocked
            allowed = keep if allowed is None else allowed & keep
        return allowed

    def forward(
        self,
        query: torch.Tensor,  # [sq, b, np, hn]
        key: torch.Tensor,  # [sk, b, ng, hn]
        value: torch.Tensor,  # [sk, b, ng, hn]
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:  # [sq, b, np * hn]; packed (THD): [t, np * hn]
        if attention_bias is not None:
            raise ValueError("attention bias needs Transformer Engine attention")
        mask_type = attn_mask_type or self.attn_mask_type
        if packed_seq_params is None:
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
            context = self._attend(q, k, v, self._mask(q.shape[2], k.shape[2], mask_type, attention_mask, q.device),
                                   mask_type)
            return context.permute(2, 0, 1, 3).flatten(2)  # [b, np, sq, hn] -> [sq, b, hp]
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"packed sequences in {packed_seq_params.qkv_format!r} format: only thd is supported")
        # THD [t, heads, hn]: one sample after another. host sync (CUDA): the samples' lengths, to split;
        # Transformer Engine's THD attention, the GPU path, needs none.
        cu_seqlens = packed_seq_params.cu_seqlens_q
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        contexts = []
        for q, k, v in zip(*(t.permute(1, 0, 2).split(lengths, dim=1) for t in (query, key, value))):
            length = q.shape[1]  # q [heads, L, hn]
            mask = self._mask(length, length, mask_type, None, q.device)
            contexts.append(self._attend(q[None], k[None], v[None], mask, mask_type)[0])  # [heads, L, hn]
        return torch.cat(contexts, dim=1).permute(1, 0, 2).flatten(1)  # [t, hp]

    def _attend(self, q, k, v, mask, mask_type) -> torch.Tensor:
        """softmax attention of q [b, heads, sq, hn] over k, v [b, groups, sk, hn] -> [b, heads, sq, hn]."""
        is_causal = mask_type == AttnMaskType.causal and self.window_size is None and q.shape[2] == k.shape[2]
        dropout_p = self.dropout_p if self.training else 0.0

        def attend():
            with sdpa_kernel(self.backends, **_PRIORITY) if self.backends else nullcontext():
                return F.scaled_dot_product_attention(
                    q, k, v,
                    attn_mask=None if is_causal else mask,
                    dropout_p=dropout_p,
                    is_causal=is_causal,
                    scale=self.softmax_scale,
                    enable_gqa=self.groups_per_partition != self.heads_per_partition,
                )

        if dropout_p > 0 and not self.config.sequence_parallel:
            # Heads are split over TP ranks: each needs its own dropout stream (as megatron).
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return attend()
        return attend()
