"""A preempted job saves where it stopped and the same command resumes: SIGTERM to torchrun, to the
whole job, torchrun SIGKILLed alone, then a rank lost while loading (tests/support/faults.py in
torchrun jobs of tests/support/fault_jobs.py; its own file so that it runs beside
tests/test_fault_tolerance.py's faulty job, not after it)."""

import random
import re
import signal

import yaml

from megatron_asvr.config import to_dict
from tests.support.fault_jobs import ENV, ROOT, STEPS, WRAPPED_TORCHRUN, assert_same_final_state, fault_config
from tests.support.torchrun_job import run_torchrun


def test_preemption_or_a_lost_agent_saves_where_it_stopped_and_the_same_command_resumes(fault_reference, tiny_root,
                                                                                       tmp_path):
    """A job stopped three times, each resumed by the same command (torchrun through
    launch/torchrun_wrapper.py, as launch/multinode.sh runs it): SIGTERM to torchrun (a scheduler's
    preemption: torchrun passes it to each worker's process group, DataLoader workers included);
    SIGTERM to every process of the job at once (as Slurm sends it); torchrun SIGKILLed alone (its
    workers get SIGTERM by their parent-death signal instead of training on unwatched). Each time
    the ranks finish their step, save it (no periodic saves: train.save_interval=0) and exit 0, their
    DataLoader workers alive until then, and no process is left; a signalled torchrun ends with one
    line and status 0. The fourth job (--max-restarts 1) loses a rank inside the load of the third
    stop's checkpoint, restarts, and ends as the reference."""
    work = tmp_path / "run"
    recipe = tmp_path / "run.yaml"
    recipe.write_text(yaml.safe_dump(to_dict(fault_config(tiny_root, work, save_interval=0))))
    command = [ROOT / "tests/support/faults.py", "--config", recipe]
    told = {"preempt": "SIGTERM to torchrun", "preempt_all": "SIGTERM to the job", "kill_agent": "SIGKILL to torchrun",
            "kill_in_load": "SIGKILL"}
    resumed_at, stops = 0, []  # keep_last 3: all three stops' checkpoints stay
    for fault in ("preempt", "preempt_all", "kill_agent", "kill_in_load"):
        at = resumed_at if fault == "kill_in_load" else resumed_at + 1 + (resumed_at == 0)
        rank = random.randrange(2)
        job = run_torchrun(command, env={**ENV, "ASVR_FAULTS": f"{fault}:{at}:{rank}"}, grace=60,
                           max_restarts=int(fault == "kill_in_load"), torchrun=WRAPPED_TORCHRUN)
        assert not job.survivors, f"processes outlived the job: {job.survivors}"
        assert "killed by signal" not in job.output and "Traceback" not in job.output, job.output[-4000:]
        assert f"[faults] rank {rank}: {told[fault]}" in job.output
        if resumed_at:
            assert f"resumed from {work}/iter_{resumed_at:07d} at step {resumed_at}" in job.output
        if fault == "kill_in_load":
            assert job.returncode == 0, job.output[-4000:]
            assert (f"train: error: rank {1 - rank}: lost every rank during loading iter_{resumed_at:07d} "
                    in job.output), job.output[-4000:]
            break
        stopped = re.findall(r"^stopped by SIGTERM after step (\d+), saved (\S+); the same command resumes",
                             job.output, re.MULTILINE)
        assert len(stopped) == 1, job.output[-4000:]
        step = int(stopped[0][0])
        assert at <= step < STEPS and stopped[0][1] == f"{work}/iter_{step:07d}", (fault, at, stopped)
        if fault == "kill_agent":
            assert job.returncode == -signal.SIGKILL
        else:
            assert job.returncode == 0 and job.output.splitlines()[-1] == (
                f"torchrun: stopped by SIGTERM: the 2 worker(s) of this node saved iter_{step:07d} and exited; "
                "the same command resumes from it"), job.output[-4000:]
        assert (work / "latest").read_text() == f"iter_{step:07d}"
        stops.append(f"iter_{step:07d}")
        assert sorted(p.name for p in work.glob("iter_*")) == stops, "a save other than the stops'"
        resumed_at = step
    assert_same_final_state(fault_reference, work)
