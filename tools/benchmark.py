"""Training throughput of a recipe's VLM on synthetic batches at its real shapes (every rank runs this).

    OMP_NUM_THREADS=1 python tools/benchmark.py --config configs/bench_tiny.yaml     # CPU: tiny shapes
    torchrun --nproc_per_node 8 tools/benchmark.py --config configs/vicuna7b_stage2.yaml \\
        --set parallel.tensor_parallel=2 --set train.micro_batch=4 --set train.global_batch=64 \\
        --set bench.mode=compare-asvr --set bench.json=runs/bench_7b.json
    torchrun --nproc_per_node 8 tools/benchmark.py --config configs/vicuna13b_stage2.yaml \\
        --set parallel.tensor_parallel=2 --set parallel.pipeline_parallel=2 --set bench.mode=ab \\
        --set bench.fp8_recipe=tensorwise --set bench.fp8_bf16_edge_layers=1
    python tools/benchmark.py --config configs/vicuna7b_stage2.yaml --set model.llm.num_layers=12   # one GPU

The recipe gives the model, layout, batch, sequence length, batching and optimizer; its ``bench``
section what is timed (mode, warm-up and timed steps, sample lengths, precision A/B; see
megatron_asvr/config/schema.py BenchConfig); its data files are not read. Prints (on the last rank)
one row per run: step time, tokens/s per GPU, samples/s, TFLOP/s per GPU and MFU (on a GPU, against
train.gpu_peak_tflops) from the whole-model FLOP count (megatron_asvr/model/flops.py), peak memory
and the visual head's share of the step; compare-asvr adds the ASVR / baseline step-time ratio, ab
the speed ratio and the loss differences. FP8 runs the LLM's layers through Transformer Engine; the
encoder, projector and heads stay bf16 (unpadded).
"""

import argparse
import os
import sys
from pathlib import Path

import torch

from megatron_asvr.config import BenchRunConfig, ConfigError, load_config


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, type=Path, help="YAML recipe (configs/), e.g. configs/bench_tiny.yaml")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override (repeatable), e.g. bench.mode=compare-packing, model.llm.num_layers=8")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        config = load_config(BenchRunConfig, args.config, args.set)
    except ConfigError as err:
        sys.exit(f"benchmark: error: {err}")
    # heavy imports after the config is known good
    from megatron_asvr.benchmark.fp8 import FP8Unavailable
    from megatron_asvr.benchmark.report import comparisons_of, render, to_json
    from megatron_asvr.benchmark.runner import benchmark_variants, run_variants

    try:
        results = run_variants(config, benchmark_variants(config))
    except (ConfigError, FP8Unavailable) as err:
        sys.exit(f"benchmark: error: {err}")
    if int(os.environ.get("RANK", "0")) == results[0].world_size - 1:  # on the last stage: it has the losses
        comparisons = comparisons_of(config.bench.mode, results)
        print(render(results, comparisons, torch.cuda.is_available()), flush=True)
        if config.bench.json:
            path = Path(config.bench.json)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(to_json(results, comparisons))


if __name__ == "__main__":
    main()
