"""Run the frozen visual tokenizer over every image of LLaVA JSON files and write uint16 code targets.

Example (stage 2 targets from the released DualToken, images padded to square as in training):

    python tools/precompute_targets.py --data llava_v1_5_mix665k.json --image-root data/ \\
        --tokenizer-config model_zoo/dualtoken/config.json \\
        --tokenizer-checkpoint model_zoo/dualtoken/dualtoken.ckpt --mode pad --output targets/665k

An interrupted run resumes where it stopped: run the same command again. The
layout of the output directory is described in megatron_asvr/data/targets.py;
missing and undecodable images are listed by name in its coverage.json.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import get_args

from megatron_asvr import runtime
from megatron_asvr.config import ASVRConfig, ConfigError, ParallelConfig, TransformerImpl
from megatron_asvr.config.schema import Supervision
from megatron_asvr.config.tools import TargetsConfig
from megatron_asvr.data.images import MODES
from megatron_asvr.data.precompute_targets import TargetsFailed, precompute_targets


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", required=True, type=Path, help="LLaVA JSON or JSONL files")
    p.add_argument("--image-root", required=True, type=Path, help="image paths in the records are relative to it")
    p.add_argument("--tokenizer-config", required=True, type=Path, help="DualToken-format config.json")
    p.add_argument("--tokenizer-checkpoint", required=True, type=Path, help="its checkpoint ({'state_dict': ...})")
    p.add_argument("--output", required=True, type=Path, help="targets directory (resumed if it holds this run)")
    p.add_argument("--mode", choices=MODES, default="pad", help="image preprocessing of the training stage")
    p.add_argument("--supervision", choices=get_args(Supervision), default="semantic",
                   help="which branch's codes, as model.asvr.supervision (dual: both)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="bf16 reproduces the released codes")
    p.add_argument("--backend", choices=get_args(TransformerImpl), default="auto")
    p.add_argument("--batch-images", type=int, default=32)
    p.add_argument("--workers", type=int, default=4, help="image decoding processes")
    p.add_argument("--max-images", type=int, default=None, help="stop after this many images (resume later)")
    p.add_argument("--max-missing-fraction", type=float, default=0.01,
                   help="fail the run above this fraction of missing or undecodable images")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config = TargetsConfig(
            data=tuple(args.data), image_root=args.image_root, output_dir=args.output,
            tokenizer_config=args.tokenizer_config, tokenizer_checkpoint=args.tokenizer_checkpoint,
            mode=args.mode, branches=tuple(ASVRConfig(supervision=args.supervision).branches),
            precision=args.precision, backend=args.backend, batch_images=args.batch_images, workers=args.workers,
            max_images=args.max_images, max_missing_fraction=args.max_missing_fraction, progress=args.progress,
        )
    except ConfigError as err:
        print(f"precompute_targets: {err}", file=sys.stderr)
        return 1
    runtime.initialize(ParallelConfig())
    try:
        report = precompute_targets(config)
    except TargetsFailed as err:
        print(f"precompute_targets: {err}", file=sys.stderr)
        return 1
    finally:
        runtime.destroy()
    print(json.dumps({k: v for k, v in report.items() if not isinstance(v, list)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
