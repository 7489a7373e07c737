"""Step (a): the fused multi-depth cross-entropy's kernels against their plain-torch twins and the reference.

On GPU the CUDA extension, with --cpu the CPU extension, on random inputs: the kernels one by one
(row_stats, softmax_grad_) against megatron_asvr.kernels.torch_kernels on one chunk buffer, with a
tie; then the whole op against plain-torch kernels and the naive reference (loss, counts, top-1,
gradients; fp32 and bf16; a row mask, padded classifiers, unequal V_d), and run-to-run bitwise equality.
"""

from dataclasses import dataclass
from typing import List, Tuple

import torch

from megatron_asvr.kernels import multi_depth_cross_entropy, torch_kernels
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
    kernel_width: Tuple[int, int, int]  # one chunk buffer's depths; the last has no valid column
    tie: Tuple[int, int]  # two columns of depth 0 given the same, largest logit in row 0


GPU = Shapes((16384, 1000, 777, 4099, 16384, 2, 513, 16383), (16384, 1024, 784, 4100, 16384, 8, 520, 16384),
             rows=611, embed=256, chunk_rows=100, kernel_rows=37, kernel_width=(16384, 1000, 8), tie=(7, 9000))
CPU = Shapes((37, 50, 2, 29), (40, 56, 8, 32), rows=61, embed=16, chunk_rows=10, kernel_rows=9,
             kernel_width=(300, 50, 8), tie=(7, 200))


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
    """The extension's row_stats / softmax_grad_ against the plain-torch twins on one chunk buffer."""
    kernels, why_not = load_extension(kind)
    if kernels is None:
        checks.add(f"{kind} extension loads", False, why_not)
        return
    gen = torch.Generator(device=dev).manual_seed(1)
    rows, width = shapes.kernel_rows, list(shapes.kernel_width)
    valid = [width[0] - 1, width[1], 0]
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(rows * sum(width), device=dev, generator=gen).to(dtype)
        logits[: width[0]][list(shapes.tie)] = 50.0  # a tie in row 0 of depth 0
        targets = torch.stack(
            [torch.randint(-1, max(v, 1), (rows,), device=dev, generator=gen) for v in valid], dim=1
        )
        targets[:, 2] = -1
        got = kernels.row_stats(logits, targets, width, valid)
        want = torch_kernels.row_stats(logits, targets, width, valid)
        checks.add(f"row_stats arg-max {dtype}", torch.equal(got[3], want[3]) and int(got[3][0, 0]) == shapes.tie[0],
                   f"tie -> column {int(got[3][0, 0])}")
        for i, name in enumerate(("max", "sumexp", "target logit")):
            checks.close(f"row_stats {name} {dtype}", got[i], want[i], 1e-5)
        lse = want[0] + torch.log(want[1].clamp_min(1e-30))
        scale = torch.tensor([1.0, -0.5, 2.0], device=dev)
        got_buf, want_buf = logits.clone(), logits.clone()
        kernels.softmax_grad_(got_buf, targets, lse, scale, width, valid)
        torch_kernels.softmax_grad_(want_buf, targets, lse, scale, width, valid)
        checks.close(f"softmax_grad_ {dtype}", got_buf, want_buf, 1e-5 if dtype == torch.float32 else 1e-2)


def _inputs(shapes: Shapes, dtype: torch.dtype, dev: torch.device):
    gen = torch.Generator(device=dev).manual_seed(0)
    e = shapes.embed
    hidden = torch.randn(shapes.rows, len(shapes.vocab), e, device=dev, generator=gen).to(dtype).requires_grad_()
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
    """The whole op on the extension against plain-torch kernels and the naive reference (fp32 inputs)."""
    d = len(shapes.vocab)
    for dtype, rtol in TOLERANCE.items():
        inputs = _inputs(shapes, dtype, dev)
        fused = _op(multi_depth_cross_entropy, inputs, shapes.vocab, backend=kind, chunk_rows=shapes.chunk_rows)
        again = _op(multi_depth_cross_entropy, inputs, shapes.vocab, backend=kind, chunk_rows=shapes.chunk_rows)
        plain = _op(multi_depth_cross_entropy, inputs, shapes.vocab, backend="torch", chunk_rows=shapes.chunk_rows)
        f32 = [t.detach().float().requires_grad_() for t in (inputs[0], *inputs[1], *inputs[2])]
        naive = _op(naive_multi_depth_cross_entropy, (f32[0], f32[1 : 1 + d], f32[1 + d :], *inputs[3:]), shapes.vocab)
        checks.add(f"{dtype} run-to-run bitwise equal",
                   all(torch.equal(a, b) for a, b in zip((fused[0], *fused[3]), (again[0], *again[3]))))
        for ref_name, ref in (("plain torch", plain), ("naive", naive)):
            same_counts = torch.equal(fused[1], ref[1])
            hits = (fused[2] - ref[2]).abs().max().item()
            hits_allowed = 0 if dtype == torch.float32 else 2  # a near-tie may flip in bf16
            checks.add(f"{dtype} counts/top-1 vs {ref_name}", same_counts and hits <= hits_allowed,
                       f"counts equal {same_counts}, top-1 diff {hits}")
            checks.close(f"{dtype} loss vs {ref_name}", fused[0], ref[0], rtol)
            names = ["grad_hidden"] + [f"grad_W{i}" for i in range(d)] + [f"grad_b{i}" for i in range(d)]
            for name, got, want in zip(names, fused[3], ref[3]):
                checks.close(f"{dtype} {name} vs {ref_name}", got, want, rtol)


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
