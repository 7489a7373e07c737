"""Draw where the last prompt token attends over an image (the paper's Figure 3) as a PNG.

    torchrun --nproc_per_node 2 tools/attention_map.py --checkpoint runs/demo/stage2 --pp 2 \\
        --tokenizer runs/demo/data --image runs/demo/data/images/eval/000000.jpg \\
        --question "What color is the shape in the center?" --out runs/demo/attention.png

The map averages the selected decoder layers (--layers, 1-based) and heads (--heads,
0-based); all of them by default. The PNG shows the image with the attention overlaid, a
colour bar, and the question and the model's greedy answer as the title. Template, image
mode and tokenizer default to the training run's.
"""

import argparse
import sys
from pathlib import Path

from megatron_asvr.config import ConfigError, ParallelConfig
from megatron_asvr.data.images import MODES, ImageLoadError
from megatron_asvr.data.sequence import SequenceTooLong


def _ints(text: str):
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="our save directory or checkpoint")
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--question", required=True, help="the user turn (add an answer prompt if wanted)")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--layers", type=_ints, help="comma-separated 1-based decoder layers (default: all)")
    parser.add_argument("--heads", type=_ints, help="comma-separated 0-based heads (default: all)")
    parser.add_argument("--tokenizer", type=Path)
    parser.add_argument("--template", choices=("vicuna_v1", "mistral_instruct", "plain"))
    parser.add_argument("--image-mode", choices=MODES)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from megatron_asvr.evaluation.attention_map import AttentionMapError
    from megatron_asvr.config.tools import AttentionConfig, EvalModelConfig
    from megatron_asvr.evaluation.attention_tool import write_attention_png

    try:
        model = EvalModelConfig(
            checkpoint=args.checkpoint, tokenizer=args.tokenizer, template=args.template, image_mode=args.image_mode,
            parallel=ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp), dtype=args.dtype,
            micro_batch=1, batch_size=1, max_new_tokens=args.max_new_tokens,
        )
        write_attention_png(AttentionConfig(model=model, image=args.image, question=args.question, out=args.out,
                                            layers=args.layers, heads=args.heads))
    except (ConfigError, ImageLoadError, SequenceTooLong, FileNotFoundError, AttentionMapError) as err:
        sys.exit(f"attention_map: error: {err}")


if __name__ == "__main__":
    main()
