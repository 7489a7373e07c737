"""The training loop end to end on a tiny corpus: exact resume, crash-safe checkpoints,
resharding on resume, the NaN guard."""

import dataclasses
import json
import math
import os
import shutil
import signal

import pytest
import torch

from tests.support.harness import ALL_FAST_PATHS
from tests.support.multirank import MultiRankError, run_ranks
from tests.support.tiny_run import tiny_run_config
from megatron_asvr.config import FastPathsConfig, ParallelConfig


def _train(config, kill_at_step=None, kill_in_save_of=None, poison_step=None, log=None):
    """loop.run in this rank; optionally SIGKILL itself when a step's batches are loaded or inside
    a checkpoint write, or poison one step's images with NaN; stdout and stderr into ``log``."""
    from megatron_asvr.data.loader import TrainLoader
    from megatron_asvr.checkpoint import training_state
    from megatron_asvr.training import loop

    next_step = TrainLoader.next_step

    def faulty_next_step(self):
        micro = next_step(self)
        step = self.consumed_samples // self.order.global_batch  # the step these batches feed
        if step == kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == poison_step:
            for batch in micro:
                if batch.images is not None:
                    batch.images.fill_(float("nan"))
        return micro

    TrainLoader.next_step = faulty_next_step
    if log is not None:
        out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(out, 1)
        os.dup2(out, 2)
    if kill_in_save_of is not None:
        write_json = training_state._write_json

        def dying_write(path, data):
            if f"iter_{kill_in_save_of:07d}.tmp" in str(path):  # after dist/ was written, before the rename
                os.kill(os.getpid(), signal.SIGKILL)
            write_json(path, data)

        training_state._write_json = dying_write
    return loop.run(config)


def _final_params(config, checkpoint_dir):
    """Canonical parameters of a checkpoint, loaded at ``config``'s layout."""
    from megatron_asvr import runtime
    from megatron_asvr.model.canonical import full_state
    from megatron_asvr.model.vlm import stage_builder
    from megatron_asvr.checkpoint.model import load_weights
    from megatron_asvr.training.loop import load_codebooks
    from megatron_asvr.model.chunks import build_model_chunks

    books, config = load_codebooks(config)
    model = config.model
    info = runtime.initialize(config.parallel)
    chunks = build_model_chunks(stage_builder(model, config.parallel, "local", books), info.device)
    load_weights(chunks, checkpoint_dir)
    state = full_state(chunks)
    runtime.destroy()
    return state


def _losses(history):
    return {h["step"]: (h["loss/text"], h["loss/visual_semantic"]) for h in history}


def test_sigkill_then_automatic_resume_is_exact(tiny_root, tmp_path):
    """12 steps straight vs 5 steps, SIGKILL in step 6, automatic resume to 12 (TP=2), every fast path on
    (the fused AdamW's device-side step survives the checkpoint): identical per-step losses and bitwise
    identical final weights."""
    tp2 = ParallelConfig(tensor_parallel=2)
    config = tiny_run_config(tiny_root, tmp_path / "straight", steps=12, save_interval=5)
    straight = dataclasses.replace(config, parallel=tp2,
                                   train=dataclasses.replace(config.train, fast_paths=ALL_FAST_PATHS))
    resumed = dataclasses.replace(straight, train=dataclasses.replace(straight.train,
                                                                      save_dir=str(tmp_path / "resumed")))
    reference = run_ranks(_train, 2, straight)[-1]
    with pytest.raises(MultiRankError, match="died"):
        run_ranks(_train, 2, resumed, kill_at_step=6)
    assert (tmp_path / "resumed/latest").read_text() == "iter_0000005"
    second = run_ranks(_train, 2, resumed)[-1]
    assert [h["step"] for h in second["history"]] == list(range(6, 13))
    expected = _losses(reference["history"])
    assert _losses(second["history"]) == {s: expected[s] for s in range(6, 13)}
    single = dataclasses.replace(straight, parallel=ParallelConfig())
    a = run_ranks(_final_params, 1, single, reference["checkpoint"])[0]
    b = run_ranks(_final_params, 1, dataclasses.replace(straight, parallel=ParallelConfig()), second["checkpoint"])[0]
    assert sorted(a) == sorted(b) and all(torch.equal(a[n], b[n]) for n in a)


