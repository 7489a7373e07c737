"""Partial failures: a rank dies, a peer stalls, a disk fills, a file changes; the run recovers or
stops with one line, never hangs, and leaves no process behind.

The torchrun jobs (tests/support/fault_jobs.py) run 2 CPU ranks (gloo) at TP=2, so that each rank
writes shards of its own. The reference job (the fault_reference fixture) runs uninterrupted, started
as users type it (``torchrun ... launch/pretrain_7b.sh``, a bash / Python polyglot). The faulty one
runs ``tests/support/faults.py`` (tools/train.py with a fault in each of its first three attempts)
under ``torchrun --max-restarts 3``, sharing its start-ups between the three tests that read it. All
must end with the reference's model, optimizer, scheduler and RNG state, bitwise. Cheaper cases run
in forked ranks (``run_ranks``). A lost node, the same launcher on two simulated nodes, is
scripts/node_loss_check.py (tests/test_multinode.py runs its mechanism at a smaller size).
Preemption and a lost agent: tests/test_preemption.py.
"""

import dataclasses
import json
import random
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from tests.support.fault_jobs import (ENV, ROOT, SAVE_INTERVAL, STEPS, TIMEOUT_S, assert_same_final_state,
                                     fault_config, write_recipe)
from tests.support.multirank import MultiRankError, run_ranks
from tests.support.torchrun_job import run_torchrun
from megatron_asvr.config import ParallelConfig
from megatron_asvr.data.loader import GlobalBatchOrder
from megatron_asvr.data.shards import ShardDataset

@dataclass(frozen=True)
class FaultyJob:
    """One torchrun job (--max-restarts 3) that meets a fault in each of its first three attempts."""

    output: str
    run: Path
    kill_rank: int  # attempt 0: its save at step 2 needs its one retry (ENOSPC), then SIGKILL mid-step
    kill_step: int
    save_rank: int  # attempt 1: SIGKILL in the save of save_step, its shards written, not yet published
    save_step: int
    stall_step: int  # attempt 2: rank 1 SIGSTOPped when this step's batches are asked for

    def attempt(self, number: int) -> str:
        """The job's output from attempt ``number``'s first line on (up to the next attempt's)."""
        start = self.output.index(f"[faults] attempt {number}: ")
        end = self.output.find(f"[faults] attempt {number + 1}: ")
        return self.output[start:] if end < 0 else self.output[start:end]


