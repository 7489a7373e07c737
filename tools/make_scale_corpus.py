"""A synthetic LLaVA corpus of any size for the data path at scale (megatron_asvr/benchmark/scale_corpus.py):

    python tools/make_scale_corpus.py --records 2000000 --out /tmp/scale/corpus_2m

writes OUT/corpus.jsonl (JSON Lines, what tools/preprocess.py reads) and OUT/images/ (a pool of
small images the records refer to), then prints the records per component and the bytes on disk.
"""

import argparse
import time
from pathlib import Path

from megatron_asvr.benchmark.scale_corpus import write_scale_corpus


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pool-images", type=int, default=256, help="image files the records share")
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} is not empty")
    start = time.perf_counter()
    counts = write_scale_corpus(args.out, args.records, args.seed, args.pool_images)
    seconds = time.perf_counter() - start
    for component, n in counts.items():
        print(f"{component:<26} {n:>9}")
    images = sum(p.stat().st_size for p in (args.out / "images").rglob("*") if p.is_file())
    print(f"{args.records} records in {seconds:.1f} s: corpus.jsonl {(args.out / 'corpus.jsonl').stat().st_size} B, "
          f"images {images} B")


if __name__ == "__main__":
    main()
