#!/usr/bin/env bash
recipe="configs/qwen2_5_7b_stage1.yaml"
"true" '''\'
# ASVR stage 1 of Qwen2.5-7B + SigLIP2 (LLaVA-Pretrain 558K): projector + visual head train.
#   launch/pretrain_qwen7b.sh                                  # one node of 8 GPUs
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 launch/pretrain_qwen7b.sh   # on host0; NODE_RANK=1 on the other
#   srun --nodes 1 --ntasks-per-node 1 --gpus-per-node 8 launch/pretrain_qwen7b.sh   # Slurm
#   torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr host0 launch/pretrain_qwen7b.sh   # also
# Arguments are recipe overrides (--set train.save_dir=...). Resumes from the newest checkpoint in
# train.save_dir. Stage 2: launch/finetune_qwen7b.sh.
#
# Layout (configs/qwen2_5_7b_stage1.yaml), sized for 1 node of 8 x H100-80GB: TP=1, PP=1, DP=8, distributed
# optimizer; micro-batch 4: 256 / (8 x 4) = 8 micro-batches per step. Only the projector and the head train,
# so no model parallelism is needed: the bf16 weights (Qwen2.5-7B with its untied 152064-row embedding and LM
# head, SigLIP2, projector, head) are the floor, activations the rest.
# Per GPU (tools/plan_memory.py --nodes 1):
#   params     8,766M x 2 B                    = 16.33 GiB
#   grads        752M x 4 B (fp32 buffers)       =  2.80 GiB
#   optimizer    752M x 12 B / DP 8              =  1.05 GiB
#   activations  1 x 42.17 (micro-batch 4; the frozen LLM still saves its GEMM inputs) = 42.17 GiB
#   stage 0 total = 62.35 GiB of 72 usable (80 minus 8 reserved)
# Micro-batch 8 would need 104.52 GiB.
source "$(dirname "$0")/multinode.sh"
run_recipe "${RECIPE:-$recipe}" "$@"
: <<'#'
'''
import os, runpy  # noqa: E401  torchrun runs this file with Python: a worker of the recipe (launch/worker.py)
runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py"), {"recipe": recipe}, "__main__")
#
