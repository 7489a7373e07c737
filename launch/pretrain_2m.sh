#!/usr/bin/env bash
recipe="configs/bunny2m_stage1.yaml"
"true" '''\'
# ASVR stage 1 of Vicuna-7B + SigLIP on Bunny-pretrain-LAION-2M: projector + visual head train.
#   srun --nodes 4 --ntasks-per-node 1 --gpus-per-node 8 launch/pretrain_2m.sh   # Slurm
#   NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=host0 launch/pretrain_2m.sh           # on each node
#   torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr host0 launch/pretrain_2m.sh   # also
# Arguments are recipe overrides (--set train.save_dir=...). Resumes from the newest checkpoint.
#
# Layout (configs/bunny2m_stage1.yaml): the 7B stage-1 layout (launch/pretrain_7b.sh), data-parallel
# over more nodes for 2M samples: TP=1, PP=1; 4 nodes of 8 x H100-80GB give DP=32, micro-batch 4:
# 256 / (32 x 4) = 2 micro-batches per step. Per GPU (tools/plan_memory.py --nodes 4):
#   params 7,894M x 2 B = 14.70, grads 758M x 4 B = 2.82, optimizer 758M x 12 B / DP 32 = 0.26,
#   activations 1 x 36.75 -> stage 0 total = 54.54 GiB of 72 usable (80 minus 8 reserved).
# Beyond 8 nodes (DP=64) the global batch of 256 leaves one micro-batch of 4 per rank per step.
source "$(dirname "$0")/multinode.sh"
run_recipe "${RECIPE:-$recipe}" "$@"
: <<'#'
'''
import os, runpy  # noqa: E401  torchrun runs this file with Python: a worker of the recipe (launch/worker.py)
runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py"), {"recipe": recipe}, "__main__")
#
