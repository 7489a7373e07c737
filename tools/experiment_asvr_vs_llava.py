"""ASVR versus LLaVA (visual loss off) on the demo data, over seeds: for every seed both arms
train stage 1 (from the demo's import of its LLM and encoder) and stage 2 with the same recipes, steps and
overrides, then answer the held-out questions greedily. Writes experiment.md (accuracy per
category with chance and majority, mean ± std over seeds; final losses; per-seed numbers; wall
times), experiment.json, curves.png and accuracy.png.

    launch/experiment.sh                     # the demo first (its data and import), then this tool
    python tools/experiment_asvr_vs_llava.py --demo-dir runs/demo --out runs/experiment --seeds 1 2 3

Training and evaluation run as torchrun subprocesses on --nproc processes with the
layouts of configs/demo_stage{1,2}.yaml; steps default to the recipes' train.steps. A
finished stage or evaluation is not repeated, so the command resumes.
"""

import argparse
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    from megatron_asvr.evaluation.experiment import ExperimentConfig

    d = ExperimentConfig(Path("."), Path("."))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-dir", type=Path, required=True, help="launch/demo.sh's DEMO_DIR")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(d.seeds), help="train.seed of each run per arm")
    parser.add_argument("--stage1-config", type=Path, default=d.stage1_config)
    parser.add_argument("--stage2-config", type=Path, default=d.stage2_config)
    parser.add_argument("--stage1-steps", type=int, help="default: the stage-1 recipe's train.steps")
    parser.add_argument("--stage2-steps", type=int, help="default: the stage-2 recipe's train.steps")
    parser.add_argument("--eval-interval", type=int,
                        help="stage-2 steps between in-training held-out scores (default: a quarter of the steps)")
    parser.add_argument("--nproc", type=int, default=d.nproc)
    parser.add_argument("--master-port", type=int, default=d.master_port)
    parser.add_argument("--set1", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="stage-1 recipe override for both arms")
    parser.add_argument("--set2", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="stage-2 recipe override for both arms")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from megatron_asvr.config import ConfigError
    from megatron_asvr.evaluation.experiment import ExperimentConfig, ExperimentError, run_experiment

    try:
        run_experiment(ExperimentConfig(
            demo_dir=args.demo_dir, out_dir=args.out, stage1_config=args.stage1_config,
            stage2_config=args.stage2_config, stage1_steps=args.stage1_steps, stage2_steps=args.stage2_steps,
            eval_interval=args.eval_interval, seeds=tuple(args.seeds), nproc=args.nproc,
            master_port=args.master_port, stage1_overrides=tuple(args.set1), stage2_overrides=tuple(args.set2),
        ))
    except (ExperimentError, ConfigError) as err:
        sys.exit(f"experiment: error: {err}")


if __name__ == "__main__":
    main()
