"""Convert between HF checkpoints and ours, at any TP / PP (run every rank under torchrun).

Import a whole llava-hf model, or Vicuna / Mistral plus SigLIP for stage 1:

    torchrun --nproc_per_node 4 tools/convert.py import --llava llava-1.5-7b-hf --out ckpt/llava7b --tp 2 --pp 2
    torchrun --nproc_per_node 2 tools/convert.py import --llm vicuna-7b-v1.5 --vision siglip-so400m-patch14-384 \\
        --config configs/vicuna7b_stage1.yaml --out ckpt/vicuna7b_siglip --tp 2

Export one of our checkpoints (a training iter_* directory works) to llava-hf:

    torchrun --nproc_per_node 4 tools/convert.py export --checkpoint runs/7b/iter_0005000 --out hf/asvr-7b \\
        --tp 2 --pp 2 --vision-tower-from siglip-so400m-patch14-384 --tokenizer vicuna-7b-v1.5 --verify

--llm-only exports the language model alone as an HF LlamaForCausalLM, with the text tokenizer
(after a text-only stage, as launch/demo_llm.sh builds the demo's LLM); import it with --llm.

--verify runs both sides on the same random image and prompt and prints the max
absolute logit difference (it needs transformers; the HF model is loaded on one
rank after ours is freed).
"""

import argparse
import sys
from pathlib import Path
from typing import get_args

from megatron_asvr.config import ConfigError, ParallelConfig
from megatron_asvr.config.tools import ExportOptions, ExportPrecision, ImportSources


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("import", "export"):
        sub = commands.add_parser(name)
        sub.add_argument("--out", required=True, type=Path, help="new output directory")
        sub.add_argument("--tp", type=int, default=1, help="tensor-parallel size of this run")
        sub.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of this run")
        sub.add_argument("--dtype", choices=get_args(ExportPrecision), default="bf16",
                         help="parameter dtype while converting (and of the exported tensors)")
        sub.add_argument("--tokenizer", type=Path, help="text tokenizer (directory or file)")
        sub.add_argument("--verify", action="store_true", help="print the max abs logit difference vs transformers")
        sub.add_argument("--no-progress", action="store_true")
        if name == "import":
            sub.add_argument("--llava", type=Path, help="an HF LlavaForConditionalGeneration directory")
            sub.add_argument("--llm", type=Path, help="an HF LlamaForCausalLM / MistralForCausalLM directory")
            sub.add_argument("--vision", type=Path, help="an HF SigLIP / CLIP (vision) model directory")
            sub.add_argument("--visual-head", type=Path, help="an exported visual head directory")
            sub.add_argument("--config", type=Path, help="YAML recipe for the ASVR settings (model.asvr, ...)")
            sub.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override")
        else:
            sub.add_argument("--checkpoint", required=True, type=Path,
                             help="our checkpoint: a save directory (its newest) or an iter_* directory")
            sub.add_argument("--vision-tower-from", type=Path,
                             help="the original HF vision weights: export the complete tower (else truncated)")
            sub.add_argument("--max-shard-size", type=float, default=2.0, help="GiB per safetensors shard")
            sub.add_argument("--llm-only", action="store_true",
                             help="the language model alone, as an HF LlamaForCausalLM (import it with --llm)")
    return parser.parse_args(argv)


def _import(args, parallel, info) -> None:
    from megatron_asvr.convert.hf_import import (
        base_model_config,
        import_hf,
        print_import_report,
    )
    from megatron_asvr.convert.verify import verify_checkpoint

    sources = ImportSources(llava=args.llava, llm=args.llm, vision=args.vision, visual_head=args.visual_head,
                            tokenizer=args.tokenizer)
    base = base_model_config(args.config, args.set)
    report = import_hf(sources, args.out, parallel, base, _dtype(args.dtype), info.device, not args.no_progress)
    if info.rank == 0:
        print_import_report(report)
    if args.verify:
        source = args.llava or args.llm
        _print_diff(verify_checkpoint(args.out, source, parallel, _dtype(args.dtype), info.device,
                                      llava=args.llava is not None), source)


def _export(args, parallel, info) -> None:
    from megatron_asvr.convert.hf_export import (
        export_hf,
        print_export_report,
    )
    from megatron_asvr.convert.verify import verify_checkpoint

    if args.llm_only and args.verify:
        raise ConfigError("--verify compares a LLaVA export; import an --llm-only export with --llm to check it")
    options = ExportOptions(vision_tower_from=args.vision_tower_from, tokenizer=args.tokenizer, dtype=args.dtype,
                            max_shard_bytes=int(args.max_shard_size * 1024**3), progress=not args.no_progress,
                            llm_only=args.llm_only)
    report = export_hf(args.checkpoint, args.out, parallel, options, info.device)
    if info.rank == 0:
        print_export_report(report)
    if args.verify:
        _print_diff(verify_checkpoint(args.checkpoint, args.out, parallel, _dtype(args.dtype), info.device), args.out)


def _dtype(name: str):
    from megatron_asvr.runtime.device import dtype_of

    return dtype_of(name)


def _print_diff(agreement, hf_dir) -> None:
    if agreement is not None:
        print(f"verify against transformers ({hf_dir}): {agreement.describe()}", flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    from megatron_asvr import runtime
    from megatron_asvr.convert.ranks import ConversionError

    parallel = ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp)
    try:
        info = runtime.initialize(parallel)
        try:
            (_import if args.command == "import" else _export)(args, parallel, info)
        finally:
            runtime.destroy()
    except (ConfigError, ConversionError, KeyError, ValueError, FileNotFoundError, FileExistsError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err  # no repr quotes
        sys.exit(f"convert {args.command}: error: {message}")


if __name__ == "__main__":
    main()
