"""Fused multi-depth cross-entropy at TP=2 on 2 gloo ranks against the single-process naive op.

Each rank holds a contiguous half of every (padded) classifier; losses, counts, top-1 counts and
grad_hidden must be the full values on both ranks, and the weight/bias gradients of the two halves
must put together the naive gradients, in both modes (grads_in_forward: one all-gather of row
statistics per chunk; recompute) and with the gradients accumulated into main_grad.
"""

import pytest
import torch

from tests.support.multirank import run_ranks
from megatron_asvr.kernels import MODES, multi_depth_cross_entropy
from megatron_asvr.kernels.reference import naive_multi_depth_cross_entropy

VOCAB = [37, 50, 29]
PADDED = [40, 56, 30]  # divisible by TP=2; rank 1 holds the padding ids >= V_d
UPSTREAM = [1.0, -0.5, 2.0]  # dloss_d
DEPTH_WEIGHTS = [1.0, 0.25, 3.0]


def make_inputs(scenario: str, dtype=torch.float32):
    """Full (unsharded) inputs: "random" targets, or targets "in_rank0" slice only."""
    gen = torch.Generator().manual_seed(11)
    n, embed = 21, 10
    hidden = torch.randn(len(VOCAB), n, embed, generator=gen).to(dtype)
    weights = [(torch.randn(p, embed, generator=gen) * 0.6).to(dtype) for p in PADDED]
    biases = [(torch.randn(p, generator=gen) * 0.3).to(dtype) for p in PADDED]
    high = VOCAB if scenario == "random" else [p // 2 for p in PADDED]
    targets = torch.stack([torch.randint(0, v, (n,), generator=gen) for v in high], dim=1)
    mask = torch.rand(n, generator=gen) > 0.25
    mask[0] = ~mask[0]  # 13 counted rows: grads_in_forward's row shards at TP 2 take a padding row
    return hidden, weights, biases, targets, mask


def tie_inputs():
    """Zero hidden states, so logits are the biases: ids 5 (rank 0) and 25 (rank 1) tie
    for the maximum; id 39 (padding of a 39-code vocabulary) is larger than both."""
    hidden = torch.zeros(1, 2, 4)
    bias = torch.zeros(40)
    bias[[5, 25]] = 3.0
    bias[39] = 9.0
    targets = torch.tensor([[5], [5]])
    return hidden, [torch.zeros(40, 4)], [bias], targets


def _rank_fn(backend: str):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, group = dist.get_rank(), dist.group.WORLD
    out = {}
    for mode in MODES:
        for name, dtype in (("random", torch.float32), ("in_rank0", torch.float32), ("random_bf16", torch.bfloat16)):
            hidden, weights, biases, targets, mask = make_inputs(name.replace("_bf16", ""), dtype)
            hidden.requires_grad_()
            local_w = [w.chunk(2)[rank].clone().requires_grad_() for w in weights]
            local_b = [b.chunk(2)[rank].clone().requires_grad_() for b in biases]
            loss, count, correct = multi_depth_cross_entropy(
                hidden, local_w, local_b, targets, VOCAB, row_mask=mask, depth_weights=DEPTH_WEIGHTS,
                group=group, chunk_rows=4, backend=backend, mode=mode,
            )
            held = getattr(loss.grad_fn, "grads", None)  # the autograd node's gradients of grads_in_forward
            if held is not None:
                out[mode, name, "held"] = (held.rows, tuple(held.shard.shape))
            grads = torch.autograd.grad((loss * torch.tensor(UPSTREAM)).sum(), [hidden, *local_w, *local_b])
            out[mode, name] = (loss, count, correct, grads)
        hidden, weights, biases, targets = tie_inputs()
        _, _, correct = multi_depth_cross_entropy(
            hidden, [weights[0].chunk(2)[rank]], [biases[0].chunk(2)[rank]], targets, [39], group=group,
            backend=backend, mode=mode,
        )
        out[mode, "ties"] = correct
        out[mode, "main_grad"] = _main_grad(rank, group, backend, mode)
    return out


def _main_grad(rank, group, backend, mode):
    """Training's path at TP=2: grad_scale known, the classifier gradients accumulated into main_grad."""
    hidden, weights, biases, targets, mask = make_inputs("random")
    hidden.requires_grad_()
    params = [p.chunk(2)[rank].clone().requires_grad_() for p in (*weights, *biases)]
    for p in params:
        p.main_grad = torch.zeros(p.shape)
    scale = torch.tensor(UPSTREAM)
    loss, _, _ = multi_depth_cross_entropy(
        hidden, params[:3], params[3:], targets, VOCAB, row_index=torch.nonzero(mask).squeeze(1),
        depth_weights=DEPTH_WEIGHTS, group=group, chunk_rows=4, backend=backend, mode=mode, grad_scale=scale,
        main_grad=True,
    )
    (grad_hidden,) = torch.autograd.grad((loss * scale).sum(), [hidden], allow_unused=True)
    return loss, (grad_hidden, *[p.main_grad for p in params])


def _naive(name: str):
    dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32
    hidden, weights, biases, targets, mask = make_inputs(name.replace("_bf16", ""), dtype)
    params = [t.float().requires_grad_() for t in (hidden, *weights, *biases)]
    loss, count, correct = naive_multi_depth_cross_entropy(
        params[0], params[1:4], params[4:], targets, VOCAB, row_mask=mask, depth_weights=DEPTH_WEIGHTS
    )
    grads = torch.autograd.grad((loss * torch.tensor(UPSTREAM)).sum(), params)
    return loss, count, correct, grads


@pytest.fixture(scope="module", params=["cpu", "torch"])
def tp_results(request):
    return run_ranks(_rank_fn, 2, request.param, timeout=240)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["random", "in_rank0"])
