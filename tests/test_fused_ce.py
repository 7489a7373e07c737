"""Fused multi-depth cross-entropy (megatron_asvr.kernels) against the naive reference.

Single-process tests of both modes on the CPU extension and the plain-torch twin: fp32 and bf16,
masks and row indices, uneven chunks, per-depth vocab sizes with padding, ties, a non-uniform
grad_output per depth, the training integration (grad_scale, main_grad, an activation
checkpoint), bad input, determinism, and the design itself: the GEMMs each mode runs and their
shapes, recorded with torch.profiler. The TP=2 tests are in test_fused_ce_tp.py, the training
step in test_fused_ce_training.py.
"""

from collections import Counter

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.checkpoint import checkpoint

import megatron_asvr.kernels.multi_depth_ce as multi_depth_ce
from megatron_asvr.kernels import MODES, backend_report, default_mode, multi_depth_cross_entropy, select_kernels
from megatron_asvr.kernels import torch_kernels
from megatron_asvr.kernels.backends import load_extension
from megatron_asvr.kernels.reference import naive_multi_depth_cross_entropy

BACKENDS = ["cpu", "torch"]
VOCAB = [37, 50, 29]  # true V_d, deliberately odd and different per depth
PADDED = [40, 56, 29]  # classifier rows per depth (padding ids >= V_d)
UPSTREAM = [1.0, -0.5, 2.0]  # a distinct grad_output per depth
GEMMS = ("aten::mm", "aten::addmm", "aten::addmm_")


def make_inputs(seed, n=23, embed=12, dtype=torch.float32, vocab=VOCAB, padded=PADDED, bias=True):
    """hidden [D, N, E], weights and biases per depth, targets [N, D], a row mask [N]."""
    gen = torch.Generator().manual_seed(seed)
    depths = len(vocab)
    hidden = torch.randn(depths, n, embed, generator=gen).to(dtype).requires_grad_()
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
    grads = torch.autograd.grad((loss * torch.tensor(UPSTREAM)).sum(), params_of(hidden, weights, biases))
    return loss, count, correct, grads


def assert_grads_close(got, want, tol):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk_rows", [1, 5, 64])
def test_fp32_matches_naive_with_mask_padding_and_uneven_chunks(backend, mode, chunk_rows):
    inputs = make_inputs(seed=1)
    depth_weights = [1.0, 0.25, 3.0]
    loss, count, correct, grads = loss_and_grads(
        multi_depth_cross_entropy, *inputs, depth_weights, chunk_rows=chunk_rows, backend=backend, mode=mode
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
    assert_grads_close(grads, ref_grads, 1e-5)
    assert grads[0][:, ~mask].abs().max() == 0  # masked rows get no gradient
    for d, v in enumerate(VOCAB):  # padding classes get no gradient
        assert torch.count_nonzero(grads[1 + d][v:]) == 0
        assert torch.count_nonzero(grads[4 + d][v:]) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_bf16_matches_naive_within_2e_2(backend, mode):
    hidden, weights, biases, targets, mask = make_inputs(seed=2, dtype=torch.bfloat16)
    loss, _, correct, grads = loss_and_grads(
        multi_depth_cross_entropy, hidden, weights, biases, targets, mask, None, chunk_rows=4, backend=backend,
        mode=mode,
    )
    f32 = [t.detach().float().requires_grad_() for t in params_of(hidden, weights, biases)]
    ref_loss, _, ref_correct, ref_grads = loss_and_grads(
        naive_multi_depth_cross_entropy, f32[0], f32[1:4], f32[4:], targets, mask, None
    )
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=0)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.bfloat16
        assert (got.float() - want).abs().max() <= 2e-2 * want.abs().max()
    assert (correct - ref_correct).abs().max() <= 1  # a near-tie may flip in bf16


