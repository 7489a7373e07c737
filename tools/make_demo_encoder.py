"""Write the demo's SigLIP vision model in HF format (demo/encoder.py says how it is built).

    python tools/make_demo_encoder.py --out runs/demo/encoder --config configs/demo_stage1.yaml
"""

import argparse
import sys
from pathlib import Path

from megatron_asvr.config import load_run_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: demo/ is not installed
from demo.encoder import write_demo_siglip  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--config", required=True, type=Path, help="recipe whose model.vision shape to use")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    vision = load_run_config(args.config).model.vision
    print(f"wrote {write_demo_siglip(args.out, vision, args.seed)}")


if __name__ == "__main__":
    main()
