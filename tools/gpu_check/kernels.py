"""Step (a): the fused multi-depth cross-entropy's kernels against their plain-torch twins and the reference.

On GPU the CUDA extension, with --cpu the CPU extension, on random inputs: the kernels one by one
(row_stats, softmax_grad_, ce_rows_) against megatron_asvr.kernels.torch_kernels on chunks of
several widths (16-byte loads and the one-element path; padding columns; a rank with only padding)
with a tie; then the whole op in both modes against plain-torch kernels and the naive reference
(loss, counts, top-1, gradients; fp32 and bf16; a row mask, padded classifiers, unequal V_d),
run-to-run bitwise equality, and training's path (grad_scale, the classifiers' gradients
accumulated into fp32 main_grad: on CUDA the bf16 x bf16 -> fp32 GEMM).
"""

from dataclasses import dataclass
from typing import List, Tuple

import torch

from megatron_asvr.kernels import MODES, multi_depth_cross_entropy, torch_kernels
from megatron_asvr.kernels.backends import load_extension
from megatron_asvr.kernels.reference import naive_multi_depth_cross_entropy
from tools.gpu_check.step_io import FAILED, OK, device, main

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # of the op, relative to the largest magnitude


@dataclass(frozen=True)
class Shapes:
    vocab: Tuple[int, ...]  # V_d per depth, unequal
    padded: Tuple[int, ...]  # classifier rows per depth (ids >= V_d are padding)
    rows: int
    embed: int
    chunk_rows: int
    kernel_rows: int
    kernel_chunks: Tuple[Tuple[int, int], ...]  # (width, valid) of single chunks for the kernels
    tie: Tuple[int, int]  # two columns given the same, largest logit in row 0


# Widths: 16384 and 4100 fp32 take 16-byte loads, 4100 and 520 bf16 the one-element path.
GPU = Shapes((16384, 1000, 777, 4099, 16384, 2, 513, 16383), (16384, 1024, 784, 4100, 16384, 8, 520, 16384),
             rows=611, embed=256, chunk_rows=100, kernel_rows=37,
             kernel_chunks=((16384, 16384), (16384, 16383), (4100, 4099), (520, 513), (8, 0)), tie=(7, 300))
CPU = Shapes((37, 50, 2, 29), (40, 56, 8, 32), rows=61, embed=16, chunk_rows=10, kernel_rows=9,
             kernel_chunks=((300, 300), (300, 297), (50, 50), (8, 0)), tie=(7, 200))


