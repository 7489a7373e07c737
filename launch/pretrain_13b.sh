#!/usr/bin/env bash
recipe="configs/vicuna13b_stage1.yaml"
"true" '''\'
# ASVR stage 1 of Vicuna-13B + SigLIP (LLaVA-Pretrain 558K): projector + visual head train.
#   srun --nodes 2 --ntasks-per-node 1 --gpus-per-node 8 launch/pretrain_13b.sh   # Slurm
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 launch/pretrain_13b.sh   # on host0; NODE_RANK=1 on host1
#   torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr host0 launch/pretrain_13b.sh   # also
# Arguments are recipe overrides (--set train.save_dir=...). Resumes from the newest checkpoint.
#
# Layout (configs/vicuna13b_stage1.yaml), the same as stage 2 so that nothing reshards between the
# stages, sized for 2 nodes of 8 x H100-80GB: TP=2 (sequence parallel) x PP=2, DP=4, distributed
# optimizer; 21 decoder layers on stage 0 and 19 on stage 1, which also runs the visual head (about
# two layers' FLOPs). Micro-batch 4: 256 / (4 x 4) = 16 micro-batches per step; 1F1B keeps 2 in
# flight on stage 0. Per GPU (tools/plan_memory.py --nodes 2):
#   stage 0 (SigLIP, projector, embedding, 21 layers): params 3,628M x 2 B = 6.76, grads 16M x 4 B = 0.06,
#            optimizer 0.04, activations 2 x 13.24 = 26.48   -> stage 0 total = 33.35 GiB
#   stage 1 (19 layers, LM head, visual head): params 3,466M x 2 B = 6.46, grads 371M x 4 B = 1.38,
#            optimizer 371M x 12 B / DP 4 = 1.04, activations 1 x 14.91 -> stage 1 total = 23.78 GiB
#   of 72 usable (80 minus 8 reserved). TP=1 x PP=1 at micro-batch 2 would also fit (57.3 GiB).
source "$(dirname "$0")/multinode.sh"
run_recipe "${RECIPE:-$recipe}" "$@"
: <<'#'
'''
import os, runpy  # noqa: E401  torchrun runs this file with Python: a worker of the recipe (launch/worker.py)
runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py"), {"recipe": recipe}, "__main__")
#