def test_kill_during_checkpoint_write_keeps_the_previous_one(tiny_root, tmp_path):
    config = tiny_run_config(tiny_root, tmp_path / "run", steps=6, save_interval=3)
    with pytest.raises(MultiRankError, match="died"):
        run_ranks(_train, 1, config, kill_in_save_of=6)
    save_dir = tmp_path / "run"
    assert (save_dir / "latest").read_text() == "iter_0000003"
    assert (save_dir / "iter_0000006.tmp").is_dir() and not (save_dir / "iter_0000006").exists()
    second = run_ranks(_train, 1, config)[0]
    assert [h["step"] for h in second["history"]] == [4, 5, 6]
    assert (save_dir / "latest").read_text() == "iter_0000006"
    assert json.loads((save_dir / "iter_0000006/model_config.json").read_text())["llm"]["hidden_size"] == 64


def test_resume_at_other_layouts(tiny_root, tmp_path):
    """3 steps at TP=2 x PP=2; step 4 resumed at TP=2 x PP=2, TP=1 x PP=1 and TP=1 x PP=2 x DP=2
    (weights and distributed-optimizer-free Adam state resharded): the same losses (1e-6). The resume's
    line names the new layout (and train.steps 3 -> 4, the checkpoint's lr schedule going on)."""
    base = tiny_run_config(tiny_root, tmp_path / "tp2pp2", steps=3)
    run_ranks(_train, 4, dataclasses.replace(base, parallel=ParallelConfig(2, 2)))
    losses = {}
    for name, world, parallel in [("tp2pp2", 4, ParallelConfig(2, 2)), ("tp1pp1", 1, ParallelConfig()),
                                  ("pp2dp2", 4, ParallelConfig(pipeline_parallel=2))]:
        save_dir = tmp_path / name
        if name != "tp2pp2":
            save_dir.mkdir()
            os.symlink(tmp_path / "tp2pp2/iter_0000003", save_dir / "iter_0000003")
        config = tiny_run_config(tiny_root, save_dir, steps=4, resume_lr_schedule="checkpoint")
        if name == "pp2dp2":  # and the head's depth MLPs batched: the same checkpoint keys, optimizer states too
            config = dataclasses.replace(config, train=dataclasses.replace(
                config.train, fast_paths=FastPathsConfig(batched_head_mlp=True)))
        log = tmp_path / f"{name}.log"
        result = run_ranks(_train, world, dataclasses.replace(config, parallel=parallel), log=str(log))[-1]
        assert [h["step"] for h in result["history"]] == [4]
        layout = {"tp2pp2": "", "tp1pp1": "TP=1 x PP=1 x DP=1", "pp2dp2": "TP=1 x PP=2 x DP=2"}[name]
        changes = [line for line in log.read_text().splitlines() if line.startswith("resume from")]
        switch = "train.fast_paths.batched_head_mlp auto -> True: honoured, from step 4; " if name == "pp2dp2" else ""
        assert changes == ["resume from iter_0000003 with a changed recipe: " + switch
                           + "train.steps 3 -> 4: honoured, the run "
                           "stops at step 4 (and the lr schedule's length follows); "
                           + (f"layout TP=2 x PP=2 x DP=1 -> {layout}: honoured, weights and optimizer resharded, the "
                              "RNG reseeded; " if layout else "")
                           + "lr schedule (lr_decay_steps 3 -> 4, wd_incr_steps 3 -> 4): honoured, the checkpoint's "
                           "goes on (train.resume_lr_schedule=checkpoint)"], changes
        losses[name] = _losses(result["history"])[4]
    for name in ("tp1pp1", "pp2dp2"):
        assert all(abs(a - b) <= 1e-6 for a, b in zip(losses[name], losses["tp2pp2"])), (name, losses)


def _cosine_lr(max_lr, decay_steps, step):
    """megatron's cosine schedule without warm-up or floor, at scheduler step ``step``."""
    return max_lr * 0.5 * (math.cos(math.pi * step / decay_steps) + 1)


