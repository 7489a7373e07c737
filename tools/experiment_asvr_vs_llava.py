"""ASVR versus LLaVA (visual loss off) on the demo data: same recipes, seed and steps; both
evaluated on the held-out questions; a table (experiment.md) and loss curves (curves.png).

    launch/experiment.sh                     # the demo's data first, then this tool
    python tools/experiment_asvr_vs_llava.py --demo-dir runs/demo --out runs/experiment

Training and evaluation run as torchrun subprocesses on --nproc processes with the
layouts of configs/demo_stage{1,2}.yaml; finished runs are not repeated.
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
    parser.add_argument("--stage1-config", type=Path, default=d.stage1_config)
    parser.add_argument("--stage2-config", type=Path, default=d.stage2_config)
    parser.add_argument("--stage1-steps", type=int, default=d.stage1_steps)
    parser.add_argument("--stage2-steps", type=int, default=d.stage2_steps)
    parser.add_argument("--eval-interval", type=int, default=d.eval_interval,
                        help="stage-2 steps between held-out scores")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--nproc", type=int, default=d.nproc)
    parser.add_argument("--master-port", type=int, default=d.master_port)
    parser.add_argument("--set1", action="append", metavar="SECTION.KEY=VALUE",
                        help=f"stage-1 recipe override for both arms (default: {list(d.stage1_overrides)})")
    parser.add_argument("--set2", action="append", metavar="SECTION.KEY=VALUE",
                        help=f"stage-2 recipe override for both arms (default: {list(d.stage2_overrides)})")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from megatron_asvr.evaluation.experiment import ExperimentConfig, ExperimentError, run_experiment

    d = ExperimentConfig(Path("."), Path("."))
    try:
        run_experiment(ExperimentConfig(
            demo_dir=args.demo_dir, out_dir=args.out, stage1_config=args.stage1_config,
            stage2_config=args.stage2_config, stage1_steps=args.stage1_steps, stage2_steps=args.stage2_steps,
            eval_interval=args.eval_interval, seed=args.seed, nproc=args.nproc, master_port=args.master_port,
            stage1_overrides=tuple(args.set1 or d.stage1_overrides),
            stage2_overrides=tuple(args.set2 or d.stage2_overrides),
        ))
    except ExperimentError as err:
        sys.exit(f"experiment: error: {err}")


if __name__ == "__main__":
    main()