@pytest.mark.parametrize("mode", MODES)
def test_row_index_equals_row_mask_and_keeps_other_rows_at_zero(mode):
    hidden, weights, biases, targets, mask = make_inputs(seed=9)
    by_mask = loss_and_grads(multi_depth_cross_entropy, hidden, weights, biases, targets, mask, None, mode=mode,
                             chunk_rows=3)
    index = torch.nonzero(mask).squeeze(1)
    loss, count, correct = multi_depth_cross_entropy(hidden, weights, biases, targets, VOCAB, row_index=index,
                                                     mode=mode, chunk_rows=3)
    grads = torch.autograd.grad((loss * torch.tensor(UPSTREAM)).sum(), params_of(hidden, weights, biases))
    assert torch.equal(loss, by_mask[0]) and torch.equal(count, by_mask[1]) and torch.equal(correct, by_mask[2])
    for got, want in zip(grads, by_mask[3]):
        assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_no_bias_and_frozen_weights_give_only_hidden_grad(backend, mode):
    hidden, weights, _, targets, mask = make_inputs(seed=3, bias=False)
    frozen = [w.detach() for w in weights]
    loss, _, _ = multi_depth_cross_entropy(hidden, frozen, None, targets, VOCAB, row_mask=mask, backend=backend,
                                           mode=mode)
    (grad,) = torch.autograd.grad(loss.sum(), [hidden])
    ref_loss, _, _ = naive_multi_depth_cross_entropy(hidden, frozen, None, targets, VOCAB, row_mask=mask)
    (ref_grad,) = torch.autograd.grad(ref_loss.sum(), [hidden])
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_all_rows_masked_gives_zero_loss_and_zero_grads(mode):
    hidden, weights, biases, targets, _ = make_inputs(seed=4)
    mask = torch.zeros(hidden.shape[1], dtype=torch.bool)
    loss, count, correct = multi_depth_cross_entropy(hidden, weights, biases, targets, VOCAB, row_mask=mask,
                                                     mode=mode)
    grads = torch.autograd.grad(loss.sum(), params_of(hidden, weights, biases))
    assert loss.tolist() == [0.0, 0.0, 0.0]
    assert count.tolist() == [0, 0, 0] and correct.tolist() == [0, 0, 0]
    assert all(g.abs().max() == 0 for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_argmax_ties_break_to_lowest_id_and_skip_padding(backend, mode):
    # Zero hidden state: every logit equals its bias. Depth 0 ties ids 3 and 7; the
    # padding id 9 has the largest logit but is not a code of the 9-code vocabulary.
    hidden = torch.zeros(1, 2, 4)
    bias = torch.zeros(10)
    bias[[3, 7]] = 2.0
    bias[9] = 5.0
    targets = torch.tensor([[3], [3]])
    loss, _, correct = multi_depth_cross_entropy(
        hidden, [torch.zeros(10, 4)], [bias], targets, [9], backend=backend, mode=mode
    )
    assert correct.tolist() == [2]  # id 3 for both rows: not 7 (tie), not 9 (padding)
    expected = 2 * (torch.logsumexp(bias[:9], 0) - 2.0)
    torch.testing.assert_close(loss, expected.reshape(1), rtol=1e-6, atol=1e-6)


# -- the training integration -----------------------------------------------------------------


def test_grad_scale_makes_the_gradients_of_that_grad_output_and_checks_it():
    """grads_in_forward with grad_scale: the gradients of grad_output = grad_scale, made in the
    forward; backward with any other grad_output fails loudly (on CUDA: on the device, no host sync)."""
    inputs = make_inputs(seed=10)
    plain = loss_and_grads(multi_depth_cross_entropy, *inputs, None, mode="recompute")
    scale = torch.tensor(UPSTREAM)
    loss, _, _ = multi_depth_cross_entropy(*inputs[:4], VOCAB, row_mask=inputs[4], mode="grads_in_forward",
                                           grad_scale=scale)
    grads = torch.autograd.grad((loss * scale).sum(), params_of(*inputs[:3]))
    assert torch.equal(loss, plain[0])
    assert_grads_close(grads, plain[3], 1e-6)
    loss, _, _ = multi_depth_cross_entropy(*inputs[:4], VOCAB, row_mask=inputs[4], mode="grads_in_forward",
                                           grad_scale=scale)
    with pytest.raises(RuntimeError, match="differs from the grad_scale"):
        torch.autograd.grad((loss * scale * 2).sum(), params_of(*inputs[:3]))


def _with_main_grad(weights, biases):
    """Detached copies carrying megatron DDP's attributes: an fp32 main_grad and the flag."""
    params = [p.detach().clone().requires_grad_() for p in (*weights, *biases)]
    for p in params:
        p.main_grad = torch.full(p.shape, 0.5, dtype=torch.float32)  # accumulated onto, never overwritten
        p.grad_added_to_main_grad = False
    return params[: len(weights)], params[len(weights):]


@pytest.mark.parametrize("mode", MODES)
def test_main_grad_accumulates_the_classifier_gradients_over_micro_batches(mode):
    """Two micro-batches: main_grad gains the sum of their weight and bias gradients (the unfused
    path's .grad); backward returns megatron's dummy gradients with grad_added_to_main_grad set."""
    first, second = make_inputs(seed=11), make_inputs(seed=12)
    weights, biases = _with_main_grad(first[1], first[2])
    scale = torch.tensor(UPSTREAM)
    plain = [loss_and_grads(multi_depth_cross_entropy, inputs[0], weights, biases, *inputs[3:], None,
                            mode="recompute")[3] for inputs in (first, second)]
    expected = [0.5 + a + b for a, b in zip(plain[0][1:], plain[1][1:])]
    hidden_grads = []
    for inputs in (first, second):
        hidden = inputs[0].detach().requires_grad_()
        loss, _, _ = multi_depth_cross_entropy(hidden, weights, biases, inputs[3], VOCAB, row_mask=inputs[4],
                                               mode=mode, grad_scale=scale, main_grad=True, chunk_rows=4)
        returned = torch.autograd.grad((loss * scale).sum(), [hidden, *weights, *biases])
        hidden_grads.append(returned[0])
        assert all(g.shape == p.shape for g, p in zip(returned[1:], (*weights, *biases)))  # dummies
        assert all(p.grad_added_to_main_grad for p in (*weights, *biases))
    for p, want in zip((*weights, *biases), expected):
        torch.testing.assert_close(p.main_grad, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hidden_grads[1], plain[1][0], rtol=1e-6, atol=1e-6)


def test_main_grad_in_grads_in_forward_needs_grad_scale_and_main_grad_attributes():
    hidden, weights, biases, targets, _ = make_inputs(seed=13)
    with pytest.raises(ValueError, match="have no .main_grad"):
        multi_depth_cross_entropy(hidden, weights, biases, targets, VOCAB, main_grad=True, mode="recompute")
    weights, biases = _with_main_grad(weights, biases)
    with pytest.raises(ValueError, match="needs grad_scale"):
        multi_depth_cross_entropy(hidden, weights, biases, targets, VOCAB, main_grad=True, mode="grads_in_forward")


def test_an_activation_checkpoint_accumulates_main_grad_once():
    """megatron's full recompute (a reentrant checkpoint): the forward first runs without autograd,
    then again in backward; main_grad must gain the gradients once."""
    hidden, weights, biases, targets, mask = make_inputs(seed=14)
    plain = loss_and_grads(multi_depth_cross_entropy, hidden, weights, biases, targets, mask, None,
                           mode="recompute")[3]
    weights, biases = _with_main_grad(weights, biases)
    scale = torch.tensor(UPSTREAM)
    x = hidden.detach().requires_grad_()

    def head(h):
        return multi_depth_cross_entropy(h * 1.0, weights, biases, targets, VOCAB, row_mask=mask,
                                         mode="grads_in_forward", grad_scale=scale, main_grad=True)[0]

    loss = checkpoint(head, x, use_reentrant=True)
    (loss * scale).sum().backward()
    for p, want in zip((*weights, *biases), plain[1:]):
        torch.testing.assert_close(p.main_grad, 0.5 + want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, plain[0], rtol=1e-6, atol=1e-6)


def test_second_backward_of_grads_in_forward_raises_a_clear_error():
    hidden, weights, biases, targets, mask = make_inputs(seed=15)
    loss, _, _ = multi_depth_cross_entropy(hidden, weights, biases, targets, VOCAB, row_mask=mask,
                                           mode="grads_in_forward")
    loss.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice.*mode='recompute'"):
        loss.sum().backward()
    loss, _, _ = multi_depth_cross_entropy(hidden, weights, biases, targets, VOCAB, row_mask=mask, mode="recompute")
    first = torch.autograd.grad(loss.sum(), [hidden], retain_graph=True)[0]
    assert torch.equal(torch.autograd.grad(loss.sum(), [hidden])[0], first)  # recompute may backward twice


def test_default_mode_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("ASVR_CE_MODE", raising=False)
    assert default_mode(torch.device("cuda")) == "grads_in_forward"
    assert default_mode(torch.device("cpu")) == multi_depth_ce.DEFAULT_MODE
    monkeypatch.setenv("ASVR_CE_MODE", "recompute")
    assert default_mode(torch.device("cuda")) == "recompute"
    monkeypatch.setenv("ASVR_CE_MODE", "fast")
    with pytest.raises(ValueError, match="ASVR_CE_MODE='fast'"):
        default_mode(torch.device("cpu"))


# -- the design, checked on CPU ---------------------------------------------------------------


def _profiled(fn):
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, profile_memory=True) as prof:
        fn()
    return prof.events()


