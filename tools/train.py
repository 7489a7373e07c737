"""Train (or resume) an ASVR vision-language model from a YAML recipe.

    torchrun --nproc_per_node 8 tools/train.py --config configs/vicuna7b_stage1.yaml \
        --set train.save_dir=runs/7b-stage1 --set data.num_workers=8

Every rank runs this. A run finds the newest complete checkpoint in
train.save_dir and resumes from it; SIGTERM checkpoints and stops. A rank that
cannot go on (a bad config, a lost peer, a checkpoint that cannot be written)
exits 1 with one line saying why; under torchrun --max-restarts N the job then
restarts and resumes.
"""

import argparse
import sys
from pathlib import Path

from megatron_asvr.config import ConfigError, load_run_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path, help="YAML recipe (configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override")
    args = parser.parse_args()
    try:
        config = load_run_config(args.config, args.set)
    except ConfigError as err:
        sys.exit(f"train: error: {err}")
    # heavy imports after the config is known good
    from megatron_asvr import training
    from megatron_asvr.checkpoint.training_state import CheckpointWriteError
    from megatron_asvr.data.loader import DataLoaderError
    from megatron_asvr.evaluation.in_training import HeldOutScore
    from megatron_asvr.runtime.waits import PeerLost

    try:
        training.run(config, evaluator=HeldOutScore(config) if config.train.eval_interval else None)
    except (ConfigError, DataLoaderError, PeerLost, CheckpointWriteError) as err:
        sys.exit(f"train: error: {err}")


if __name__ == "__main__":
    main()