@pytest.fixture(scope="module")
def faulty(tiny_root, tmp_path_factory):
    """The faults at random ranks and steps, one attempt after another, so that the restarts share one
    job's start-ups; attempt 3 runs clean to the end."""
    work = tmp_path_factory.mktemp("faulty")
    kill_rank, kill_step = random.randrange(2), random.randrange(3, STEPS + 1)
    resumed = SAVE_INTERVAL * ((kill_step - 1) // SAVE_INTERVAL)  # where attempt 1 starts
    save_rank, save_step = random.randrange(2), random.randrange(resumed + SAVE_INTERVAL, STEPS + 1, SAVE_INTERVAL)
    stall_step = save_step - SAVE_INTERVAL + 1  # the first step of attempt 2, which resumes before the lost save
    faults = (f"enospc:2:{kill_rank}:1@0,kill_in_step:{kill_step}:{kill_rank}@0,"
              f"kill_in_save:{save_step}:{save_rank}@1,stall:{stall_step}:1@2")

    def wake(output, processes):  # only spares torchrun's 30 s wait before it SIGKILLs a stopped worker
        if "no answer from" in output:
            for p in processes:
                if p.status() == psutil.STATUS_STOPPED:
                    p.send_signal(signal.SIGCONT)

    # four attempts in one job (~140 s on an idle 2-core machine): twice one job's hang guard, as a crowded one needs
    job = run_torchrun([ROOT / "tests/support/faults.py", "--config", write_recipe(tiny_root, work)], max_restarts=3,
                       env={**ENV, "ASVR_FAULTS": faults}, on_poll=wake, timeout=600)
    assert job.returncode == 0, job.output[-4000:]
    assert not job.survivors, f"processes outlived the job: {job.survivors}"
    assert "[faults] attempt 3: " in job.output and "[faults] attempt 4: " not in job.output, faults
    return FaultyJob(job.output, work / "run", kill_rank, kill_step, save_rank, save_step, stall_step)


def test_worker_killed_mid_step_restarts_and_ends_bitwise_equal(fault_reference, faulty):
    """A random rank SIGKILLed mid-step at a random step (after its save at step 2 needed its one
    retry: ENOSPC): torchrun restarts both workers, which resume from the newest checkpoint."""
    rank, step, first = faulty.kill_rank, faulty.kill_step, faulty.attempt(0)
    assert f"[faults] rank {rank}: SIGKILL" in first, (rank, step)
    assert (f"checkpoint iter_0000002 was not written (writing: rank {rank}: RuntimeError: Worker failure: "
            f"[Errno 28] No space left on device); retrying once") in first
    resumed = SAVE_INTERVAL * ((step - 1) // SAVE_INTERVAL)
    assert f"resumed from {faulty.run}/iter_{resumed:07d} at step {resumed}" in faulty.attempt(1), (rank, step)
    assert_same_final_state(fault_reference, faulty.run)


def test_worker_killed_during_a_save_restarts_and_ends_bitwise_equal(fault_reference, faulty):
    """A random rank SIGKILLed in a random save, its shards written, the checkpoint not yet published:
    the restart removes the unfinished save and resumes from the one before."""
    rank, step = faulty.save_rank, faulty.save_step
    assert f"[faults] rank {rank}: SIGKILL" in faulty.attempt(1), (rank, step)
    restarted = faulty.attempt(2)
    assert f"removed {faulty.run}/iter_{step:07d}.tmp, left by a save that did not finish" in restarted
    before = step - SAVE_INTERVAL
    assert f"resumed from {faulty.run}/iter_{before:07d} at step {before}" in restarted
    assert_same_final_state(fault_reference, faulty.run)


def test_stalled_rank_is_named_within_the_timeout_and_the_job_recovers(fault_reference, faulty):
    """Rank 1 SIGSTOPped at a step: rank 0 exits naming its wait after TIMEOUT_S, torchrun restarts
    the job, which ends as the reference."""
    stalled = faulty.attempt(2)
    assert "[faults] rank 1: SIGSTOP" in stalled
    named = re.findall(r"^rank 0: .*$", stalled + faulty.attempt(3), re.MULTILINE)
    assert named == [f"rank 0: no answer from the ranks of this model replica within {TIMEOUT_S} s during the "
                     "agreement on the step's unreadable images (train.distributed_timeout_minutes)"], named
    before = faulty.stall_step - 1
    assert f"resumed from {faulty.run}/iter_{before:07d} at step {before}" in faulty.attempt(3)
    assert_same_final_state(fault_reference, faulty.run)


def _train(config, faults=(), log=None):
    """loop.run in this rank with ``faults`` (tests/support/faults.py); stdout and stderr into ``log``."""
    import os

    from tests.support import faults as injected
    from megatron_asvr.training import loop

    if log is not None:
        out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(out, 1)
        os.dup2(out, 2)
    injected.install(list(faults))
    return loop.run(config)


def test_damaged_checkpoint_is_passed_over_for_the_previous_one(fault_reference, tiny_root, tmp_path):
    """The final checkpoint's largest shard cut short after it was written: the run says so,
    resumes from the one before, and ends as the reference."""
    save_dir = tmp_path / "run"
    shutil.copytree(fault_reference, save_dir)
    shard = max((save_dir / f"iter_{STEPS:07d}/dist").glob("*.distcp"), key=lambda p: p.stat().st_size)
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    log = tmp_path / "log"
    history = run_ranks(_train, 2, fault_config(tiny_root, save_dir), log=str(log))[-1]["history"]
    warning = (f"warning: checkpoint {save_dir}/iter_{STEPS:07d} is damaged (dist/{shard.name} is {size // 2:,} "
               f"bytes, {size:,} were written): passed over")
    assert log.read_text().count(warning) == 1  # rank 0 chooses for every rank
    assert [h["step"] for h in history] == [STEPS - 1, STEPS]
    assert_same_final_state(fault_reference, save_dir)


def test_checkpoint_write_failures_keep_latest_and_follow_the_policy(tiny_root, tmp_path):
    """One rank, a save every 2 of 4 steps. (a) ENOSPC twice at step 4: one line, stop, `latest` at
    step 2. (b) a writer process killed in step 4's save: the save hangs, the watchdog names it.
    (c) ENOSPC twice again with save_failure=continue: the run ends, `latest` still at step 2."""
    save_dir = tmp_path / "run"
    config = fault_config(tiny_root, save_dir, ParallelConfig(), 0, steps=4, distributed_timeout_minutes=0.15)
    with pytest.raises(MultiRankError) as stopped:
        run_ranks(_train, 1, config, faults=[("enospc", (4, 0, 2))])
    assert ("CheckpointWriteError: checkpoint iter_0000004 was not written (writing: rank 0: RuntimeError: Worker "
            "failure: [Errno 28] No space left on device), twice; stopped (train.save_failure=stop); latest is "
            "still iter_0000002") in str(stopped.value)
    assert (save_dir / "latest").read_text() == "iter_0000002"
    assert sorted(p.name for p in save_dir.glob("iter_*")) == ["iter_0000002"]

    logs = [tmp_path / "hang.log", tmp_path / "continue.log"]
    with pytest.raises(MultiRankError, match="died with exit code 1"):
        run_ranks(_train, 1, config, faults=[("kill_writer", (4, 0))], log=str(logs[0]))
    out = logs[0].read_text()
    assert f"resumed from {save_dir}/iter_0000002 at step 2" in out and (save_dir / "iter_0000004.tmp").is_dir()
    assert re.findall(r"^rank 0: no answer.*$", out, re.MULTILINE) == [
        "rank 0: no answer from every rank and this rank's checkpoint writers within 9 s during the save of "
        "iter_0000004 (train.distributed_timeout_minutes)"]

    result = run_ranks(_train, 1, dataclasses.replace(config, train=dataclasses.replace(
        config.train, save_failure="continue")), faults=[("enospc", (4, 0, 2))], log=str(logs[1]))[0]
    out = logs[1].read_text()
    assert f"removed {save_dir}/iter_0000004.tmp, left by a save that did not finish" in out
    assert [h["step"] for h in result["history"]] == [3, 4]
    assert result["checkpoint"] == str(save_dir / "iter_0000002")
    assert ("twice; training on (train.save_failure=continue); latest is still iter_0000002") in out
    assert sorted(p.name for p in save_dir.glob("iter_*")) == ["iter_0000002"]


def test_unreadable_image_is_substituted_and_counted_or_stops_the_run(tiny_root, tmp_path):
    """An image emptied after preprocessing: with PP=2 the first stage finds it, both stages mask its
    samples (the count is the whole job's, so both agreed); with data.unreadable_image=stop the run
    ends naming the record."""
    images = tmp_path / "images"
    shutil.copytree(Path(tiny_root) / "data/images", images)
    shards = ShardDataset(Path(tiny_root) / "shards")
    order = GlobalBatchOrder(len(shards), 4, 1234)
    first = shards[int(order.batch(0)[0])]
    (images / first.images[0]).write_bytes(b"")
    expected = [sum(first.images[0] in shards[int(i)].images for i in order.batch(k)) for k in range(3)]
    config = fault_config(tiny_root, tmp_path / "pp2", ParallelConfig(pipeline_parallel=2), 0, steps=3)
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, image_root=str(images)))
    history = run_ranks(_train, 2, config)[-1]["history"]
    assert [h["unreadable_samples"] for h in history] == expected and expected[0] >= 1
    assert all(np.isfinite(h["loss/text"]) for h in history)

    stop = dataclasses.replace(config, parallel=ParallelConfig(), train=dataclasses.replace(
        config.train, save_dir=str(tmp_path / "stop")), data=dataclasses.replace(config.data, unreadable_image="stop"))
    with pytest.raises(MultiRankError, match=re.escape(f"DataLoaderError: sample {first.id!r}: ") + ".*"
                       + re.escape(f"{first.images[0]}: cannot load image") + r".*\(data.unreadable_image=stop\)"):
        run_ranks(_train, 1, stop)


