"""GPU smoke check of the CUDA kernels of the fused multi-depth cross-entropy.

Run through tools/gpu_smoke_fused_ce.sh on a machine with a GPU (it builds the
extension in place first). Checks, on random inputs, the CUDA kernels against the
plain-torch twins (kernel by kernel) and the whole op against plain torch and the
naive reference (loss, counts, top-1, gradients; fp32 and bf16; masks, padding,
per-depth vocab sizes), plus run-to-run bitwise equality; then prints the
benchmark table on the GPU. Exits non-zero when a check fails.
"""

import argparse
import sys
from typing import List

import torch

from megatron_asvr.kernels import backend_report, multi_depth_cross_entropy, torch_kernels
from megatron_asvr.kernels.backends import load_extension
from megatron_asvr.kernels.benchmark import default_cases, format_table, run
from megatron_asvr.kernels.reference import naive_multi_depth_cross_entropy

VOCAB = [16384, 1000, 777, 4099, 16384, 2, 513, 16383]
PADDED = [16384, 1024, 784, 4100, 16384, 8, 520, 16384]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # relative to the largest magnitude


def _close(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float, failures: List[str]) -> None:
    err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    scale = max(want.double().abs().max().item() if want.numel() else 0.0, 1.0)
    ok = err <= rtol * scale
    print(f"  {'ok  ' if ok else 'FAIL'} {name}: max |diff| {err:.3e} (limit {rtol * scale:.3e})")
    if not ok:
        failures.append(name)


def _inputs(dtype: torch.dtype, rows: int = 611, embed: int = 256):
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(rows, len(VOCAB), embed, device="cuda", generator=gen).to(dtype).requires_grad_()
    weights = [
        (torch.randn(p, embed, device="cuda", generator=gen) * embed**-0.5).to(dtype).requires_grad_() for p in PADDED
    ]
    biases = [(torch.randn(p, device="cuda", generator=gen) * 0.1).to(dtype).requires_grad_() for p in PADDED]
    targets = torch.stack([torch.randint(0, v, (rows,), device="cuda", generator=gen) for v in VOCAB], dim=1)
    mask = torch.rand(rows, device="cuda", generator=gen) > 0.2
    return hidden, weights, biases, targets, mask


def _op(fn, inputs, **kwargs):
    hidden, weights, biases, targets, mask = inputs
    loss, count, correct = fn(hidden, weights, biases, targets, VOCAB, row_mask=mask, **kwargs)
    upstream = torch.linspace(0.5, 2.0, len(VOCAB), device="cuda")
    grads = torch.autograd.grad((loss * upstream).sum(), [hidden, *weights, *biases])
    return loss, count, correct, grads


def check_kernels(failures: List[str]) -> None:
    """CUDA row_stats / softmax_grad_ against the plain-torch twins on one chunk buffer."""
    cuda, why_not = load_extension("cuda")
    if cuda is None:
        failures.append(f"CUDA extension: {why_not}")
        print(f"  FAIL {why_not}")
        return
    gen = torch.Generator(device="cuda").manual_seed(1)
    rows, width, valid = 37, [16384, 1000, 8], [16383, 1000, 0]
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(rows * sum(width), device="cuda", generator=gen).to(dtype)
        logits[: width[0]][[7, 9000]] = 50.0  # a tie in row 0 of depth 0
        targets = torch.stack(
            [torch.randint(-1, w, (rows,), device="cuda", generator=gen) for w in (16383, 1000, 1)], dim=1
        )
        targets[:, 2] = -1
        got = cuda.row_stats(logits, targets, width, valid)
        want = torch_kernels.row_stats(logits, targets, width, valid)
        equal = torch.equal(got[3], want[3]) and int(got[3][0, 0]) == 7
        print(f"  {'ok  ' if equal else 'FAIL'} row_stats arg-max {dtype} (tie -> column {int(got[3][0, 0])})")
        if not equal:
            failures.append(f"row_stats arg-max {dtype}")
        for i, name in enumerate(("max", "sumexp", "target logit")):
            _close(f"row_stats {name} {dtype}", got[i], want[i], 1e-5, failures)
        lse = want[0] + torch.log(want[1].clamp_min(1e-30))
        scale = torch.tensor([1.0, -0.5, 2.0], device="cuda")
        got_buf, want_buf = logits.clone(), logits.clone()
        cuda.softmax_grad_(got_buf, targets, lse, scale, width, valid)
        torch_kernels.softmax_grad_(want_buf, targets, lse, scale, width, valid)
        _close(f"softmax_grad_ {dtype}", got_buf, want_buf, 1e-5 if dtype == torch.float32 else 1e-2, failures)


def check_op(failures: List[str]) -> None:
    """The whole op on CUDA kernels against plain-torch kernels and the naive reference."""
    for dtype, rtol in TOLERANCE.items():
        inputs = _inputs(dtype)
        fused = _op(multi_depth_cross_entropy, inputs, backend="cuda", chunk_rows=100)
        again = _op(multi_depth_cross_entropy, inputs, backend="cuda", chunk_rows=100)
        plain = _op(multi_depth_cross_entropy, inputs, backend="torch", chunk_rows=100)
        f32 = [t.detach().float().requires_grad_() for t in (inputs[0], *inputs[1], *inputs[2])]
        d = len(VOCAB)
        naive = _op(naive_multi_depth_cross_entropy, (f32[0], f32[1 : 1 + d], f32[1 + d :], *inputs[3:]))
        deterministic = all(torch.equal(a, b) for a, b in zip((fused[0], *fused[3]), (again[0], *again[3])))
        print(f"  {'ok  ' if deterministic else 'FAIL'} {dtype} run-to-run bitwise equal")
        if not deterministic:
            failures.append(f"{dtype} determinism")
        for ref_name, ref in (("plain torch", plain), ("naive", naive)):
            same_counts = torch.equal(fused[1], ref[1])
            hits = (fused[2] - ref[2]).abs().max().item()
            ok = same_counts and hits <= (0 if dtype == torch.float32 else 2)
            print(f"  {'ok  ' if ok else 'FAIL'} {dtype} vs {ref_name}: counts equal {same_counts}, top-1 diff {hits}")
            if not ok:
                failures.append(f"{dtype} counts/top-1 vs {ref_name}")
            _close(f"{dtype} loss vs {ref_name}", fused[0], ref[0], rtol, failures)
            names = ["grad_hidden"] + [f"grad_W{i}" for i in range(d)] + [f"grad_b{i}" for i in range(d)]
            for name, got, want in zip(names, fused[3], ref[3]):
                _close(f"{dtype} {name} vs {ref_name}", got, want, rtol, failures)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per benchmark case")
    parser.add_argument("--no-bench", action="store_true", help="checks only")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device visible", file=sys.stderr)
        return 2
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__} (CUDA {torch.version.cuda})")
    for name, origin in backend_report().items():
        print(f"backend {name}: {origin}")
    failures: List[str] = []
    print("kernels vs plain torch:")
    check_kernels(failures)
    print("op vs plain torch and naive:")
    check_op(failures)
    if not args.no_bench:
        tp = 2 if torch.cuda.device_count() >= 2 else 1
        if tp == 1:
            print("benchmark: TP=2 rows skipped (1 GPU visible)")
        cases = default_cases("cuda", ["naive", "torch", "cuda"], args.repeats, tp=tp)
        print(format_table(run(cases, threads=torch.get_num_threads())))
    print(f"gpu_smoke: {len(failures)} check(s) failed" + (": " + ", ".join(failures) if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
