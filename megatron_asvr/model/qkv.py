"""megatron's fused QKV layout: per query group, [q heads of the group; k; v] rows."""

import torch


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int) -> torch.Tensor:
    """q [np * hn, ...], k / v [ng * hn, ...] -> linear_qkv [(np + 2 ng) * hn, ...] (weights or biases)."""
    head_dim = q.shape[0] // num_heads
    rest = q.shape[1:]
    q = q.reshape(num_groups, num_heads // num_groups * head_dim, *rest)
    k = k.reshape(num_groups, head_dim, *rest)
    v = v.reshape(num_groups, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, num_heads: int, num_groups: int):
    """The inverse of ``fuse_qkv``: linear_qkv -> (q, k, v)."""
    head_dim = qkv.shape[0] // (num_heads + 2 * num_groups)
    rest = qkv.shape[1:]
    per_group = qkv.reshape(num_groups, (num_heads // num_groups + 2) * head_dim, *rest)
    q_rows = num_heads // num_groups * head_dim
    q, k, v = per_group.split([q_rows, head_dim, head_dim], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)
