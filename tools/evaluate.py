"""Evaluate a checkpoint on local benchmark files; print a table and write results.json.

Our checkpoint at any layout (run every rank under torchrun; data parallelism splits the questions):

    torchrun --nproc_per_node 2 tools/evaluate.py --checkpoint runs/demo/stage2 --tp 2 \\
        --benchmark jsonl=runs/demo/data/eval.jsonl --image-root jsonl=runs/demo/data/images \\
        --tokenizer runs/demo/data --out runs/demo/eval

An HF export (one process, transformers):

    python tools/evaluate.py --hf-model hf/asvr-7b --template vicuna_v1 --image-mode pad \\
        --benchmark pope=pope/output/coco --image-root pope=coco/val2014 --out eval/asvr-7b

The paper's table of 14 benchmarks (each row's headline metric and their average; the ones not
given are named missing; results.json gets it under "suite"):

    python tools/evaluate.py --checkpoint runs/asvr-7b/stage2 --suite paper14 --max-new-tokens 128 \\
        --benchmark textvqa=textvqa/TextVQA_0.5.1_val.json --image-root textvqa=textvqa/train_images \\
        --benchmark mmmu=MMMU --benchmark ocrbench=OCRBench/OCRBench.json \\
        --image-root ocrbench=OCRBench_Images ... --out eval/asvr-7b

Benchmarks (NAME=PATH): pope (coco_pope_*.json files), mme (MME_Benchmark_release_version),
mmbench (the dev TSV), seed (SEED-Bench.json), mmvp (Questions.csv), textvqa
(TextVQA_0.5.1_val.json), gqa (testdev_balanced_questions.json), docvqa (val_v1.0.json or
lmms-lab/DocVQA parquet), chartqa (the test folder, one of its JSON files, or lmms-lab/ChartQA
parquet), ocrbench (OCRBench.json or echo840/OCRBench parquet), mmmu (MMMU/MMMU or lmms-lab/MMMU
parquet folder), ai2d (lmms-lab/ai2d parquet), realworldqa (xai-org/RealworldQA parquet),
hallusionbench (HallusionBench.json or lmms-lab/HallusionBench parquet), jsonl (the demo's
eval.jsonl shape). Template, image mode and tokenizer default to what the training run used
where the checkpoint records them.
"""

import argparse
import sys
from pathlib import Path

from megatron_asvr.config import ConfigError, ParallelConfig
from megatron_asvr.data.images import MODES, ImageLoadError
from megatron_asvr.data.sequence import SequenceTooLong
from megatron_asvr.evaluation.items import BenchmarkError
from megatron_asvr.evaluation.paper_table import SUITES


def _pairs(values, flag: str) -> dict:
    pairs = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"{flag} {value!r} is not NAME=PATH")
        pairs[name] = Path(path)
    return pairs


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", type=Path, help="our save directory (newest checkpoint) or checkpoint")
    model.add_argument("--hf-model", type=Path, help="an HF LlavaForConditionalGeneration directory")
    parser.add_argument("--benchmark", action="append", default=[], metavar="NAME=PATH", required=True)
    parser.add_argument("--image-root", action="append", default=[], metavar="NAME=DIR",
                        help="images of benchmark NAME (default: the benchmark file's directory)")
    parser.add_argument("--out", type=Path, required=True, help="directory for results.json and the table")
    parser.add_argument("--tokenizer", type=Path, help="text tokenizer (directory or file)")
    parser.add_argument("--template", choices=("vicuna_v1", "mistral_instruct", "plain"))
    parser.add_argument("--image-mode", choices=MODES)
    parser.add_argument("--method", choices=("generate", "likelihood"), default="generate",
                        help="likelihood: the likeliest option letter / yes-no (short answers are generated)")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32, help="questions decoded together")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--limit", type=int, help="only the first N questions of each benchmark")
    parser.add_argument("--suite", choices=sorted(SUITES),
                        help="the benchmarks given are the paper's: add its table and average, name the missing")
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        from megatron_asvr.config.tools import EvalBenchmarkConfig, EvalConfig, EvalModelConfig
        from megatron_asvr.evaluation.run import run_evaluation

        roots = _pairs(args.image_root, "--image-root")
        benchmarks = _pairs(args.benchmark, "--benchmark")
        specs = [EvalBenchmarkConfig(name=name, path=path, image_root=roots.get(name))
                 for name, path in benchmarks.items()]
        unknown = sorted(set(roots) - {s.name for s in specs})
        if unknown:
            raise ConfigError(f"--image-root names {unknown[0]!r}, which is not a --benchmark")
        model = EvalModelConfig(
            checkpoint=args.checkpoint, hf_model=args.hf_model, tokenizer=args.tokenizer, template=args.template,
            image_mode=args.image_mode, parallel=ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp),
            dtype=args.dtype, micro_batch=args.micro_batch, batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
        )
        run_evaluation(EvalConfig(model=model, benchmarks=specs, out_dir=args.out, method=args.method,
                                  limit=args.limit, suite=args.suite))
    except (ConfigError, BenchmarkError, ImageLoadError, SequenceTooLong, FileNotFoundError) as err:
        sys.exit(f"evaluate: error: {err}")


if __name__ == "__main__":
    main()
