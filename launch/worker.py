"""A launcher that Python runs: one torchrun worker training the launcher's recipe.

    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr host0 launch/pretrain_13b.sh

torchrun hands its script to Python on every worker, so each launcher is a bash / Python polyglot:
bash runs its first part (torchrun from the environment), Python its last two lines, which run this
file with the launcher's ``recipe``. As in bash, RECIPE overrides it, paths are relative to the
repository, the arguments are recipe overrides, and CUDA_DEVICE_MAX_CONNECTIONS is 1.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # megatron's TP / SP communication overlap
os.chdir(ROOT)
sys.path.insert(0, str(ROOT))
from tools.train import main  # noqa: E402

launcher_recipe = globals()["recipe"]  # set by the launcher (runpy's init_globals)
sys.argv = [str(ROOT / "tools/train.py"), "--config", os.environ.get("RECIPE") or launcher_recipe, *sys.argv[1:]]
main()
