#!/usr/bin/env bash
recipe="configs/qwen2_5_7b_stage2.yaml"
"true" '''\'
# ASVR stage 2 of Qwen2.5-7B + SigLIP2 (LLaVA-1.5 mix 665K, template qwen) from the stage-1 checkpoint: LLM,
# projector and visual head train.
#   launch/finetune_qwen7b.sh                                  # one node of 8 GPUs
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 launch/finetune_qwen7b.sh   # on host0; NODE_RANK=1 on the other
#   srun --nodes 1 --ntasks-per-node 1 --gpus-per-node 8 launch/finetune_qwen7b.sh   # Slurm
#   torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr host0 launch/finetune_qwen7b.sh   # also
# Arguments are recipe overrides. Resumes from the newest checkpoint in train.save_dir.
#
# Layout (configs/qwen2_5_7b_stage2.yaml), sized for 1 node of 8 x H100-80GB: TP=2 with sequence parallelism,
# PP=1, DP=4, distributed optimizer; micro-batch 2: 128 / (4 x 2) = 16 micro-batches per step. Per GPU
# (tools/plan_memory.py --nodes 1):
#   params     4,385M x 2 B                    =  8.17 GiB
#   grads      4,185M x 4 B (fp32 buffers)       = 15.59 GiB
#   optimizer  4,185M x 12 B / DP 4              = 11.69 GiB
#   activations  1 x 10.87 (micro-batch 2)      = 10.87 GiB
#   stage 0 total = 46.32 GiB of 72 usable (80 minus 8 reserved)
# TP=1 does not fit (80.28 GiB at micro-batch 2); TP=2 with micro-batch 4 needs 57.20.
source "$(dirname "$0")/multinode.sh"
run_recipe "${RECIPE:-$recipe}" "$@"
: <<'#'
'''
import os, runpy  # noqa: E401  torchrun runs this file with Python: a worker of the recipe (launch/worker.py)
runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py"), {"recipe": recipe}, "__main__")
#
