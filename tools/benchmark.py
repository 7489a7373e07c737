"""Training throughput of the ASVR VLM on synthetic batches at real shapes (every rank runs this).

    OMP_NUM_THREADS=1 python tools/benchmark.py --mode compare-asvr    # CPU: fp32, tiny shapes, one thread
    torchrun --nproc_per_node 8 tools/benchmark.py --preset vicuna_7b --tp 2 --micro-batch 4 \\
        --global-batch 64 --precision bf16 --mode compare-asvr --json runs/bench_7b.json
    torchrun --nproc_per_node 8 tools/benchmark.py --preset vicuna_13b --tp 2 --pp 2 --mode ab \\
        --fp8-recipe tensorwise --fp8-bf16-edge-layers 1
    python tools/benchmark.py --preset vicuna_7b --set model.llm.num_layers=12 --mode compare-asvr   # one GPU

Prints (on the last rank) one row per run: step time, tokens/s per GPU, samples/s, TFLOP/s per GPU and
MFU from the whole-model FLOP count (megatron_asvr.model.flops), peak memory and the visual head's
share of the step; compare-asvr adds the ASVR / baseline step-time ratio, ab the speed ratio and the
loss differences. FP8 runs the LLM's layers through Transformer Engine; the encoder, projector and heads
stay bf16 (unpadded).
"""

import argparse
import os
import sys
from pathlib import Path
from typing import get_args

import torch

from megatron_asvr.benchmark.settings import (
    FP8_RECIPES, MODES, PRECISIONS, PRESETS, BenchmarkError, BenchmarkSettings,
)
from megatron_asvr.data.packing import Batching
from megatron_asvr.config import ConfigError

H100_BF16_DENSE_TFLOPS = 989.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="tiny")
    p.add_argument("--mode", choices=MODES, default="single",
                   help="compare-packing: the same samples padded to full length, to each micro-batch's longest, packed")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--distributed-optimizer", action="store_true")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--global-batch", type=int, default=4)
    p.add_argument("--seq-length", type=int, help="default 2048 (128 for tiny)")
    p.add_argument("--stage", type=int, choices=(1, 2), default=2, help="ASVR stage: 1 trains projector + head")
    p.add_argument("--recompute", choices=("none", "selective", "full"), default="none")
    p.add_argument("--precision", choices=PRECISIONS, default="bf16" if torch.cuda.is_available() else "fp32")
    p.add_argument("--fp8-recipe", choices=FP8_RECIPES, default="delayed")
    p.add_argument("--fp8-bf16-edge-layers", type=int, default=0, help="first and last LLM layers kept in bf16")
    p.add_argument("--ab", nargs=2, default=("bf16", "fp8"), choices=PRECISIONS, metavar=("A", "B"),
                   help="the two precisions of --mode ab")
    p.add_argument("--no-asvr", action="store_true", help="single mode: a plain LLaVA step")
    p.add_argument("--batching", choices=get_args(Batching), default="pad_full",
                   help="how samples become micro-batches (data.batching); packed, --micro-batch counts rows")
    p.add_argument("--lengths", choices=("full", "stage1", "stage2"), default="full",
                   help="full-length samples, or lengths drawn like LLaVA-558K (stage1) / the 665K mix (stage2)")
    p.add_argument("--transformer-impl", choices=("auto", "transformer_engine", "local"), default="auto")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--gpu-peak-tflops", type=float,
                   default=H100_BF16_DENSE_TFLOPS if torch.cuda.is_available() else None,
                   help="dense bf16 peak per GPU for MFU (default on GPU: H100 SXM, 989)")
    p.add_argument("--json", type=Path, help="also write the runs and comparisons here")
    p.add_argument("--set", action="append", default=[], metavar="model.SECTION.KEY=VALUE",
                   help="override a field of the preset's model config (repeatable), e.g. model.llm.num_layers=8")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    settings = BenchmarkSettings(
        preset=args.preset, tensor_parallel=args.tp, pipeline_parallel=args.pp,
        sequence_parallel=args.sequence_parallel, distributed_optimizer=args.distributed_optimizer,
        micro_batch=args.micro_batch, global_batch=args.global_batch, seq_length=args.seq_length, stage=args.stage,
        recompute=args.recompute, precision=args.precision, fp8_recipe=args.fp8_recipe,
        fp8_bf16_edge_layers=args.fp8_bf16_edge_layers, asvr=not args.no_asvr,
        transformer_impl=args.transformer_impl, warmup=args.warmup, steps=args.steps, seed=args.seed,
        gpu_peak_tflops=args.gpu_peak_tflops, model_overrides=tuple(args.set), batching=args.batching,
        lengths=args.lengths,
    )
    try:
        from megatron_asvr.benchmark.report import comparisons_of, render, to_json
        from megatron_asvr.benchmark.runner import benchmark_variants, run_variants

        results = run_variants(settings, benchmark_variants(settings, args.mode, tuple(args.ab)))
    except (BenchmarkError, ConfigError) as err:
        sys.exit(f"benchmark: error: {err}")
    if int(os.environ.get("RANK", "0")) == results[0].world_size - 1:  # on the last stage: it has the losses
        comparisons = comparisons_of(args.mode, results)
        print(render(results, comparisons, torch.cuda.is_available()), flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(to_json(results, comparisons))


if __name__ == "__main__":
    main()
