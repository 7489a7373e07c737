"""LLaVA JSON + images -> validated, tokenized training shards and a JSON report.

Example (stage 2, LLaVA-1.5 665K mix):

    python tools/preprocess.py --data llava_v1_5_mix665k.json --image-root data/ \\
        --tokenizer checkpoints/vicuna-7b-v1.5 --template vicuna_v1 --output shards/665k

Records are counted per source: the name given as ``NAME=FILE``, else the top
folder of the first image (coco, gqa, ...), ``text`` for text-only records. Name
files whose images are not grouped by source folder (the 558K pretraining set:
``--data pretrain=blip_laion_cc_sbu_558k.json``).
"""

import argparse
import os
import sys
import time
from pathlib import Path
from typing import get_args

from megatron_asvr.config import ConfigError
from megatron_asvr.config.tools import PreprocessConfig, TooLong, ValidationConfig
from megatron_asvr.data.preprocess import PreprocessFailed, preprocess
from megatron_asvr.tokenizers.templates import TEMPLATES


def _input(spec: str) -> tuple[str | None, Path]:
    """``NAME=FILE`` (a name without "/") or ``FILE``."""
    name, sep, path = spec.partition("=")
    return (name, Path(path)) if sep and name and "/" not in name else (None, Path(spec))


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", required=True, type=_input, metavar="[NAME=]FILE",
                   help="LLaVA JSON or JSONL files, optionally with a source name")
    p.add_argument("--image-root", required=True, type=Path, help="image paths in the records are relative to it")
    p.add_argument("--tokenizer", required=True, type=Path,
                   help="tokenizer.model, tokenizer.json or a checkpoint directory")
    p.add_argument("--legacy", type=_bool, default=None,
                   help="HF LlamaTokenizer legacy flag (default: the directory's tokenizer_config.json, else true)")
    p.add_argument("--template", required=True, choices=sorted(TEMPLATES))
    p.add_argument("--output", required=True, type=Path, help="shard directory (must not hold a dataset)")
    p.add_argument("--max-seq-length", type=int, default=2048)
    p.add_argument("--image-tokens", type=int, default=729, help="visual positions per image")
    p.add_argument("--too-long", choices=get_args(TooLong), default="skip")
    p.add_argument("--strict", action="store_true", help="every skipped record is an error")
    p.add_argument("--max-skip-fraction", type=float, default=0.01, help="fail the run above this fraction")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--samples-per-shard", type=int, default=100_000)
    p.add_argument("--min-image-side", type=int, default=10)
    p.add_argument("--max-image-pixels", type=int, default=8192 * 8192)
    p.add_argument("--no-verify-images", dest="verify_images", action="store_false",
                   help="read image headers only instead of decoding every image")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        config = _config(args)
    except ConfigError as e:
        sys.exit(f"preprocess: error: {e}")
    start = time.perf_counter()
    try:
        report = preprocess(config)
    except PreprocessFailed as e:
        sys.exit(f"preprocess: error: {e}")
    seconds = time.perf_counter() - start
    print(
        f"preprocess: {report['written']} samples written ({report['written_with_fixes']} with fixes), "
        f"{report['skipped']} of {report['total_records']} records skipped, "
        f"{seconds:.1f} s ({report['total_records'] / seconds:.0f} records/s); output in {args.output}"
    )


def _config(args) -> PreprocessConfig:
    validation = ValidationConfig(
        image_root=args.image_root,
        max_seq_length=args.max_seq_length,
        image_tokens=args.image_tokens,
        too_long=args.too_long,
        strict=args.strict,
        min_image_side=args.min_image_side,
        max_image_pixels=args.max_image_pixels,
        verify_images=args.verify_images,
    )
    return PreprocessConfig(
        inputs=tuple(args.data),
        output_dir=args.output,
        tokenizer=args.tokenizer,
        template=args.template,
        validation=validation,
        legacy=args.legacy,
        max_skip_fraction=args.max_skip_fraction,
        workers=args.workers,
        samples_per_shard=args.samples_per_shard,
        progress=args.progress,
    )

if __name__ == "__main__":
    main()