class Checks:
    """Named pass/fail records."""

    def __init__(self):
        self.records: List[dict] = []

    def add(self, name: str, ok: bool, detail: str = "") -> None:
        self.records.append({"name": name, "ok": bool(ok), "detail": detail})
        print(f"  {'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)

    def close(self, name: str, got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
        """|got - want| <= rtol x max(1, largest finite |want|); equal infinities agree, a NaN never does."""
        got, want = got.double(), want.double()
        diff = torch.where(got == want, 0.0, (got - want).abs())
        err = diff.max().item() if diff.numel() else 0.0
        finite = want[torch.isfinite(want)]
        scale = max(finite.abs().max().item() if finite.numel() else 0.0, 1.0)
        self.add(name, err <= rtol * scale, f"max |diff| {err:.3e} (limit {rtol * scale:.3e})")


def check_kernels(checks: Checks, kind: str, shapes: Shapes, dev: torch.device) -> None:
    """The extension's row_stats / softmax_grad_ / ce_rows_ against the plain-torch twins on single chunks."""
    kernels, why_not = load_extension(kind)
    if kernels is None:
        checks.add(f"{kind} extension loads", False, why_not)
        return
    gen = torch.Generator(device=dev).manual_seed(1)
    rows, scale = shapes.kernel_rows, torch.tensor([-0.5], device=dev)
    for dtype in (torch.float32, torch.bfloat16):
        for width, valid in shapes.kernel_chunks:
            name = f"{dtype} [{rows}, {width}] valid {valid}"
            logits = torch.randn(rows, width, device=dev, generator=gen).to(dtype)
            tie = shapes.tie[1] < valid
            if tie:
                logits[0, list(shapes.tie)] = 50.0  # a tie in row 0
            targets = torch.randint(-1, max(valid, 1), (rows,), device=dev, generator=gen)
            got = kernels.row_stats(logits, targets, valid)
            want = torch_kernels.row_stats(logits, targets, valid)
            first = int(got[3][0])
            expected = shapes.tie[0] if tie else int(want[3][0])  # -1 without valid columns
            checks.add(f"row_stats arg-max {name}", torch.equal(got[3], want[3]) and first == expected,
                       f"row 0 -> column {first}")
            for i, stat in enumerate(("max", "sumexp", "target logit")):
                checks.close(f"row_stats {stat} {name}", got[i], want[i], 1e-5)
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            lse = want[0] + torch.log(want[1].clamp_min(1e-30))
            got_buf, want_buf = logits.clone(), logits.clone()
            kernels.softmax_grad_(got_buf, targets, lse, scale, valid)
            torch_kernels.softmax_grad_(want_buf, targets, lse, scale, valid)
            checks.close(f"softmax_grad_ {name}", got_buf, want_buf, tol)
            got_buf, want_buf = logits.clone(), logits.clone()
            got = kernels.ce_rows_(got_buf, targets, valid, scale)
            want = torch_kernels.ce_rows_(want_buf, targets, valid, scale)
            checks.add(f"ce_rows_ arg-max {name}", torch.equal(got[2], want[2]))
            checks.close(f"ce_rows_ lse {name}", got[0], want[0], 1e-5)
            checks.close(f"ce_rows_ target logit {name}", got[1], want[1], 1e-5)
            checks.close(f"ce_rows_ gradient {name}", got_buf, want_buf, tol)


def _inputs(shapes: Shapes, dtype: torch.dtype, dev: torch.device):
    gen = torch.Generator(device=dev).manual_seed(0)
    e = shapes.embed
    hidden = torch.randn(len(shapes.vocab), shapes.rows, e, device=dev, generator=gen).to(dtype).requires_grad_()
    weights = [(torch.randn(p, e, device=dev, generator=gen) * e**-0.5).to(dtype).requires_grad_()
               for p in shapes.padded]
    biases = [(torch.randn(p, device=dev, generator=gen) * 0.1).to(dtype).requires_grad_() for p in shapes.padded]
    targets = torch.stack([torch.randint(0, v, (shapes.rows,), device=dev, generator=gen) for v in shapes.vocab], 1)
    mask = torch.rand(shapes.rows, device=dev, generator=gen) > 0.2
    return hidden, weights, biases, targets, mask


def _op(fn, inputs, vocab, **kwargs):
    """(loss [D], count [D], correct [D], gradients of hidden, weights, biases) under distinct dloss_d."""
    hidden, weights, biases, targets, mask = inputs
    loss, count, correct = fn(hidden, weights, biases, targets, list(vocab), row_mask=mask, **kwargs)
    upstream = torch.linspace(0.5, 2.0, len(vocab), device=hidden.device)
    grads = torch.autograd.grad((loss * upstream).sum(), [hidden, *weights, *biases])
    return loss, count, correct, grads


def check_op(checks: Checks, kind: str, shapes: Shapes, dev: torch.device) -> None:
    """The whole op on the extension, both modes, against plain-torch kernels and the naive reference
    (on fp32 copies of the inputs)."""
    d = len(shapes.vocab)
    for dtype, rtol in TOLERANCE.items():
        inputs = _inputs(shapes, dtype, dev)
        f32 = [t.detach().float().requires_grad_() for t in (inputs[0], *inputs[1], *inputs[2])]
        naive = _op(naive_multi_depth_cross_entropy, (f32[0], f32[1 : 1 + d], f32[1 + d :], *inputs[3:]), shapes.vocab)
        for mode in MODES:
            run = dict(backend=kind, chunk_rows=shapes.chunk_rows, mode=mode)
            fused = _op(multi_depth_cross_entropy, inputs, shapes.vocab, **run)
            again = _op(multi_depth_cross_entropy, inputs, shapes.vocab, **run)
            plain = _op(multi_depth_cross_entropy, inputs, shapes.vocab, **dict(run, backend="torch"))
            checks.add(f"{dtype} {mode} run-to-run bitwise equal",
                       all(torch.equal(a, b) for a, b in zip((fused[0], *fused[3]), (again[0], *again[3]))))
            for ref_name, ref in (("plain torch", plain), ("naive", naive)):
                same_counts = torch.equal(fused[1], ref[1])
                hits = (fused[2] - ref[2]).abs().max().item()
                hits_allowed = 0 if dtype == torch.float32 else 2  # a near-tie may flip in bf16
                checks.add(f"{dtype} {mode} counts/top-1 vs {ref_name}", same_counts and hits <= hits_allowed,
                           f"counts equal {same_counts}, top-1 diff {hits}")
                checks.close(f"{dtype} {mode} loss vs {ref_name}", fused[0], ref[0], rtol)
                names = ["grad_hidden"] + [f"grad_W{i}" for i in range(d)] + [f"grad_b{i}" for i in range(d)]
                for name, got, want in zip(names, fused[3], ref[3]):
                    checks.close(f"{dtype} {mode} {name} vs {ref_name}", got, want, rtol)
        check_main_grad(checks, kind, shapes, inputs, naive, rtol)


def check_main_grad(checks: Checks, kind: str, shapes: Shapes, inputs, naive, rtol: float) -> None:
    """Training's path: grad_scale known, weight and bias gradients accumulated into fp32 main_grad."""
    hidden, weights, biases, targets, mask = inputs
    d = len(shapes.vocab)
    params = [p.detach().clone().requires_grad_() for p in (*weights, *biases)]
    for p in params:
        p.main_grad = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
    scale = torch.linspace(0.5, 2.0, d, device=hidden.device)  # _op's upstream
    for mode in MODES:
        for p in params:
            p.main_grad.zero_()
        loss, _, _ = multi_depth_cross_entropy(hidden, params[:d], params[d:], targets, list(shapes.vocab),
                                               row_mask=mask, backend=kind, chunk_rows=shapes.chunk_rows, mode=mode,
                                               grad_scale=scale, main_grad=True)
        (grad_hidden,) = torch.autograd.grad((loss * scale).sum(), [hidden])
        checks.close(f"{hidden.dtype} {mode} main_grad: grad_hidden vs naive", grad_hidden, naive[3][0], rtol)
        for i, p in enumerate(params):
            checks.close(f"{hidden.dtype} {mode} main_grad {i} vs naive", p.main_grad, naive[3][1 + i], rtol)


def run(args) -> dict:
    dev = device(args.cpu)
    kind, shapes = ("cpu", CPU) if args.cpu else ("cuda", GPU)
    checks = Checks()
    print(f"{kind} kernels vs plain torch:")
    check_kernels(checks, kind, shapes, dev)
    print(f"{kind} op vs plain torch and naive:")
    check_op(checks, kind, shapes, dev)
    failed = [r["name"] for r in checks.records if not r["ok"]]
    summary = f"{len(checks.records) - len(failed)}/{len(checks.records)} checks passed ({kind} extension)"
    if failed:
        summary += "; failed: " + ", ".join(failed[:4]) + (" ..." if len(failed) > 4 else "")
    return {"status": FAILED if failed else OK, "summary": summary, "checks": checks.records}


if __name__ == "__main__":
    main(run, __doc__)
