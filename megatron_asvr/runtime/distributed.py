"""Distributed start-up from torchrun's environment, model-parallel groups, and seeding."""

import os
import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_asvr.config import ParallelConfig
from megatron_asvr.runtime import child_processes, cpu_emulation
from megatron_asvr.runtime.waits import BACKSTOP


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device  # where tensors go: runtime.current_device()
    tp_rank: int
    pp_rank: int
    dp_rank: int
    dp_size: int
    # The ranks of this rank's model replica (its TP x PP group) on gloo, for host facts of a step
    # (shared without a device sync); None when the replica is this rank alone.
    replica_group: Optional[dist.ProcessGroup] = None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value is None else int(value)


def initialize(parallel: ParallelConfig, seed: int = 1234, timeout_minutes: float = 10.0) -> RankInfo:
    """Join the job torchrun started (or a single local process), build megatron's groups, seed.

    NCCL on GPU; gloo on CPU, where megatron-core's CUDA calls are emulated
    (``cpu_emulation``). The layout is validated before any group is created.
    ``timeout_minutes`` is the watchdog's (``runtime.waits``); the process groups wait
    ``BACKSTOP`` times longer. Helper processes started from here on end with this one; under
    torchrun this one stops (SIGTERM) when its agent ends (``child_processes``).
    """
    rank, world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    parallel.validate(world_size)
    child_processes.install()
    child_processes.stop_with_agent()

    if torch.cuda.is_available():
        backend = "nccl"
        torch.cuda.set_device(local_rank)
    else:
        backend = "gloo"
        cpu_emulation.install()
    device = current_device()

    timeout = timedelta(minutes=timeout_minutes * BACKSTOP)
    if not dist.is_initialized():
        dist.init_process_group(backend, store=_job_store(rank, world_size, timeout), rank=rank,
                                world_size=world_size, timeout=timeout)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        distributed_timeout_minutes=timeout_minutes * BACKSTOP,
    )
    set_seed(seed)
    return RankInfo(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        backend=backend,
        device=device,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        replica_group=_replica_host_group(world_size),
    )


def _replica_host_group(world_size: int) -> Optional[dist.ProcessGroup]:
    """This rank's model-parallel ranks as a gloo group (collective: every rank creates every group)."""
    mine = dist.get_process_group_ranks(parallel_state.get_model_parallel_group())
    if len(mine) == 1:
        return None
    every = [None] * world_size
    dist.all_gather_object(every, mine)  # host sync, once at start-up
    groups = {tuple(ranks): dist.new_group(list(ranks), backend="gloo") for ranks in sorted(set(map(tuple, every)))}
    return groups[tuple(mine)]


def _job_store(rank: int, world_size: int, timeout: timedelta) -> dist.Store:
    """The store the ranks meet at, its keys under a prefix of this attempt's own.

    torchrun's default (static) rendezvous keeps one TCPStore, its agent's, for the whole job,
    and this torch's env:// start-up no longer separates the attempts: workers restarted after a
    failure (``--max-restarts``) read the addresses the dead attempt's ranks left there, and
    gloo / NCCL fail to connect ("connectFullMesh failed ... Connection refused"). Each attempt
    (TORCHELASTIC_RESTART_COUNT) gets a prefix of its own. Outside torchrun rank 0 hosts the store;
    a single process on a free port (a fixed default would collide with a job on the same node).
    """
    address = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = _env_int("MASTER_PORT", 0 if world_size == 1 else 29500)
    on_agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(address, port, world_size, is_master=rank == 0 and not on_agent, timeout=timeout,
                          multi_tenant=True)
    return dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def current_device() -> torch.device:
    """The runtime device: this rank's GPU; under the CPU emulation ``cuda``, which the emulation
    places on the CPU (so that moves to it are moves, for its strict device mode); else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cuda") if cpu_emulation.is_active() else torch.device("cpu")


def set_seed(seed: int, data_parallel_random_init: bool = False) -> None:
    """Seed python, numpy, torch and megatron's model-parallel RNG tracker.

    As in Megatron-LM, each pipeline stage gets its own offset (its dropout masks
    differ); tensor-parallel ranks share the default stream and differ only in
    the tracker's model-parallel stream.
    """
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    if data_parallel_random_init:
        seed += 10 * parallel_state.get_data_parallel_rank()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def destroy() -> None:
    """Tear down megatron's groups and the process group."""
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
