# Sourced by the multi-node launchers: torchrun's elastic (c10d) rendezvous, then tools/train.py with a recipe.
#
# From the environment: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, GPUS_PER_NODE. Under Slurm
# (one launcher per node: srun --nodes N --ntasks-per-node 1 --gpus-per-node 8 launch/<script>.sh)
# the unset ones come from SLURM_JOB_NUM_NODES, SLURM_NODEID, the first host of
# SLURM_JOB_NODELIST and SLURM_GPUS_ON_NODE. Outside Slurm the defaults are one node of 8 GPUs.
# A virtual environment at $VENV (default .venv) is activated when present.
#
# A lost node. MAX_RESTARTS (default 0) is torchrun's --max-restarts: how many times each node's
# agent restarts its workers after a failure. When a node is lost, the other nodes' ranks see their
# peer gone, at once or, for a silent node, within train.distributed_timeout_minutes. They exit 1,
# and their agents wait in the rendezvous (its join_timeout, 600 s) for the node to come back: the
# same launcher started again on it, or on a replacement with the same NODE_RANK. Then every rank
# resumes from the newest complete checkpoint.
# The rendezvous's store lives in node 0's agent, at MASTER_ADDR:MASTER_PORT (is_host=1 on NODE_RANK 0,
# 0 elsewhere). Losing node 0 loses the store and ends the job on every node: torch's c10d rendezvous
# survives the loss of any node but that one. On one machine (every node on localhost) each agent
# would think it is the host, and the first to bind the port would host the store. is_host makes it
# node 0, as on a cluster. RDZV_CONF adds torchrun --rdzv-conf settings
# (e.g. join_timeout=1800,read_timeout=120); RDZV_ID names the job's rendezvous (default: the Slurm job id).
# torchrun runs through launch/torchrun_wrapper.py, which keeps the rendezvous from sharing its store
# with the workers (torch's default): with sharing, a node that rejoins never gets the store's address.
#
# A preemption (SIGTERM to the job, then SIGKILL after the scheduler's grace period). Every rank
# finishes its step, saves it, and exits 0; the job then ends with one line and status 0
# (launch/torchrun_wrapper.py). torchrun SIGKILLs workers that are still running SHUTDOWN_TIMEOUT
# (default 30) seconds after it passed the signal on. The step in progress plus a save must fit in
# that time, and SHUTDOWN_TIMEOUT must fit in the scheduler's grace period (Slurm's KillWait, 30 s by
# default; Kubernetes' terminationGracePeriodSeconds). If the step and the save do not fit, raise
# both, or ask the scheduler for an early signal (sbatch --signal=TERM@120). Otherwise the save is
# cut off, and the same command resumes from the last periodic save (train.save_interval).
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
MAX_RESTARTS=${MAX_RESTARTS:-0}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-30}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-asvr}}
# megatron-core's tensor/sequence-parallel communication overlap needs one CUDA work queue.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
VENV=${VENV:-.venv}
if [ -f "$VENV/bin/activate" ]; then
    source "$VENV/bin/activate"
fi

# run_torchrun PROGRAM [ARGUMENT ...]: this node's torchrun agent running PROGRAM in each worker.
run_torchrun() {
    echo "[$(hostname)] node $NODE_RANK of $NNODES, $GPUS_PER_NODE GPUs, rendezvous $MASTER_ADDR:$MASTER_PORT: $*"
    exec python3 launch/torchrun_wrapper.py --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE" \
        --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID" \
        --rdzv-conf "is_host=$([ "$NODE_RANK" = 0 ] && echo 1 || echo 0)${RDZV_CONF:+,$RDZV_CONF}" \
        --max-restarts "$MAX_RESTARTS" --shutdown-timeout "$SHUTDOWN_TIMEOUT" "$@"
}

# run_recipe RECIPE [--set section.key=value ...]: every node runs this; rank 0's node logs.
run_recipe() {
    local recipe=$1
    shift
    run_torchrun tools/train.py --config "$recipe" "$@"
}
