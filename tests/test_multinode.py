"""Multi-node starts: the ranks' store handshake on a store that outlives attempts."""

import threading
import time
from datetime import timedelta

import torch.distributed as dist

from megatron_asvr.runtime import job_store


def _start(port: int, world_size: int, delays: dict) -> list:
    """Every rank's token, each rank a client of the store on ``port``, rank r starting ``delays[r]`` s late."""
    tokens = [None] * world_size

    def rank(r):
        time.sleep(delays.get(r, 0))
        client = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=20))
        tokens[r] = job_store.agree_on_start(client, r, world_size)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tokens


def test_ranks_agree_on_a_start_whatever_earlier_starts_left_in_the_store():
    """A store kept across attempts (as torchrun's agents keep theirs): rank 1's hello from a start that
    died is still there when rank 0 of the next start looks, and rank 2 of that start never said hello.
    The ranks of each start agree on one token, a new one each start; the stale hello got an answer
    that nobody waited for."""
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=20))
    server.set(f"{job_store.KEY}/hello/1", "stale")
    server.set(f"{job_store.KEY}/hello/2", "older")
    first = _start(server.port, 3, {1: 0.3, 2: 0.5})
    assert len(set(first)) == 1 and first[0] is not None
    assert server.get(f"{job_store.KEY}/welcome/stale").decode() == first[0]
    second = _start(server.port, 3, {0: 0.3})  # rank 0 last: the others wait for its answer
    assert len(set(second)) == 1 and second[0] not in (None, first[0])
    (alone,) = _start(server.port, 1, {})  # one rank: its own token at once
    assert alone not in (None, first[0], second[0])
