"""Memory per GPU for each pipeline stage of a recipe's layout on a cluster; flags layouts that do not fit.

    python tools/plan_memory.py --config configs/vicuna13b_stage2.yaml --nodes 2
    python tools/plan_memory.py --config configs/vicuna7b_stage2.yaml --set parallel.tensor_parallel=1 --sweep

Parameters come from the model's shapes (checked against the model built on the
meta device); activations are an estimate (see megatron_asvr.planner). Exits
with status 1 when the layout does not fit.
"""

import argparse
import sys
from pathlib import Path

from megatron_asvr.config import ConfigError, load_run_config
from megatron_asvr.planner import Cluster, format_plan, plan_memory
from megatron_asvr.planner.plan import sweep_layouts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path, help="YAML recipe (configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0, help="default: H100 80GB")
    parser.add_argument("--reserve-gib", type=float, default=8.0,
                        help="per GPU for the CUDA context, NCCL, fragmentation and transient buffers")
    parser.add_argument("--visual-positions", type=int, help="image positions per sample (default: the largest image)")
    parser.add_argument("--sweep", action="store_true", help="also list every TP x PP layout and whether it fits")
    args = parser.parse_args(argv)
    cluster = Cluster(args.nodes, args.gpus_per_node, args.gpu_memory_gib, args.reserve_gib)
    try:
        config = load_run_config(args.config, args.set)
        plan = plan_memory(config, cluster, args.visual_positions)
        print(format_plan(plan, args.config.stem))
        if args.sweep:
            print("\n" + sweep_layouts(config, cluster, args.visual_positions))
    except ConfigError as err:
        sys.exit(f"plan_memory: error: {err}")
    sys.exit(0 if plan.fits else 1)


if __name__ == "__main__":
    main()