def test_a_resume_with_a_changed_recipe_names_each_change_and_follows_its_rule(tiny_root, tmp_path):
    """Saved at step 4 of 8 (global batch 4, lr 1e-3 over 8 steps), killed in step 5; the same command
    again with global batch 2, 6 steps and lr 5e-4. By default the changed lr schedule is refused, in
    one line naming each change; with train.resume_lr_schedule=config the run takes the new batch and
    stops at step 6, its lr the new schedule's from its step 4 on; with =checkpoint the old schedule
    goes on (megatron's use_checkpoint_opt_param_scheduler) and it still stops at step 6."""
    first = tiny_run_config(tiny_root, tmp_path / "run", steps=8, save_interval=4)
    with pytest.raises(MultiRankError, match="died"):
        run_ranks(_train, 1, first, kill_at_step=5)
    changes = ("resume from iter_0000004 with a changed recipe: train.global_batch 4 -> 2: honoured, the data goes "
               "on from sample 16 in batches of 2; train.lr 0.001 -> 0.0005: see the lr schedule; train.save_interval "
               "4 -> 0: honoured, from step 5; train.steps 8 -> 6: "
               "honoured, the run stops at step 6 (and the lr schedule's length follows); lr schedule (max_lr 0.001 "
               "-> 0.0005, lr_decay_steps 8 -> 6, wd_incr_steps 8 -> 6): ")
    changed = {"global_batch": 2, "steps": 6, "lr": 5e-4}
    with pytest.raises(MultiRankError) as refused:
        run_ranks(_train, 1, tiny_run_config(tiny_root, tmp_path / "run", **changed))
    assert (f"ConfigError: {changes}REFUSED, say which side wins: train.resume_lr_schedule=config or checkpoint. "
            f"Restore the refused settings, or start a new run (another train.save_dir) from its weights with "
            f"train.load={tmp_path}/run/iter_0000004") in str(refused.value), str(refused.value)[-1500:]
    for side, lrs in (("config", [_cosine_lr(5e-4, 6, 4), _cosine_lr(5e-4, 6, 5)]),
                      ("checkpoint", [_cosine_lr(1e-3, 8, 4), _cosine_lr(1e-3, 8, 5)])):
        save_dir, log = tmp_path / side, tmp_path / f"{side}.log"
        shutil.copytree(tmp_path / "run", save_dir)  # the save_dir a checkpoint was found in is no change
        history = run_ranks(_train, 1, tiny_run_config(tiny_root, save_dir, resume_lr_schedule=side, **changed),
                            log=str(log))[0]["history"]
        said = [line for line in log.read_text().splitlines() if line.startswith("resume from")]
        assert said == [changes + f"honoured, the {side}'s" + (", from step 5 on" if side == "config" else " goes on")
                        + f" (train.resume_lr_schedule={side})"], said
        assert [h["step"] for h in history] == [5, 6] and (save_dir / "latest").read_text() == "iter_0000006"
        assert [h["lr"] for h in history] == pytest.approx(lrs, rel=1e-12), side
        common = torch.load(save_dir / "iter_0000006/dist/common.pt", weights_only=False)
        assert common["consumed_samples"] == 16 + 2 * 2


def _checkpoints_finite(config, save_dir):
    from pathlib import Path

    return [torch.isfinite(v).all().item() for d in sorted(Path(save_dir).glob("iter_*"))
            for v in _final_params(config, d).values()]


def test_nan_step_is_skipped_and_never_checkpointed(tiny_root, tmp_path):
    config = tiny_run_config(tiny_root, tmp_path / "nan", steps=4, save_interval=1, keep_last=10)
    history = run_ranks(_train, 1, config, poison_step=2)[0]["history"]
    assert [h["skipped"] for h in history] == [False, True, False, False]
    assert all(torch.isfinite(torch.tensor(h["loss/text"])) for i, h in enumerate(history) if i != 1)
    finite = run_ranks(_checkpoints_finite, 1, config, str(tmp_path / "nan"))[0]
    assert finite and all(finite)

    stop = tiny_run_config(tiny_root, tmp_path / "stop", steps=4, nan_policy="stop")
    with pytest.raises(MultiRankError, match="NonFiniteError: step 2: non-finite loss or gradients"):
        run_ranks(_train, 1, stop, poison_step=2)


def test_packed_training_equals_full_padding_and_reports_its_fill(tiny_root, tmp_path):
    """data.batching through the whole loop at PP=2: 3 steps packed and padded to the longest give
    the losses of every sample padded to the full length (1e-5), and each run reports its fill."""
    results = {}
    for batching in ("pad_full", "pack", "pad_longest"):
        config = tiny_run_config(tiny_root, tmp_path / batching, steps=3)
        config = dataclasses.replace(config, parallel=ParallelConfig(pipeline_parallel=2),
                                     data=dataclasses.replace(config.data, batching=batching))
        results[batching] = _losses(run_ranks(_train, 2, config)[-1]["history"])
    full = results["pad_full"]
    assert sorted(full) == [1, 2, 3]
    for batching in ("pack", "pad_longest"):
        assert sorted(results[batching]) == sorted(full)
        assert all(abs(a - b) <= 1e-5 for s in full for a, b in zip(results[batching][s], full[s])), results
    report = json.loads((tmp_path / "pack/batching_report.json").read_text())
    assert report["batching"] == "pack" and report["samples"] == 50 * 4  # global batch 4, one rank
    assert report["real_positions"] <= report["computed_positions"] and 0.5 < report["fill"] <= 1.0