def test_launchers_are_bash_and_python(tmp_path):
    """Every launcher parses as bash and as Python; bash runs torchrun through launch/torchrun_wrapper.py
    with the c10d rendezvous, its store on node 0 (a stub python3 records the arguments); Python trains
    the launcher's recipe (tools/train.py's usage answers --help)."""
    stub = tmp_path / "bin/python3"
    stub.parent.mkdir()
    stub.write_text('#!/bin/sh\necho "python3 $*"\n')
    stub.chmod(0o755)
    env = {"PATH": f"{stub.parent}:/usr/bin:/bin", "GPUS_PER_NODE": "2", "MASTER_PORT": "1234", "VENV": "none"}
    for launcher in sorted((ROOT / "launch").glob("*.sh")):
        text = launcher.read_text()
        if "run_recipe" not in text or launcher.name == "multinode.sh":
            continue
        recipe = re.search(r'^recipe="(configs/[^"]+)"$', text, re.MULTILINE).group(1)
        assert (ROOT / recipe).is_file()
        compile(text, str(launcher), "exec")
        bash = subprocess.run(["bash", launcher, "--set", "train.steps=1"], env=env, capture_output=True, text=True)
        assert bash.returncode == 0, bash.stderr
        assert bash.stdout.splitlines()[-1] == (
            "python3 launch/torchrun_wrapper.py --nnodes 1 --nproc_per_node 2 --rdzv-backend c10d --rdzv-endpoint "
            "127.0.0.1:1234 --rdzv-id asvr --rdzv-conf is_host=1 --max-restarts 0 --shutdown-timeout 30 "
            f"tools/train.py --config {recipe} --set train.steps=1")
        python = subprocess.run([sys.executable, launcher, "--help"], capture_output=True,
                                text=True, env={**ENV, "PATH": "/usr/bin:/bin"}, cwd=tmp_path)
        assert python.returncode == 0 and python.stdout.startswith("usage: train.py"), python.stderr[-2000:]
    node_1 = {**env, "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "host0", "MAX_RESTARTS": "3",
              "SHUTDOWN_TIMEOUT": "90", "RDZV_ID": "job7", "RDZV_CONF": "join_timeout=1800"}
    bash = subprocess.run(["bash", ROOT / "launch/pretrain_7b.sh"], env=node_1, capture_output=True, text=True)
    assert bash.stdout.splitlines()[-1] == (
        "python3 launch/torchrun_wrapper.py --nnodes 2 --nproc_per_node 2 --rdzv-backend c10d --rdzv-endpoint "
        "host0:1234 --rdzv-id job7 --rdzv-conf is_host=0,join_timeout=1800 --max-restarts 3 --shutdown-timeout 90 "
        "tools/train.py --config configs/vicuna7b_stage1.yaml"), bash.stderr


