"""The ASVR visual head in plain PyTorch, as the released code computes its loss: materialised logits + CE per depth.

The wiring of megatron_asvr.model.head.VisualHead without megatron (read it for the details):

    x_0 = proj(h)                                           # H -> E -> E, GELU
    x_d = code_embed(sum_{k<d} codebook_k[code_k])          # teacher forcing, d >= 1
    per layer (causal over the D depth slots): a = x + Attn(RMSNorm1(x)); r = RMSNorm2(a); x = r + MLP_d(r)
    loss_d = CE(classifier_d(RMSNorm(x)_d), code_d)         # [N, V_d] logits, upcast to fp32
"""

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from megatron_asvr.config import CodebookSpec, HeadConfig


class DepthLayer(nn.Module):
    """Causal attention over the depth slots (biased projections) and one bias-free GELU MLP per depth."""

    def __init__(self, head: HeadConfig, depth: int):
        super().__init__()
        e, self.heads = head.hidden_size, head.num_attention_heads
        self.norm1, self.norm2 = nn.RMSNorm(e, eps=head.norm_eps), nn.RMSNorm(e, eps=head.norm_eps)
        self.qkv, self.out = nn.Linear(e, 3 * e), nn.Linear(e, e)
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(e, head.mlp_ratio * e, bias=False), nn.GELU(), nn.Linear(head.mlp_ratio * e, e,
                                                                                              bias=False))
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, D, E]
        n, d, e = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(n, d, 3, self.heads, e // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [N, heads, D, E / heads]
        r = self.norm2(x + self.out(attn.transpose(1, 2).reshape(n, d, e)))
        return r + torch.stack([mlp(r[:, i]) for i, mlp in enumerate(self.mlps)], dim=1)


class PlainVisualHead(nn.Module):
    """hidden states of image positions [N, H] and their codes [N, D] -> per-depth CE sums [D]."""

    def __init__(self, llm_hidden: int, head: HeadConfig, codebook: CodebookSpec,
                 codebook_vectors: Sequence[torch.Tensor]):
        super().__init__()
        e, depth = head.hidden_size, codebook.depth
        self.proj = nn.Sequential(nn.Linear(llm_hidden, e), nn.GELU(), nn.Linear(e, e))
        self.code_embed = nn.Linear(codebook.dim, e)
        self.layers = nn.ModuleList(DepthLayer(head, depth) for _ in range(head.num_layers))
        self.final_norm = nn.RMSNorm(e, eps=head.norm_eps)
        self.classifiers = nn.ModuleList(nn.Linear(e, v) for v in codebook.sizes)
        for d, vectors in enumerate(codebook_vectors[: depth - 1]):  # frozen tokenizer codebooks
            self.register_buffer(f"codebook_{d}", vectors, persistent=False)

    def forward(self, hidden: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        depth = len(self.classifiers)
        slots = [self.proj(hidden)]  # [N, E]
        if depth > 1:
            vectors = torch.stack([getattr(self, f"codebook_{d}")[codes[:, d]] for d in range(depth - 1)])
            slots.extend(self.code_embed(vectors.cumsum(dim=0)).unbind(0))  # [D-1, N, C] prefix sums
        x = torch.stack(slots, dim=1)  # [N, D, E]
        for layer in self.layers:
            x = layer(x)
        x = self.final_norm(x)
        return torch.stack([F.cross_entropy(classifier(x[:, d]).float(), codes[:, d], reduction="sum")
                            for d, classifier in enumerate(self.classifiers)])
