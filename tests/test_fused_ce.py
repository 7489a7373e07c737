"""Fused multi-depth cross-entropy (megatron_asvr.kernels) against the naive reference.

Single-process tests: the CPU extension and the plain-torch twin, fp32 and bf16,
masks, uneven chunks, per-depth vocab sizes with padding, ties, bad input and
determinism. The TP=2 tests are in test_fused_ce_tp.py.
"""

import pytest
import torch

from megatron_asvr.kernels import backend_report, multi_depth_cross_entropy, select_kernels
from megatron_asvr.kernels import torch_kernels
from megatron_asvr.kernels.backends import load_extension
from megatron_asvr.kernels.reference import naive_multi_depth_cross_entropy

BACKENDS = ["cpu", "torch"]
VOCAB = [37, 50, 29]  # true V_d, deliberately odd and different per depth
PADDED = [40, 56, 29]  # classifier rows per depth (padding ids >= V_d)


def make_inputs(seed, n=23, embed=12, dtype=torch.float32, vocab=VOCAB, padded=PADDED, bias=True):
    gen = torch.Generator().manual_seed(seed)
    depths = len(vocab)
    hidden = torch.randn(n, depths, embed, generator=gen).to(dtype).requires_grad_()
    weights = [(torch.randn(p, embed, generator=gen) * 0.6).to(dtype).requires_grad_() for p in padded]
    biases = [(torch.randn(p, generator=gen) * 0.3).to(dtype).requires_grad_() for p in padded] if bias else None
    targets = torch.stack([torch.randint(0, v, (n,), generator=gen) for v in vocab], dim=1)
    mask = torch.rand(n, generator=gen) > 0.3
    return hidden, weights, biases, targets, mask


def params_of(hidden, weights, biases):
    return [hidden, *weights, *(biases or [])]


def loss_and_grads(fn, hidden, weights, biases, targets, mask, depth_weights, **kwargs):
    loss, count, correct = fn(
        hidden, weights, biases, targets, VOCAB, row_mask=mask, depth_weights=depth_weights, **kwargs
    )
    upstream = torch.tensor([1.0, -0.5, 2.0])  # distinct dloss_d per depth
    grads = torch.autograd.grad((loss * upstream).sum(), params_of(hidden, weights, biases))
    return loss, count, correct, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_rows", [1, 5, 64])
def test_fp32_matches_naive_with_mask_padding_and_uneven_chunks(backend, chunk_rows):
    inputs = make_inputs(seed=1)
    depth_weights = [1.0, 0.25, 3.0]
    loss, count, correct, grads = loss_and_grads(
        multi_depth_cross_entropy, *inputs, depth_weights, chunk_rows=chunk_rows, backend=backend
    )
    ref_loss, ref_count, ref_correct, ref_grads = loss_and_grads(
        naive_multi_depth_cross_entropy, *inputs, depth_weights
    )
    mask = inputs[4]
    assert count.tolist() == [int(mask.sum())] * 3
    assert count.tolist() == ref_count.tolist()
    assert correct.tolist() == ref_correct.tolist()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert grads[0][~mask].abs().max() == 0  # masked rows get no gradient
    for d, v in enumerate(VOCAB):  # padding classes get no gradient
        assert torch.count_nonzero(grads[1 + d][v:]) == 0
        assert torch.count_nonzero(grads[4 + d][v:]) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_matches_naive_within_2e_2(backend):
    hidden, weights, biases, targets, mask = make_inputs(seed=2, dtype=torch.bfloat16)
    loss, _, correct, grads = loss_and_grads(
        multi_depth_cross_entropy, hidden, weights, biases, targets, mask, None, chunk_rows=4, backend=backend
    )
    f32 = [t.detach().float().requires_grad_() for t in params_of(hidden, weights, biases)]
    ref_loss, _, ref_correct, ref_grads = loss_and_grads(
        naive_multi_depth_cross_entropy, f32[0], f32[1:4], f32[4:], targets, mask, None
    )
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=0)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.bfloat16
        scale = want.abs().max()
        assert (got.float() - want).abs().max() <= 2e-2 * scale
    assert (correct - ref_correct).abs().max() <= 1  # a near-tie may flip in bf16


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_bias_and_frozen_weights_give_only_hidden_grad(backend):
    hidden, weights, _, targets, mask = make_inputs(seed=3, bias=False)
    frozen = [w.detach() for w in weights]
    loss, _, _ = multi_depth_cross_entropy(hidden, frozen, None, targets, VOCAB, row_mask=mask, backend=backend)
    (grad,) = torch.autograd.grad(loss.sum(), [hidden])
    ref_loss, _, _ = naive_multi_depth_cross_entropy(hidden, frozen, None, targets, VOCAB, row_mask=mask)
    (ref_grad,) = torch.autograd.grad(ref_loss.sum(), [hidden])
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_masked_gives_zero_loss_and_zero_grads(backend):
    hidden, weights, biases, targets, _ = make_inputs(seed=4)
    mask = torch.zeros(hidden.shape[0], dtype=torch.bool)
    loss, count, correct = multi_depth_cross_entropy(
        hidden, weights, biases, targets, VOCAB, row_mask=mask, backend=backend
    )
    grads = torch.autograd.grad(loss.sum(), params_of(hidden, weights, biases))
    assert loss.tolist() == [0.0, 0.0, 0.0]
    assert count.tolist() == [0, 0, 0] and correct.tolist() == [0, 0, 0]
    assert all(g.abs().max() == 0 for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_argmax_ties_break_to_lowest_id_and_skip_padding(backend):
    # Zero hidden state: every logit equals its bias. Depth 0 ties ids 3 and 7; the
    # padding id 9 has the largest logit but is not a code of the 9-code vocabulary.
    hidden = torch.zeros(2, 1, 4)
    bias = torch.zeros(10)
    bias[[3, 7]] = 2.0
    bias[9] = 5.0
    targets = torch.tensor([[3], [3]])
    loss, _, correct = multi_depth_cross_entropy(
        hidden, [torch.zeros(10, 4)], [bias], targets, [9], backend=backend
    )
    assert correct.tolist() == [2]  # id 3 for both rows: not 7 (tie), not 9 (padding)
    expected = 2 * (torch.logsumexp(bias[:9], 0) - 2.0)
    torch.testing.assert_close(loss, expected.reshape(1), rtol=1e-6, atol=1e-6)


def test_cpu_kernels_match_torch_kernels_bitwise_on_argmax_and_closely_on_stats():
    cpu, _ = load_extension("cpu")
    gen = torch.Generator().manual_seed(5)
    width, valid, rows = [70, 130, 64], [70, 97, 0], 6  # last depth: a rank with only padding
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(rows * sum(width), generator=gen).to(dtype)
        logits[: 2 * width[0]].view(2, width[0])[:, [5, 66]] = 9.0  # ties in depth 0's rows 0, 1
        targets = torch.tensor([[5, 96, -1], [-1, 0, -1], [69, 97, -1]] * 2)
        got = cpu.row_stats(logits, targets, width, valid)
        want = torch_kernels.row_stats(logits, targets, width, valid)
        assert torch.equal(got[3], want[3])
        assert got[3][:2, 0].tolist() == [5, 5] and got[3][:, 2].tolist() == [-1] * rows
        assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
        torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=0)
        assert got[2][1].tolist() == [0.0, float(logits[rows * 70 + 130].float()), 0.0]  # row 1, col 0

        lse = torch.randn(rows, 3, generator=gen).abs() + 3
        scale = torch.tensor([1.0, -2.0, 0.5])
        got_buf, want_buf = logits.clone(), logits.clone()
        cpu.softmax_grad_(got_buf, targets, lse, scale, width, valid)
        torch_kernels.softmax_grad_(want_buf, targets, lse, scale, width, valid)
        tol = 1e-6 if dtype == torch.float32 else 8e-3
        torch.testing.assert_close(got_buf.float(), want_buf.float(), rtol=tol, atol=tol)
        pad = got_buf[rows * width[0] : rows * (width[0] + width[1])].view(rows, width[1])[:, valid[1] :]
        assert pad.abs().max() == 0
        assert got_buf[rows * (width[0] + width[1]) :].abs().max() == 0  # depth 2: padding only


