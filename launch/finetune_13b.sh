#!/usr/bin/env bash
recipe="configs/vicuna13b_stage2.yaml"
"true" '''\'
# ASVR stage 2 of Vicuna-13B + SigLIP (LLaVA-1.5 mix 665K) from the stage-1 checkpoint: LLM, projector
# and visual head train.
#   srun --nodes 2 --ntasks-per-node 1 --gpus-per-node 8 launch/finetune_13b.sh   # Slurm
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 launch/finetune_13b.sh   # on host0; NODE_RANK=1 on host1
#   torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr host0 launch/finetune_13b.sh   # also
# Arguments are recipe overrides (--set train.save_dir=...). Resumes from the newest checkpoint.
#
# Layout (configs/vicuna13b_stage2.yaml), sized for 2 nodes of 8 x H100-80GB: TP=2 (sequence parallel)
# x PP=2, DP=4, distributed optimizer; 21 + 19 decoder layers (the last stage also runs the visual
# head, ~5% of the step's FLOPs, about two layers). Micro-batch 2: 128 / (4 x 2) = 16 micro-batches
# per step, a 1/16 pipeline bubble. Per GPU (tools/plan_memory.py --nodes 2):
#   stage 0 (SigLIP, projector, embedding, 21 layers): params 3,628M x 2 B = 6.76, grads 3,429M x 4 B = 12.77,
#            optimizer 3,429M x 12 B / DP 4 = 9.58, activations 2 x 6.62 = 13.24 -> stage 0 total = 42.35 GiB
#   stage 1 (19 layers, LM head, visual head): params 3,466M x 2 B = 6.46, grads 12.91, optimizer 9.68,
#            activations 1 x 7.46                                 -> stage 1 total = 36.51 GiB
#   of 72 usable (80 minus 8 reserved). Alternatives (--sweep): TP=1 x PP=1 needs 114.9 GiB and TP=1 x PP=2
#   75.1 (no fit); TP=2 x PP=1 fits (62.6) but reduce-scatters twice the gradients per GPU over InfiniBand
#   (DP=8); TP=4 x PP=1 fits (36.5) with twice the tensor-parallel traffic. On one node (DP=2): 51.93 GiB.
source "$(dirname "$0")/multinode.sh"
run_recipe "${RECIPE:-$recipe}" "$@"
: <<'#'
'''
import os, runpy  # noqa: E401  torchrun runs this file with Python: a worker of the recipe (launch/worker.py)
runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py"), {"recipe": recipe}, "__main__")
#
