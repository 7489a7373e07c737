#!/usr/bin/env bash
recipe="configs/vicuna7b_stage1.yaml"
"true" '''\'
# ASVR stage 1 of Vicuna-7B + SigLIP (LLaVA-Pretrain 558K): projector + visual head train.
#   launch/pretrain_7b.sh                                  # one node of 8 GPUs
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 launch/pretrain_7b.sh   # on host0; NODE_RANK=1 on the other
#   srun --nodes 1 --ntasks-per-node 1 --gpus-per-node 8 launch/pretrain_7b.sh   # Slurm
#   torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr host0 launch/pretrain_7b.sh   # also
# Arguments are recipe overrides (--set train.save_dir=...); RECIPE=... picks another recipe with the
# same layout (configs/mistral7b_stage1.yaml). Resumes from the newest checkpoint in train.save_dir.
#
# Layout (configs/vicuna7b_stage1.yaml), sized for 1 node of 8 x H100-80GB: TP=1, PP=1, DP=8, distributed
# optimizer; micro-batch 4: 256 / (8 x 4) = 8 micro-batches per step. Only the projector and the head
# train (758M parameters), so no model parallelism is needed: the bf16 weights of all 7,894M
# parameters are the floor (14.70 GiB), activations the rest. Per GPU (tools/plan_memory.py --nodes 1):
#   params     7,894M x 2 B                    = 14.70 GiB
#   grads        758M x 4 B (fp32 buffers)       =  2.82 GiB
#   optimizer    758M x 12 B / DP 8              =  1.06 GiB
#   activations  1 x 36.75 (micro-batch 4; the frozen LLM still saves its GEMM inputs) = 36.75 GiB
#   stage 0 total = 55.33 GiB of 72 usable (80 minus 8 reserved)
# Micro-batch 16 would need 165.6 GiB; TP=2 does not fit at micro-batch 16 either (102.2 GiB).
source "$(dirname "$0")/multinode.sh"
run_recipe "${RECIPE:-$recipe}" "$@"
: <<'#'
'''
import os, runpy  # noqa: E401  torchrun runs this file with Python: a worker of the recipe (launch/worker.py)
runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py"), {"recipe": recipe}, "__main__")
#
