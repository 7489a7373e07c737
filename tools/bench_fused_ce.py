"""Benchmark the fused multi-depth cross-entropy on CPU against naive, side by side at TP = 1 and 2.

    python tools/bench_fused_ce.py                       # issue 22's CPU acceptance shape, TP 1 and 2
    python tools/bench_fused_ce.py --embed 2048 4096 --tp 1

Each case runs in fresh processes (one per TP rank) so that its memory figures are its own; the
machinery, methods and the three memory figures are tools/gpu_check/fused_ce.py's (the GPU check's
step (c) runs the same benchmark on CUDA, with Liger and Cut Cross-Entropy). Prints the load
average before and after (other processes sharing the cores make times noisy) and a markdown table.
"""

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tools.gpu_check
from megatron_asvr.kernels import backend_report  # noqa: E402
from tools.gpu_check.fused_ce import METHODS, Case, format_table, run_cases  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=4, metavar=("N", "D", "V", "E"), default=[1458, 8, 16384, 2048])
    parser.add_argument("--embed", type=int, nargs="+", help="E values to run (default: the shape's)")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="tensor-parallel sizes")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS),
                        default=["naive", "ours", "ours-main-grad", "ours-recompute"])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (median)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op threads in all")
    args = parser.parse_args()

    n, d, v, e = args.shape
    cases = [Case(method, n, d, v, embed, tp=tp, dtype=args.dtype, repeats=args.repeats)
             for embed in args.embed or [e] for tp in args.tp for method in args.methods]
    for name, origin in backend_report().items():
        print(f"backend {name}: {origin}")
    print(f"{args.threads} threads; load average {os.getloadavg()[0]:.2f} (1 min) before")
    print("methods: " + "; ".join(f"{m} = {METHODS[m]}" for m in args.methods), flush=True)
    rows = run_cases(cases, isolated=True, threads=args.threads, echo=lambda line: print(line, flush=True))
    print(f"load average {os.getloadavg()[0]:.2f} (1 min) after\n")
    print(format_table(rows))


if __name__ == "__main__":
    main()