def test_watchdog_names_the_wait_and_reports_a_slow_step(monkeypatch):
    from megatron_asvr.runtime import waits

    now = [100.0]
    monkeypatch.setattr(waits, "_clock", lambda: now[0])
    dog = waits.Watchdog(rank=3, timeout_s=20, slow_factor=4)
    for number in range(1, 6):
        with dog.step(number):
            now[0] += 1.0
    with dog.step(6), waits.waiting_for("the data-parallel group", "step 6's all-reduce"):
        now[0] += 4.5
        assert dog.check(now[0]) == (None, "rank 3: step 6 has run 4.5 s, more than 4 x the median step (1.00 s), "
                                           "during step 6's all-reduce")
        assert dog.check(now[0]) == (None, None)  # once per step
        now[0] += 16
        assert dog.check(now[0])[0] == ("rank 3: no answer from the data-parallel group within 20 s during "
                                        "step 6's all-reduce (train.distributed_timeout_minutes)")
    assert dog.check(now[0] + 100) == (None, None)  # no wait in progress


def test_a_lost_peer_is_one_line_and_other_errors_pass(monkeypatch):
    from megatron_asvr.runtime.waits import PeerLost, waiting_for
    from megatron_asvr.training.trainer import _model_groups

    monkeypatch.setenv("RANK", "1")
    gloo = "[../third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:46792: Connection reset by peer"
    with pytest.raises(PeerLost) as lost:
        with waiting_for(_model_groups(ParallelConfig(2, 2), 2), "step 2's forward and backward"):
            raise RuntimeError(gloo)
    assert str(lost.value) == (f"rank 1: lost the tensor-, pipeline- and data-parallel groups during step 2's "
                               f"forward and backward ({gloo}); another rank ended")
    with pytest.raises(RuntimeError, match="^shapes differ$"):
        with waiting_for(_model_groups(ParallelConfig(tensor_parallel=2), 1), "step 2's forward and backward"):
            raise RuntimeError("shapes differ")
    assert _model_groups(ParallelConfig(tensor_parallel=2), 1) == "the tensor-parallel group"


