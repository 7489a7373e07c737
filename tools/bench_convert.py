"""Measure the peak memory and time of HF import and export per layout (a markdown table).

    python tools/bench_convert.py --sizes small medium --layouts 1x1 2x1 1x2

See asvr_dev.bench_convert for what is measured.
"""

import argparse

from asvr_dev.bench_convert import SIZES, format_table, run


def _layout(text: str) -> tuple:
    tp, pp = text.lower().split("x")
    return int(tp), int(pp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["small"])
    parser.add_argument("--layouts", nargs="+", type=_layout, default=[(1, 1), (2, 1)], metavar="TPxPP")
    parser.add_argument("--shard-mib", type=int, default=64, help="safetensors shard size of the export")
    args = parser.parse_args()
    print(f"export shards: {args.shard_mib} MiB")
    print(format_table(run(args.sizes, args.layouts, args.shard_mib)))


if __name__ == "__main__":
    main()