@pytest.mark.parametrize("mode,gemms", [("grads_in_forward", 3), ("recompute", 4)])
def test_each_mode_runs_its_gemms_per_depth_and_chunk_all_aligned(monkeypatch, mode, gemms):
    """Row chunks from the memory budget (a multiple of 64 rows), no column tiles: per depth and
    chunk 3 GEMMs (logits, grad_h, grad_W) with gradients in the forward, 4 with recompute; every
    GEMM dimension a multiple of 64 but the last chunk's rows."""
    depths, rows, embed, vocab = 2, 150, 128, 256
    monkeypatch.setattr(multi_depth_ce, "DEFAULT_CHUNK_BYTES", 64 * vocab * 4 + 100)  # 64 rows of fp32 logits
    gen = torch.Generator().manual_seed(16)
    hidden = torch.randn(depths, rows, embed, generator=gen).requires_grad_()
    weights = [torch.randn(vocab, embed, generator=gen).requires_grad_() for _ in range(depths)]
    biases = [torch.zeros(vocab).requires_grad_() for _ in range(depths)]
    targets = torch.randint(0, vocab, (rows, depths), generator=gen)

    def step():
        loss = multi_depth_cross_entropy(hidden, weights, biases, targets, [vocab] * depths, mode=mode)[0]
        loss.sum().backward()

    calls = [e for e in _profiled(step) if e.name in GEMMS]
    chunks = 3  # 64 + 64 + 22 rows
    assert len(calls) == gemms * depths * chunks, Counter(e.name for e in calls)
    for e in calls:
        dims = [n for shape in e.input_shapes for n in shape]
        assert all(n % 64 == 0 or n == rows % 64 for n in dims), (e.name, e.input_shapes)
    assert sum(any(rows % 64 in shape for shape in e.input_shapes) for e in calls) == gemms * depths  # last chunk