def test_unreadable_samples_lose_their_text_and_visual_loss():
    """Sample 1 of 3 (one image of 3 positions, 3 supervised tokens each) masked, padded and packed."""
    from megatron_asvr.data.batch import build_micro_batch
    from megatron_asvr.data.packing import MicroPlan
    from megatron_asvr.data.sequence import build_sequence
    from megatron_asvr.data.unreadable_images import without_loss
    from megatron_asvr.tokenizers.templates import IMAGE_PLACEHOLDER

    sequences = [build_sequence([1, IMAGE_PLACEHOLDER, 5, 6, 7], [0, 0, 1, 1, 1], [3], 16) for _ in range(3)]
    codes = {"semantic": [torch.zeros(3, 2, dtype=torch.long) for _ in range(3)]}
    for plan, lost_positions in ((MicroPlan((0, 1, 2), 8), (slice(1, 2), slice(None))),
                                 (MicroPlan((0, 1, 2), 24, packed=True), (slice(None), slice(6, 12)))):
        batch = build_micro_batch(sequences, plan, codes=codes, depths={"semantic": 2})
        masked = without_loss(batch, [False, True, False])
        assert (batch.loss_mask.sum(), masked.loss_mask.sum()) == (9, 6)
        assert masked.loss_mask[lost_positions].sum() == 0
        assert masked.visual_rows.tolist() == [0, 1, 2, 6, 7, 8] and batch.visual_rows.numel() == 9
        assert without_loss(batch, [False] * 3) is batch


def _fake_checkpoint(directory: Path, shard_bytes: int) -> None:
    (directory / "dist").mkdir(parents=True)
    (directory / "model_config.json").write_text("{}")
    (directory / "dist/metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist",
                                                              "sharded_backend_version": 1,
                                                              "common_backend": "torch", "common_backend_version": 1}))
    (directory / "dist/__0_0.distcp").write_bytes(b"x" * shard_bytes)


def test_integrity_manifest_finds_cut_changed_and_lost_files(tmp_path, capsys, monkeypatch):
    from megatron_asvr.checkpoint import directory, manifest

    monkeypatch.setattr(manifest, "HASHED_MAX_BYTES", 100)  # the shard: sizes only
    for step in (2, 4):
        _fake_checkpoint(tmp_path / f"iter_{step:07d}", 1000)
        manifest.write_manifest(tmp_path / f"iter_{step:07d}")
    (tmp_path / "latest").write_text("iter_0000004")
    (tmp_path / "iter_0000006.tmp").mkdir()
    (tmp_path / "latest.tmp").write_text("iter_0000006")
    newest = tmp_path / "iter_0000004"
    assert manifest.damage(newest) is None and directory.find_latest(tmp_path) == newest

    (newest / "model_config.json").write_text("[]")  # same size, other bytes: hashed
    assert manifest.damage(newest) == "model_config.json changed after it was written (SHA-256 differs)"
    (newest / "model_config.json").write_text("{}")
    with open(newest / "dist/__0_0.distcp", "r+b") as f:
        f.truncate(600)
    assert directory.find_latest(tmp_path) == tmp_path / "iter_0000002"
    assert capsys.readouterr().err == (f"warning: checkpoint {newest} is damaged (dist/__0_0.distcp is 600 bytes, "
                                       f"1,000 were written): passed over\n")
    (newest / "dist/__0_0.distcp").unlink()
    assert manifest.damage(newest) == "dist/__0_0.distcp is missing"
    assert directory.remove_unfinished(tmp_path) == ["iter_0000006.tmp", "latest.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000002", "iter_0000004", "latest"]
