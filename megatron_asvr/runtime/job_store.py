"""The store a job's ranks meet at, its keys under a prefix that only this start of the ranks uses.

torchrun's agents keep their store across the attempts of a job: the static rendezvous's for the
whole job, the c10d rendezvous's shared store (torch's default) for an agent's lifetime. Workers
restarted after a failure (``--max-restarts``) found there the keys that the dead attempt's ranks
left (their addresses, barrier counts), and gloo / NCCL failed to connect ("connectFullMesh failed
... Connection refused"). So each start needs a prefix of its own, one that every rank agrees on.
TORCHELASTIC_RESTART_COUNT is not such a prefix: each agent counts its own restarts. After a node is
lost, the replacement node's agent counts 0 where the surviving agents count 1. And an agent that
restarts its workers because a node joins (a membership change, not counted) falls one behind an
agent that restarted them after a failure.

Rank 0 draws a token for this start and hands it to every other rank in a handshake that no key
left by an earlier start can answer. Each rank says hello with a fresh nonce, and waits for the token
under that nonce. Rank 0 answers each rank's latest hello until every rank has confirmed under the
token. A hello left by an earlier start is answered too, harmlessly: nobody waits under its nonce.
"""

import os
import time
import uuid
from datetime import timedelta

import torch.distributed as dist

KEY = "asvr_start"  # the handshake's keys, outside every start's prefix
POLL_S = 0.05  # rank 0 looks for newer hellos this often until every rank has confirmed


def connect(rank: int, world_size: int, timeout: timedelta) -> dist.Store:
    """This start's view of the job's store at MASTER_ADDR:MASTER_PORT (collective over the ranks).

    Under torchrun the agent may host it (TORCHELASTIC_USE_AGENT_STORE); otherwise rank 0 does
    (with the c10d rendezvous and TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, on a port the agents pick
    afresh for every rendezvous round). Outside torchrun a single process takes a free port (a fixed
    default would collide with a job on the same node).
    """
    address = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = int(os.environ.get("MASTER_PORT", 0 if world_size == 1 else 29500))
    on_agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(address, port, world_size, is_master=rank == 0 and not on_agent, timeout=timeout,
                          multi_tenant=True)
    return dist.PrefixStore(f"start_{agree_on_start(store, rank, world_size)}", store)


def agree_on_start(store: dist.Store, rank: int, world_size: int) -> str:
    """Rank 0's token for this start, on every rank; keys of earlier starts in ``store`` do not matter.
    Waits (up to the store's timeout) for every rank."""
    if rank != 0:
        nonce = uuid.uuid4().hex
        store.set(f"{KEY}/hello/{rank}", nonce)
        token = store.get(f"{KEY}/welcome/{nonce}").decode()  # waits for rank 0's answer to this hello
        store.add(f"{KEY}/{token}/confirmed", 1)
        return token
    token = uuid.uuid4().hex
    hellos = [f"{KEY}/hello/{r}" for r in range(1, world_size)]
    answered = set()
    while store.add(f"{KEY}/{token}/confirmed", 0) < world_size - 1:
        # every rank's latest hello (waits until each rank has said one, ever): this start's or a stale one
        latest = set(store.multi_get(hellos)) - answered
        if latest:
            store.multi_set([f"{KEY}/welcome/{nonce.decode()}" for nonce in latest], [token] * len(latest))
            answered |= latest
        time.sleep(POLL_S)
    return token
