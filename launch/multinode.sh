# Sourced by the multi-node launchers: torchrun's rendezvous, then tools/train.py with a recipe.
#
# From the environment: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, GPUS_PER_NODE. Under Slurm
# (one launcher per node: srun --nodes N --ntasks-per-node 1 --gpus-per-node 8 launch/<script>.sh)
# the unset ones come from SLURM_JOB_NUM_NODES, SLURM_NODEID, the first host of
# SLURM_JOB_NODELIST and SLURM_GPUS_ON_NODE. Outside Slurm the defaults are one node of 8 GPUs.
# A virtual environment at $VENV (default .venv) is activated when present.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -n "${SLURM_JOB_ID:-}" ]; then
    NNODES=${NNODES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}}
    NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
    MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
    GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
# megatron-core's tensor/sequence-parallel communication overlap needs one CUDA work queue.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
VENV=${VENV:-.venv}
if [ -f "$VENV/bin/activate" ]; then
    source "$VENV/bin/activate"
fi

# run_recipe RECIPE [--set section.key=value ...]: every node runs this; rank 0's node logs.
run_recipe() {
    local recipe=$1
    shift
    echo "[$(hostname)] node $NODE_RANK of $NNODES, $GPUS_PER_NODE GPUs, master $MASTER_ADDR:$MASTER_PORT: $recipe $*"
    exec torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
        --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
        tools/train.py --config "$recipe" "$@"
}