def test_a_forward_without_autograd_makes_no_gradients():
    """Under no_grad (evaluation, an activation checkpoint's first pass) grads_in_forward computes
    the statistics only: one GEMM per depth and chunk, no allocation the size of a gradient."""
    hidden, weights, biases, targets, mask = make_inputs(seed=17, n=200, embed=256)
    rows, chunk_rows = int(mask.sum()), 20
    chunks = -(-rows // chunk_rows)
    smallest_grad = min(p.numel() * p.element_size() for p in (hidden, *weights))
    assert chunk_rows * max(max(PADDED), 256) * 4 < smallest_grad  # the logits and rows buffers are smaller

    def forward():
        multi_depth_cross_entropy(hidden, weights, biases, targets, VOCAB, row_mask=mask, mode="grads_in_forward",
                                  chunk_rows=chunk_rows)

    with torch.no_grad():
        events = _profiled(forward)
    assert sum(e.name in GEMMS for e in events) == 3 * chunks
    assert max(e.cpu_memory_usage for e in events) < smallest_grad
    with_grad = _profiled(forward)
    assert sum(e.name in GEMMS for e in with_grad) == 3 * 3 * chunks
    assert max(e.cpu_memory_usage for e in with_grad) >= 3 * rows * 256 * 4  # grad_h of the rows


# -- kernels, determinism, errors -------------------------------------------------------------


def test_cpu_kernels_match_torch_kernels():
    cpu, _ = load_extension("cpu")
    gen = torch.Generator().manual_seed(5)
    rows, width = 6, 130
    for dtype in (torch.float32, torch.bfloat16):
        for valid in (width, 97, 0):  # all real codes; padding columns; a rank with only padding
            logits = torch.randn(rows, width, generator=gen).to(dtype)
            logits[:2, [5, 66]] = 9.0  # ties in rows 0 and 1
            targets = torch.tensor([5, -1, 96, 0, 129, -1]).clamp(max=max(valid - 1, -1))
            got = cpu.row_stats(logits, targets, valid)
            want = torch_kernels.row_stats(logits, targets, valid)
            assert torch.equal(got[3], want[3])
            if valid:
                assert got[3][:2].tolist() == [5, 5]
            else:
                assert got[3].tolist() == [-1] * rows and got[1].abs().max() == 0
            assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
            torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=0)

            lse = torch.randn(rows, generator=gen).abs() + 3
            scale = torch.tensor([-2.0])
            got_buf, want_buf = logits.clone(), logits.clone()
            cpu.softmax_grad_(got_buf, targets, lse, scale, valid)
            torch_kernels.softmax_grad_(want_buf, targets, lse, scale, valid)
            tol = 1e-6 if dtype == torch.float32 else 8e-3
            torch.testing.assert_close(got_buf.float(), want_buf.float(), rtol=tol, atol=tol)
            assert got_buf[:, valid:].abs().max() == 0 if valid < width else True

            got_buf, want_buf = logits.clone(), logits.clone()
            got = cpu.ce_rows_(got_buf, targets, valid, scale)
            want = torch_kernels.ce_rows_(want_buf, targets, valid, scale)
            assert torch.equal(got[2], want[2]) and torch.equal(got[1], want[1])
            torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(got_buf.float(), want_buf.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("mode", MODES)
def test_cpu_extension_is_deterministic_run_to_run(mode):
    inputs = make_inputs(seed=6, n=40)
    runs = [loss_and_grads(multi_depth_cross_entropy, *inputs, None, chunk_rows=7, backend="cpu", mode=mode)
            for _ in range(2)]
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
    with pytest.raises(ValueError, match="mode must be one of"):
        multi_depth_cross_entropy(hidden, weights, biases, targets, VOCAB, mode="fast")
    with pytest.raises(ValueError, match="grad_scale must have 3 entries"):
        multi_depth_cross_entropy(hidden, weights, biases, targets, VOCAB, grad_scale=torch.ones(2))


def test_dispatch_reports_its_backends():
    report = backend_report()
    assert report["torch"] == "plain torch"
    assert report["cpu"].endswith(".so")  # the CPU extension is always built
    assert select_kernels(torch.device("cpu")).name == "cpu"
    assert select_kernels(torch.device("cpu"), "torch").name == "torch"
    with pytest.raises(ValueError, match="cannot run tensors on device cpu"):
        select_kernels(torch.device("cpu"), "cuda")
