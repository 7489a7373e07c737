"""Benchmark the fused multi-depth cross-entropy against naive and chunked plain torch.

Prints a markdown table: peak memory (measured per case in a fresh process) and
forward + backward time (median) for N in {729, 1458}, D=8, V=16384, E in {512,
2048}, plus TP=2 rows at N=1458, E=2048. See asvr_dev/bench_fused_ce.py.
"""

import argparse

import torch

from asvr_dev.bench_fused_ce import METHODS, Case, default_cases, format_table, run
from megatron_asvr.kernels import backend_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), help="default: naive torch <device>")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (median)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op threads in all")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--shape", type=int, nargs=4, metavar=("N", "D", "V", "E"), help="one shape only")
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel size of the TP rows (1: none)")
    args = parser.parse_args()

    methods = args.methods or ["naive", "torch", args.device]
    if args.shape:
        n, d, v, e = args.shape
        cases = [Case(m, n, d, v, e, args.tp, args.dtype, args.device, args.repeats) for m in methods]
    else:
        cases = default_cases(args.device, methods, args.repeats, tp=args.tp, dtype=args.dtype)
    for name, origin in backend_report().items():
        print(f"backend {name}: {origin}")
    print(f"{args.threads} threads; methods: " + "; ".join(f"{m} = {METHODS[m]}" for m in methods))
    print(format_table(run(cases, args.threads)))


if __name__ == "__main__":
    main()
