#!/usr/bin/env bash
recipe="configs/vicuna7b_stage2.yaml"
"true" '''\'
# ASVR stage 2 of Vicuna-7B + SigLIP (LLaVA-1.5 mix 665K) from the stage-1 checkpoint: LLM, projector
# and visual head train.
#   launch/finetune_7b.sh                                  # one node of 8 GPUs
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 launch/finetune_7b.sh   # on host0; NODE_RANK=1 on the other
#   srun --nodes 1 --ntasks-per-node 1 --gpus-per-node 8 launch/finetune_7b.sh   # Slurm
#   torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr host0 launch/finetune_7b.sh   # also
# Arguments are recipe overrides; RECIPE=... picks another 7B stage-2 recipe (configs/mistral7b_stage2.yaml,
# configs/highres1152_stage2.yaml: their layouts are in their headers).
#
# Layout (configs/vicuna7b_stage2.yaml), sized for 1 node of 8 x H100-80GB: TP=1, PP=1, DP=8, distributed
# optimizer; micro-batch 1: 128 / (8 x 1) = 16 micro-batches per step. No tensor parallelism (no TP
# communication); the fp32 gradient buffer is the largest item. Per GPU (tools/plan_memory.py --nodes 1):
#   params     7,894M x 2 B                    = 14.70 GiB
#   grads      7,496M x 4 B (fp32 buffers)       = 27.93 GiB
#   optimizer  7,496M x 12 B / DP 8              = 10.47 GiB
#   activations  1 x 9.19 (one 2048-position sample)   =  9.19 GiB
#   stage 0 total = 62.29 GiB of 72 usable (80 minus 8 reserved)
# Micro-batch 2 needs 71.48 GiB (no margin); TP=2 with sequence parallelism and micro-batch 4 needs 50.83.
source "$(dirname "$0")/multinode.sh"
run_recipe "${RECIPE:-$recipe}" "$@"
: <<'#'
'''
import os, runpy  # noqa: E401  torchrun runs this file with Python: a worker of the recipe (launch/worker.py)
runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py"), {"recipe": recipe}, "__main__")
#
