"""Fit a visual tokenizer for a SigLIP encoder by residual k-means; writes DualToken's config + checkpoint.

Example (SigLIP-SO400M, semantic codes of block 26 of 27 as DualToken, appearance of block 6):

    python tools/fit_visual_tokenizer.py --images data/coco/train2017 --max-images 20000 \\
        --encoder checkpoints/siglip-so400m-patch14-384 --output tokenizers/fitted \\
        --depth 8 --codebook-size 16384

The output loads wherever the released DualToken does (tools/precompute_targets.py
--tokenizer-config OUT/config.json --tokenizer-checkpoint OUT/tokenizer.ckpt). The
method is described in megatron_asvr/tokenizers/visual_fit.py; the relative
reconstruction error and code-usage perplexity per depth are printed and kept in
OUT/fit_report.json.
"""

import argparse
import sys
from pathlib import Path
from typing import get_args

from megatron_asvr import runtime
from megatron_asvr.config import ConfigError, ParallelConfig, TransformerImpl
from megatron_asvr.data.images import MODES, image_batches
from megatron_asvr.config.tools import FitConfig
from megatron_asvr.tokenizers.visual_fit import fit_visual_tokenizer, report_table
from megatron_asvr.tokenizers.visual_format import TokenizerFileError


def parse_args(argv=None) -> argparse.Namespace:
    defaults = FitConfig(images=Path(), encoder=Path(), output_dir=Path())
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, type=Path, help="directory searched recursively for images")
    p.add_argument("--encoder", required=True, type=Path, help="HF SigLIP directory (config.json, *.safetensors)")
    p.add_argument("--output", required=True, type=Path, help="directory for config.json, tokenizer.ckpt, report")
    for name in ("depth", "codebook_size", "semantic_layer", "appearance_layer", "epochs", "batch_images",
                 "seed_images", "seed_iters", "restart_after", "max_images", "seed", "workers", "head_width"):
        default = getattr(defaults, name)
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=default, help=f"(default: {default})")
    p.add_argument("--mode", choices=MODES, default=defaults.mode, help="image preprocessing")
    p.add_argument("--backend", choices=get_args(TransformerImpl), default=defaults.backend)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = vars(parse_args(argv))
    try:
        config = FitConfig(output_dir=args.pop("output"), **args)
    except ConfigError as err:
        print(f"fit_visual_tokenizer: {err}", file=sys.stderr)
        return 1
    runtime.initialize(ParallelConfig())
    try:
        report = fit_visual_tokenizer(config, image_batches)
    except (ConfigError, TokenizerFileError, ValueError) as err:
        print(f"fit_visual_tokenizer: {err}", file=sys.stderr)
        return 1
    finally:
        runtime.destroy()
    print(report_table(report))
    print(f"{report['images']} images, {len(report['undecodable'])} undecodable; "
          f"wrote {report['config']} and {report['checkpoint']} in {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
