"""The project's visual head equals a plain-PyTorch head written from docs/method.md#3-the-visual-head.

The reference below uses no megatron code: nn.Linear, an explicit causal
multi-head attention with biases over the depth slots, the released layer
wiring, per-depth bias-free exact-GELU MLPs, RMSNorm with fp32 variance
(eps 1e-6), and one biased classifier per depth. Both forms of the per-depth MLPs (model/depth_mlps.py: D MLPs, or
their weights stacked into batched GEMMs) must equal it, at TP 1 and 2, and load each other's checkpoints.
"""

import math

import pytest
import torch
from torch import nn

from tests.support.multirank import run_ranks
from megatron_asvr.config import CodebookSpec, HeadConfig, ParallelConfig
from megatron_asvr.model.qkv import fuse_qkv

H, E, HEADS, LAYERS, C = 24, 32, 4, 2, 12
SIZES = [20, 24, 17]  # different codebook sizes per depth; 17 is odd (padded under TP)
N = 10
LOGIT_TOL = 1e-5


class RefRMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class RefLayer(nn.Module):
    def __init__(self, depth):
        super().__init__()
        self.norm1, self.norm2 = RefRMSNorm(E), RefRMSNorm(E)
        self.q, self.k, self.v, self.o = (nn.Linear(E, E) for _ in range(4))
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(E, 2 * E, bias=False), nn.GELU(), nn.Linear(2 * E, E, bias=False))
            for _ in range(depth)
        )

    def attention(self, x):  # [N, D, E], causal over D
        n, d, _ = x.shape
        q, k, v = (p(x).view(n, d, HEADS, E // HEADS).transpose(1, 2) for p in (self.q, self.k, self.v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(E // HEADS)
        scores = scores.masked_fill(torch.ones(d, d, dtype=torch.bool).triu(1), float("-inf"))
        return self.o((scores.softmax(-1) @ v).transpose(1, 2).reshape(n, d, E))

    def forward(self, x):
        a = x + self.attention(self.norm1(x))
        r = self.norm2(a)
        return r + torch.stack([mlp(r[:, i]) for i, mlp in enumerate(self.mlps)], dim=1)


class RefHead(nn.Module):
    def __init__(self, codebooks):
        super().__init__()
        self.codebooks = codebooks
        self.proj = nn.Sequential(nn.Linear(H, E), nn.GELU(), nn.Linear(E, E))
        self.code_embed = nn.Linear(C, E)
        self.layers = nn.ModuleList(RefLayer(len(SIZES)) for _ in range(LAYERS))
        self.norm = RefRMSNorm(E)
        self.classifiers = nn.ModuleList(nn.Linear(E, v) for v in SIZES)

    def forward(self, hidden, codes):  # [N, H], [N, D] -> list of [N, V_d]
        slots = [self.proj(hidden)]
        running = torch.zeros(hidden.shape[0], C)
        for d in range(1, len(SIZES)):
            running = running + self.codebooks[d - 1][codes[:, d - 1]]
            slots.append(self.code_embed(running))
        x = torch.stack(slots, dim=1)  # [N, D, E]
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        return [c(x[:, d]) for d, c in enumerate(self.classifiers)]


def _canonical(ref: RefHead, tp_padded) -> dict:
    """The reference weights under the project's canonical names (classifiers padded)."""
    out = {
        "proj.linear_fc1.weight": ref.proj[0].weight, "proj.linear_fc1.bias": ref.proj[0].bias,
        "proj.linear_fc2.weight": ref.proj[2].weight, "proj.linear_fc2.bias": ref.proj[2].bias,
        "code_embed.weight": ref.code_embed.weight, "code_embed.bias": ref.code_embed.bias,
        "final_norm.weight": ref.norm.weight,
    }
    for i, layer in enumerate(ref.layers):
        p = f"layers.{i}."
        out[p + "norm1.weight"], out[p + "norm2.weight"] = layer.norm1.weight, layer.norm2.weight
        for param in ("weight", "bias"):
            q, k, v = (getattr(getattr(layer, n), param) for n in "qkv")
            out[p + f"attention.linear_qkv.{param}"] = fuse_qkv(q, k, v, HEADS, HEADS)
            out[p + f"attention.linear_proj.{param}"] = getattr(layer.o, param)
        for d, mlp in enumerate(layer.mlps):
            out[p + f"mlps.{d}.linear_fc1.weight"] = mlp[0].weight
            out[p + f"mlps.{d}.linear_fc2.weight"] = mlp[2].weight
    for d, (c, padded) in enumerate(zip(ref.classifiers, tp_padded)):
        extra = padded - c.weight.shape[0]  # padding rows: random, must never matter
        out[f"classifiers.{d}.weight"] = torch.cat([c.weight, torch.randn(extra, E)])
        out[f"classifiers.{d}.bias"] = torch.cat([c.bias, torch.full((extra,), 5.0)])
    return {k: v.detach().clone() for k, v in out.items()}


def _project_head(tp, state, codebooks, hidden, codes, row_mask, checkpoint_dir):
    """Both forms of the depth MLPs (model/depth_mlps.py) loaded with ``state``; the per-depth form's dist
    checkpoint is then loaded into a fresh batched head, whose canonical state must equal it."""
    from megatron.core import dist_checkpointing

    from megatron_asvr import runtime
    from megatron_asvr.model.canonical import full_state, load_full_state
    from megatron_asvr.model.head import VisualHead, head_transformer_config
    from megatron_asvr.runtime.fast_paths import FastPaths, building

    parallel = ParallelConfig(tensor_parallel=tp)
    runtime.initialize(parallel)
    head_cfg = HeadConfig(hidden_size=E, num_layers=LAYERS, num_attention_heads=HEADS)
    config = head_transformer_config(head_cfg, parallel, "local")

    def build(batched):
        with building(FastPaths(batched_head_mlp=batched)):
            return VisualHead(head_cfg, CodebookSpec(SIZES, C), config, H, codebooks, "local")

    results = []
    for batched in (False, True):
        head = build(batched)
        load_full_state([head], state)
        logits = [depth.detach() for depth in head.logits(hidden, codes)]
        x = hidden.clone().requires_grad_(True)
        loss_sum, count, correct = head(x, codes, row_mask.nonzero().squeeze(1))
        loss_sum.sum().backward()
        grads = {"hidden": x.grad, "code_embed": head.code_embed.weight.grad}
        results.append((logits, (loss_sum.detach(), count, correct), grads))
    per_depth, batched = build(False), build(True)
    load_full_state([per_depth], state)
    dist_checkpointing.save(per_depth.sharded_state_dict(), checkpoint_dir)
    batched.load_state_dict(dist_checkpointing.load(batched.sharded_state_dict(), checkpoint_dir))
    expected, found = full_state([per_depth]), full_state([batched])
    results.append(sorted(expected) == sorted(found) and all(torch.equal(expected[k], found[k]) for k in expected))
    runtime.destroy()
    return results


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    codebooks = [torch.randn(v, C) for v in SIZES[:-1]]
    ref = RefHead(codebooks)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    hidden = torch.randn(N, H)
    codes = torch.stack([torch.randint(0, v, (N,)) for v in SIZES], dim=1)
    row_mask = torch.ones(N, dtype=torch.bool)
    row_mask[[2, 7]] = False
    return ref, codebooks, hidden, codes, row_mask


def test_head_matches_plain_pytorch_reference(reference, tmp_path):
    ref, codebooks, hidden, codes, row_mask = reference
    hidden_ref = hidden.clone().requires_grad_(True)
    expected = ref(hidden_ref, codes)
    ce = torch.stack([
        nn.functional.cross_entropy(expected[d][row_mask], codes[row_mask, d], reduction="sum")
        for d in range(len(SIZES))
    ])
    ce.sum().backward()
    correct = torch.stack([(expected[d].argmax(-1) == codes[:, d])[row_mask].sum() for d in range(len(SIZES))])
    for tp in (1, 2):
        state = _canonical(ref, [128] * 3)  # padded_vocab_size(v, tp) = 128 for these sizes
        (tmp_path / f"tp{tp}").mkdir()
        ranks = run_ranks(_project_head, tp, tp, state, codebooks, hidden, codes, row_mask,
                          str(tmp_path / f"tp{tp}"))
        assert all(rank.pop() for rank in ranks)  # the per-depth form's checkpoint loaded into the batched one
        for logits, (loss_sum, count, hits), grads in (form for rank in ranks for form in rank):
            for d in range(len(SIZES)):
                assert logits[d].shape == expected[d].shape
                assert (logits[d] - expected[d]).abs().max().item() <= LOGIT_TOL, (tp, d)
            assert torch.allclose(loss_sum, ce.detach(), atol=1e-4, rtol=1e-5), (tp, loss_sum, ce)
            assert count.tolist() == [N - 2] * 3
            assert torch.equal(hits, correct)
            assert (grads["hidden"] - hidden_ref.grad).abs().max().item() <= 1e-5
            assert (grads["code_embed"] - ref.code_embed.weight.grad).abs().max().item() <= 1e-5