def test_tp2_fp32_matches_naive(tp_results, mode, name):
    ref_loss, ref_count, ref_correct, ref_grads = _naive(name)
    for rank_out in tp_results:
        loss, count, correct, grads = rank_out[mode, name]
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
        assert count.tolist() == ref_count.tolist()
        assert correct.tolist() == ref_correct.tolist()
        torch.testing.assert_close(grads[0], ref_grads[0], rtol=1e-5, atol=1e-5)  # full grad_hidden
    for i in range(1, 7):  # the two halves make up the naive weight and bias gradients
        halves = torch.cat([tp_results[0][mode, name][3][i], tp_results[1][mode, name][3][i]])
        torch.testing.assert_close(halves, ref_grads[i], rtol=1e-5, atol=1e-5)
    assert torch.equal(tp_results[0][mode, name][3][0], tp_results[1][mode, name][3][0])
    assert torch.equal(tp_results[0][mode, name][0], tp_results[1][mode, name][0])


def test_tp2_grads_in_forward_holds_a_row_shard_of_grad_h(tp_results):
    """Between forward and backward each rank holds its half of the counted rows' grad_h ([D, M / 2, E],
    an odd M padded by a row), not [D, M, E]: the backward's all-gather puts them together (checked above)."""
    for rank_out in tp_results:
        for name in ("random", "in_rank0", "random_bf16"):
            rows = int(make_inputs(name.replace("_bf16", ""))[4].sum())
            assert rows == 13 and rank_out["grads_in_forward", name, "held"] == (None, (len(VOCAB), 7, 10))
        assert ("recompute", "random", "held") not in rank_out


@pytest.mark.parametrize("mode", MODES)
def test_tp2_main_grad_accumulation_matches_naive(tp_results, mode):
    ref_loss, _, _, ref_grads = _naive("random")
    for rank_out in tp_results:
        loss, grads = rank_out[mode, "main_grad"]
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grads[0], ref_grads[0], rtol=1e-5, atol=1e-5)
    for i in range(1, 7):
        halves = torch.cat([tp_results[0][mode, "main_grad"][1][i], tp_results[1][mode, "main_grad"][1][i]])
        torch.testing.assert_close(halves, ref_grads[i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_tp2_rank_owning_no_target_gets_softmax_only_bias_grads(tp_results, mode):
    # Rank 1 owns no target: its bias gradient is sum(softmax) * dloss_d * weight_d, no -1 term,
    # so it has that sign everywhere on real codes and is 0 on padding.
    _, _, _, targets, _ = make_inputs("in_rank0")
    assert bool((targets < torch.tensor(PADDED) // 2).all())
    for d, grad in enumerate(tp_results[1][mode, "in_rank0"][3][4:7]):
        sign = 1.0 if UPSTREAM[d] * DEPTH_WEIGHTS[d] > 0 else -1.0
        valid = VOCAB[d] - PADDED[d] // 2
        assert bool((grad[:valid] * sign > 0).all())
        assert torch.count_nonzero(grad[valid:]) == 0


@pytest.mark.parametrize("mode", MODES)
def test_tp2_bf16_matches_naive_within_2e_2(tp_results, mode):
    ref_loss, _, _, ref_grads = _naive("random_bf16")
    for rank_out in tp_results:
        loss, _, _, grads = rank_out[mode, "random_bf16"]
        torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=0)
        assert (grads[0].float() - ref_grads[0]).abs().max() <= 2e-2 * ref_grads[0].abs().max()
    for i in range(1, 7):
        halves = torch.cat([tp_results[0][mode, "random_bf16"][3][i], tp_results[1][mode, "random_bf16"][3][i]]).float()
        assert (halves - ref_grads[i]).abs().max() <= 2e-2 * ref_grads[i].abs().max()


@pytest.mark.parametrize("mode", MODES)
def test_tp2_argmax_ties_across_ranks_go_to_lowest_global_id(tp_results, mode):
    # Both rows predict 5 (hits); breaking the tie to 25 or taking padding id 39 would give 0.
    assert [r[mode, "ties"].tolist() for r in tp_results] == [[2], [2]]
