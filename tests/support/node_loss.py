"""Two nodes on one machine, one of them lost, started as users start them: node 1's launcher
(e.g. launch/pretrain_7b.sh -> launch/multinode.sh: a torchrun agent, c10d rendezvous on localhost)
SIGKILLed with its workers once a step line shows, then started again, as a replacement node would be.
A silent loss (power, network) leaves the connections open: node 1 is SIGSTOPped instead, and written
off (SIGKILL) once node 0's ranks have given up on it.

    job = lose_a_node(ROOT / "launch/pretrain_7b.sh", kill_after_step=5, env={"RECIPE": "run.yaml", ...})
    job.returncodes, job.outputs, job.survivors, job.noticed_s

Every process of either node is recorded while the job runs; ``survivors`` are those still alive
``grace`` seconds after both nodes ended. A job still running after ``timeout`` seconds is killed
with all it started and reported as hung.
"""

import os
import re
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import psutil

from megatron_asvr.runtime.ports import free_port
from tests.support.torchrun_job import POLL_S, _alive, _record, survivors


@dataclass
class NodeLossJob:
    # the surviving node's, the replacement's (None: not started; -9: killed, left waiting alone after
    # the surviving node ended)
    returncodes: List[Optional[int]]
    outputs: List[str]  # the surviving node's, the lost node's first start's, its replacement's
    killed_after: int  # the newest step line seen when the node was lost
    noticed_s: float  # from the loss until the surviving node's ranks had exited
    survivors: List[str]  # "pid: command line" of the job's processes alive after it ended


def _newest_step(text: str) -> Optional[int]:
    steps = re.findall(r"^step (\d+)/", text, re.MULTILINE)
    return int(steps[-1]) if steps else None


def lose_a_node(launcher: Path, kill_after_step: int, env: Dict[str, str], max_restarts: int = 1,
                timeout: float = 300.0, grace: float = 5.0, silent: bool = False, lost_node: int = 1,
                before_replacement: Callable[[], None] = lambda: None, args: Sequence[str] = ()) -> NodeLossJob:
    """Nodes 0 and 1 of a 2-node job of 1 rank each run ``launcher`` (with ``args``). Node ``lost_node`` is lost
    (``silent``: stopped) after step ``kill_after_step``'s line shows. Once the other node's workers
    have left, it is replaced (after ``before_replacement()``), unless the other node has ended: the
    surviving agent has counted a restart, the replacement's agent has not."""
    port = free_port()
    common = {**os.environ, **env, "NNODES": "2", "GPUS_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(port), "RDZV_ID": f"node-loss-{port}", "MAX_RESTARTS": str(max_restarts)}
    # the survivor's, the lost node's, the replacement's; appended to, as in torchrun_job.run_torchrun
    logs = [tempfile.TemporaryFile("a+") for _ in range(3)]
    seen: Dict[int, psutil.Process] = {}

    def start(node: int, log) -> subprocess.Popen:
        return subprocess.Popen(["bash", str(launcher), *map(str, args)], env={**common, "NODE_RANK": str(node)},
                                stdout=log, stderr=subprocess.STDOUT)

    def text(i: int) -> str:
        logs[i].seek(0)
        return logs[i].read()

    def watch(nodes, until) -> None:
        started = time.monotonic()
        while not until():
            for node in nodes:
                if node.poll() is None:
                    _record(psutil.Process(node.pid), seen)
            if time.monotonic() - started > timeout:
                for node in nodes:
                    node.kill()
                for p in _alive(seen.values()):
                    p.kill()
                raise AssertionError(f"node-loss job hung: running after {timeout:.0f} s\n"
                                     + "\n".join(text(i)[-3000:] for i in range(3)))
            time.sleep(POLL_S)

    def ended(node: subprocess.Popen) -> bool:
        return node.poll() is not None

    try:
        nodes = {0: start(0, logs[0 if lost_node else 1])}
        time.sleep(1)  # node 0's agent hosts the rendezvous store
        nodes[1] = start(1, logs[1 if lost_node else 0])
        survivor, lost = nodes[1 - lost_node], nodes[lost_node]
        stepped = lambda: (_newest_step(text(0) + text(1)) or 0) >= kill_after_step  # noqa: E731
        watch([survivor, lost], lambda: stepped() or ended(survivor) or ended(lost))
        killed_after, lost_at = _newest_step(text(0) + text(1)) or 0, time.monotonic()
        processes = []
        if not ended(lost):
            processes = [psutil.Process(lost.pid), *psutil.Process(lost.pid).children(recursive=True)]
            for p in processes:
                p.send_signal(signal.SIGSTOP if silent else signal.SIGKILL)
        watch([survivor], lambda: ended(survivor) or not _alive(psutil.Process(survivor.pid).children()))
        noticed_s = time.monotonic() - lost_at
        for p in _alive(processes):  # a silent node, written off
            p.kill()
        lost.wait()
        replacement = None
        if not ended(survivor):
            before_replacement()
            replacement = start(lost_node, logs[2])
        watch([survivor, *filter(None, [replacement])],
              lambda: ended(survivor) and (replacement is None or ended(replacement) or survivor.returncode != 0))
        if replacement is not None and not ended(replacement):  # it would wait alone for the rendezvous's join_timeout
            for p in [psutil.Process(replacement.pid), *psutil.Process(replacement.pid).children(recursive=True)]:
                p.kill()
            replacement.wait()
        return NodeLossJob([survivor.returncode, replacement and replacement.returncode], [text(i) for i in range(3)],
                           killed_after, noticed_s, survivors(seen, grace))
    finally:
        for log in logs:
            log.close()
