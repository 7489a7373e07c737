#!/usr/bin/env bash
recipe="configs/bunny2m_stage2.yaml"
"true" '''\'
# ASVR stage 2 of Vicuna-7B + SigLIP on Bunny-v1_1-data-2M from the 2M stage-1 checkpoint.
#   srun --nodes 4 --ntasks-per-node 1 --gpus-per-node 8 launch/finetune_2m.sh   # Slurm
#   NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=host0 launch/finetune_2m.sh           # on each node
#   torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr host0 launch/finetune_2m.sh   # also
# Arguments are recipe overrides (--set train.save_dir=...). Resumes from the newest checkpoint.
#
# Layout (configs/bunny2m_stage2.yaml): the 7B stage-2 layout (launch/finetune_7b.sh) over 4 nodes of
# 8 x H100-80GB: TP=1, PP=1, DP=32, micro-batch 1: 128 / (32 x 1) = 4 micro-batches per step.
# Per GPU (tools/plan_memory.py --nodes 4):
#   params 7,894M x 2 B = 14.70, grads 7,496M x 4 B = 27.93, optimizer 7,496M x 12 B / DP 32 = 2.62,
#   activations 1 x 9.19 -> stage 0 total = 54.44 GiB of 72 usable (80 minus 8 reserved).
# Every step all-reduces (reduce-scatters) 7.5B fp32 gradients across the nodes.
source "$(dirname "$0")/multinode.sh"
run_recipe "${RECIPE:-$recipe}" "$@"
: <<'#'
'''
import os, runpy  # noqa: E401  torchrun runs this file with Python: a worker of the recipe (launch/worker.py)
runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py"), {"recipe": recipe}, "__main__")
#