def test_cpu_extension_is_deterministic_run_to_run():
    inputs = make_inputs(seed=6, n=40)
    runs = [loss_and_grads(multi_depth_cross_entropy, *inputs, None, chunk_rows=7, backend="cpu") for _ in range(2)]
    for a, b in zip(runs[0], runs[1]):
        for x, y in zip(a if isinstance(a, tuple) else [a], b if isinstance(b, tuple) else [b]):
            assert torch.equal(x, y)


def test_bad_target_names_row_and_depth_and_masked_rows_may_hold_anything():
    hidden, weights, biases, targets, mask = make_inputs(seed=7)
    bad_row = int(torch.nonzero(mask)[2])
    targets[bad_row, 1] = VOCAB[1]  # first padding id: not a code
    with pytest.raises(ValueError, match=rf"targets\[{bad_row}, 1\] = {VOCAB[1]} is outside depth 1"):
        multi_depth_cross_entropy(hidden, weights, biases, targets, VOCAB, row_mask=mask)
    targets[bad_row, 1] = 0
    targets[~mask, 0] = -100  # ignored rows may carry an ignore label
    loss, _, _ = multi_depth_cross_entropy(hidden, weights, biases, targets, VOCAB, row_mask=mask)
    ref, _, _ = naive_multi_depth_cross_entropy(hidden, weights, biases, targets, VOCAB, row_mask=mask)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)


def test_shape_and_vocab_errors_are_clear():
    hidden, weights, biases, targets, _ = make_inputs(seed=8)
    with pytest.raises(ValueError, match=r"weights\[1\] must be \[V_local, 12\]"):
        multi_depth_cross_entropy(hidden, [weights[0], weights[1][:, :5], weights[2]], biases, targets, VOCAB)
    with pytest.raises(ValueError, match="depth 0: vocab size 41 does not fit 1 rank"):
        multi_depth_cross_entropy(hidden, weights, biases, targets, [41, 50, 29])
    with pytest.raises(ValueError, match="bfloat16"):
        multi_depth_cross_entropy(hidden.double(), weights, biases, targets, VOCAB)
    with pytest.raises(ValueError, match="backend must be one of"):
        multi_depth_cross_entropy(hidden, weights, biases, targets, VOCAB, backend="fast")


def test_dispatch_reports_its_backends():
    report = backend_report()
    assert report["torch"] == "plain torch"
    assert report["cpu"].endswith(".so")  # the CPU extension is always built
    assert select_kernels(torch.device("cpu")).name == "cpu"
    assert select_kernels(torch.device("cpu"), "torch").name == "torch"
    with pytest.raises(ValueError, match="cannot run tensors on device cpu"):
        select_kernels(torch.device("cpu"), "cuda")
