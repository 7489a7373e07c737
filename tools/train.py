"""Train (or resume) an ASVR vision-language model from a YAML recipe.

    torchrun --nproc_per_node 8 tools/train.py --config configs/vicuna7b_stage1.yaml \
        --set train.save_dir=runs/7b-stage1 --set data.num_workers=8

Every rank runs this. A run finds the newest complete checkpoint in
train.save_dir and resumes from it; SIGTERM checkpoints and stops. A rank that
cannot go on (a bad config, a lost peer, a checkpoint that cannot be written)
exits 1 with one line saying why; under torchrun --max-restarts N the job then
restarts and resumes. Under launch/torchrun_wrapper.py a rank that ends normally
reports which checkpoint it ended with (STOP_REPORTS).
"""

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

from megatron_asvr.config import ConfigError, load_run_config

# Set by launch/torchrun_wrapper.py: a folder where each local rank that ends normally writes
# <LOCAL_RANK>.json, {"local_world_size", "saved": the checkpoint of the step it ended at, or null}.
STOP_REPORTS = "ASVR_STOP_REPORTS"


def _end_report() -> Optional[Path]:
    """This rank's report file, if its launcher asked for one."""
    folder = os.environ.get(STOP_REPORTS)
    return Path(folder, f"{os.environ.get('LOCAL_RANK', '0')}.json") if folder else None


def _write_end_report(report: Path, result: dict) -> None:
    """``report`` from the run's result: whether the step it ended at is saved."""
    from megatron_asvr.checkpoint.directory import checkpoint_dir

    saved = result["checkpoint"]
    at_end = saved is not None and checkpoint_dir(Path(saved).parent, result["step"]) == Path(saved)
    report.write_text(json.dumps({"local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
                                  "saved": Path(saved).name if at_end else None}))


def _fail(err: Exception) -> None:
    """Exit 1 with one line, flushed before anything else runs. sys.exit(message) printed it only once the
    exception had unwound to the top, and torchrun SIGTERMs the other workers of a failed job meanwhile:
    some died without a word."""
    print(f"train: error: {err}", file=sys.stderr, flush=True)
    sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path, help="YAML recipe (configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override")
    args = parser.parse_args()
    report = _end_report()
    if report is not None:
        report.unlink(missing_ok=True)  # an earlier attempt's
    try:
        config = load_run_config(args.config, args.set)
    except ConfigError as err:
        _fail(err)
    # heavy imports after the config is known good
    from megatron_asvr import training
    from megatron_asvr.checkpoint.training_state import CheckpointWriteError
    from megatron_asvr.data.loader import DataLoaderError
    from megatron_asvr.evaluation.in_training import HeldOutScore
    from megatron_asvr.runtime.waits import PeerLost

    try:
        result = training.run(config, evaluator=HeldOutScore(config) if config.train.eval_interval else None)
        if report is not None:
            _write_end_report(report, result)
    except (ConfigError, DataLoaderError, PeerLost, CheckpointWriteError) as err:
        _fail(err)


if __name__ == "__main__":
    main()
