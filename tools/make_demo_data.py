"""Write the synthetic demo corpus (images, LLaVA JSON, eval questions, tokenizer).

The output layout is described in demo/data.py. Example:

    python tools/make_demo_data.py --out data/demo            # default size, seconds
    python tools/make_demo_data.py --out /tmp/demo --preset tiny
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: demo/ is not installed
from demo.data import DemoConfig, make_demo_data  # noqa: E402


OVERRIDES = {  # command-line flag -> DemoConfig field
    "--seed": "seed",
    "--train-images": "train_images",
    "--eval-images": "eval_images",
    "--language-records": "language_records",
    "--eval-questions-per-image": "eval_questions_per_image",
    "--max-objects": "max_objects",
    "--noisy-fraction": "noisy_fraction",
    "--text-only-fraction": "text_only_fraction",
    "--vocab-size": "vocab_size",
    "--jpeg-quality": "jpeg_quality",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory (must not hold an earlier corpus)")
    parser.add_argument("--preset", choices=("default", "tiny"), default="default")
    defaults = DemoConfig()
    for flag, name in OVERRIDES.items():
        default = getattr(defaults, name)
        parser.add_argument(flag, dest=name, type=type(default), help=f"override the preset (default: {default})")
    parser.add_argument("--caption-colors", dest="caption_colors", action=argparse.BooleanOptionalAction,
                        help=f"stage-1 captions name the colours (default: {defaults.caption_colors})")
    parser.add_argument("--centered", dest="centered", action=argparse.BooleanOptionalAction,
                        help=f"shapes at their cells' centres, full size (default: {defaults.centered})")
    parser.add_argument("--tokenizer", help="copy this SentencePiece model (file or directory), a pretrained "
                                            "LLM's, instead of fitting one")
    args = parser.parse_args()

    config = DemoConfig.tiny() if args.preset == "tiny" else DemoConfig()
    names = [*OVERRIDES.values(), "caption_colors", "centered"]
    overrides = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    try:
        summary = make_demo_data(args.out, dataclasses.replace(config, **overrides), args.tokenizer)
    except (FileExistsError, ValueError) as err:
        parser.error(str(err))
    print(json.dumps(dataclasses.asdict(summary), indent=2))


if __name__ == "__main__":
    main()
