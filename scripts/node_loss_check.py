"""A lost node, the four ways it can go, on the tiny run (tests/test_fault_tolerance.py runs the first).

    OMP_NUM_THREADS=1 python scripts/node_loss_check.py [--work DIR] [--cases killed silent ...]

Two nodes of one rank each on this machine, each started as users start them: launch/pretrain_7b.sh
with RECIPE, then launch/multinode.sh and torchrun's c10d rendezvous on localhost. One node is lost
after a step, and a replacement is started once the other node's rank has exited:

    killed      node 1 SIGKILLed (its sockets close): node 0's rank sees it at once
    silent      node 1 SIGSTOPped (power or network lost, sockets left open): node 0's rank gives up
                after train.distributed_timeout_minutes (the watchdog), then node 1 is written off
    no-restart  as killed, with MAX_RESTARTS=0: the job ends in one line
    node-0      node 0 SIGKILLed: it hosted the rendezvous's store, so the job ends on node 1 too

One row per case: how the surviving rank noticed, after how long, where the job resumed, whether the
final state equals the uninterrupted reference's bitwise (torchrun ... launch/pretrain_7b.sh on one
node), exit statuses, processes left behind, wall time.
"""

import argparse
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.multirank import run_ranks  # noqa: E402
from tests.support.node_loss import lose_a_node  # noqa: E402
from tests.support.tiny_run import make_tiny_run  # noqa: E402
from tests.support.torchrun_job import run_torchrun  # noqa: E402
from tests.test_fault_tolerance import ENV, STEPS, TIMEOUT_S, _recipe, _same, _state  # noqa: E402

CASES = {  # name: lose_a_node keywords
    "killed": {},
    "silent": {"silent": True},
    "no-restart": {"max_restarts": 0},
    "node-0": {"lost_node": 0},
}
KILL_AFTER_STEP = 3
NOTICED = r"^(?:train: error: |rank \d: no answer).*$"  # how the surviving rank gave up on its peer


def _last_line(pattern: str, text: str) -> str:
    found = re.findall(pattern, text, re.MULTILINE)
    return found[-1] if found else "-"


def _bitwise(reference: Path, run: Path) -> str:
    final = f"iter_{STEPS:07d}"
    if not (run / final).is_dir():
        return f"no {final}"
    a, b = _state(reference / final), _state(run / final)
    return "equal" if a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a) else "DIFFERENT"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, help="a folder for the runs (default: a temporary one, removed)")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), metavar="CASE",
                        help=f"which cases to run (default: all of {', '.join(CASES)})")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="node-loss-"))
    tiny = work / "tiny"
    if not (tiny / "shards").is_dir():
        tiny.mkdir(parents=True, exist_ok=True)
        run_ranks(make_tiny_run, 1, str(tiny), timeout=600)
    reference = work / "reference"
    shutil.rmtree(reference, ignore_errors=True)
    reference.mkdir()
    job = run_torchrun([ROOT / "launch/pretrain_7b.sh"], env={**ENV, "RECIPE": str(_recipe(str(tiny), reference))})
    assert job.returncode == 0, job.output[-4000:]
    print(f"tiny run, {STEPS} steps, a save every 2, train.distributed_timeout_minutes = {TIMEOUT_S} s; "
          f"node lost after step {KILL_AFTER_STEP}'s line; reference: one node of 2 ranks\n", flush=True)
    for name in args.cases:
        kwargs = CASES[name]
        case = work / name
        shutil.rmtree(case, ignore_errors=True)
        case.mkdir()
        started = time.monotonic()
        job = lose_a_node(ROOT / "launch/pretrain_7b.sh", KILL_AFTER_STEP,
                          {**ENV, "RECIPE": str(_recipe(str(tiny), case))}, **kwargs)
        survivor, _, replacement = job.outputs
        print(f"== {name}: lost after step {job.killed_after}; exit status of the surviving node "
              f"{job.returncodes[0]}, of the replacement {job.returncodes[1]}; {time.monotonic() - started:.0f} s")
        print(f"   the surviving rank exited {job.noticed_s:.1f} s after the loss: "
              f"{_last_line(NOTICED, survivor)[:160]}")
        print(f"   resumed: {_last_line(r'^resumed from .*$', survivor + replacement)}")
        for who, text in (("surviving launcher", survivor), ("replacement launcher", replacement)):
            print(f"   {who}'s last line: {_last_line(r'^torchrun: .*$', text)[:200]}")
        print(f"   final state against the reference: {_bitwise(reference / 'run', case / 'run')}; "
              f"processes left: {job.survivors or 'none'}\n", flush=True)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
