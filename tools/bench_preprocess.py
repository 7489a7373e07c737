"""Preprocessing throughput (records/s) on the synthetic demo corpus.

Renders the demo corpus (LLaVA-665K layout: multi-turn records, JPEG images,
a few text-only records) into a temporary directory, preprocesses its
instruct.json with vicuna_v1 for each worker count, with and without decoding
every image, and prints a table. Example:

    python tools/bench_preprocess.py --images 2000 --workers 1 2 \\
        --tokenizer ../shared/data/llama2_tokenizer.model
"""

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

from megatron_asvr.config.tools import PreprocessConfig, ValidationConfig
from megatron_asvr.data.preprocess import preprocess

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: demo/ is not installed
from demo.data import DemoConfig, make_demo_data  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="training images (= image records) to render")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokenizer", type=Path, help="default: the demo corpus's own tokenizer")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        make_demo_data(corpus, dataclasses.replace(DemoConfig(), train_images=args.images, eval_images=1))
        print("| workers | decode images | records | written | seconds | records/s |")
        print("|---|---|---|---|---|---|")
        for workers in args.workers:
            for verify in (True, False):
                out = Path(tmp) / f"out_{workers}_{verify}"
                config = PreprocessConfig(
                    inputs=((None, corpus / "instruct.json"),),
                    output_dir=out,
                    tokenizer=args.tokenizer or corpus,
                    template="vicuna_v1",
                    validation=ValidationConfig(image_root=corpus / "images", verify_images=verify),
                    workers=workers,
                    progress=False,
                )
                start = time.perf_counter()
                report = preprocess(config)
                seconds = time.perf_counter() - start
                total, written = report["total_records"], report["written"]
                print(f"| {workers} | {verify} | {total} | {written} | {seconds:.2f} | {total / seconds:.0f} |")


if __name__ == "__main__":
    main()
