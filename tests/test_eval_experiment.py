"""The experiment's pieces without training: the commands of every (arm, seed, stage), the steps
read from the recipes, the resume rules, and the report over seeds (records, mean ± std,
tables, figures) from fabricated TensorBoard logs and results.json files."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megatron_asvr.config import load_run_config
from megatron_asvr.evaluation import experiment, plot
from megatron_asvr.evaluation.experiment import (
    ExperimentConfig,
    ExperimentError,
    Timings,
    _finished,
    collect,
    evaluate_command,
    run_experiment,
    train_command,
    train_and_evaluate,
)
from megatron_asvr.evaluation.experiment_report import accuracy_png, curves_png

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SEEDS = (1, 2, 3)
SEED_SHIFT = {1: -0.1, 2: 0.0, 3: 0.1}  # per-seed offset: mean 0, sample std (ddof=1) 0.1
ARM_SHIFT = {"llava": 0.0, "asvr": -0.5}  # ASVR's text loss 0.5 lower
GREEDY = {"llava": 0.3, "asvr": 0.5}  # mean greedy accuracy over the seeds


def _config(tmp_path, **changes):
    defaults = dict(stage1_config=CONFIGS / "demo_stage1.yaml", stage2_config=CONFIGS / "demo_stage2.yaml")
    return ExperimentConfig(demo_dir=tmp_path / "demo", out_dir=tmp_path / "out", **{**defaults, **changes})


def _sets(command):
    return [command[i + 1] for i, arg in enumerate(command) if arg == "--set"]


def _value(sets, key):
    return next(s.split("=", 1)[1] for s in sets if s.startswith(f"{key}="))


def test_every_run_has_the_same_budget_and_its_own_seed(tmp_path):
    config = _config(tmp_path, stage1_steps=7, stage2_steps=9, stage2_overrides=("train.lr=1.0e-3",)).resolved()
    assert config.eval_interval == 2  # a quarter of the stage-2 steps
    for stage in (1, 2):
        runs = {(arm, seed): _sets(train_command(config, arm, seed, stage))
                for arm in ("llava", "asvr") for seed in SEEDS}
        for (arm, seed), sets in runs.items():
            own = f"/out/{arm}/seed{seed}/"
            assert _value(sets, "train.seed") == str(seed)
            assert _value(sets, "train.steps") == str(7 if stage == 1 else 9)
            assert own in _value(sets, "train.save_dir")
            loads = tmp_path / "demo/init" if stage == 1 else config.run_dir(arm, seed) / "stage1"
            assert _value(sets, "train.load") == str(loads)
            assert ("train.lr=1.0e-3" in sets) == (stage == 2)
            # the same budget as ASVR at seed 1: only the seed, the directories and LLaVA's visual loss differ
            normalised = {s.replace(own, "/out/asvr/seed1/").replace(f"train.seed={seed}", "train.seed=1")
                          for s in sets}
            assert normalised - set(runs["asvr", 1]) == ({"model.asvr.visual_loss=false"} if arm == "llava" else set())
            assert set(runs["asvr", 1]) - normalised == set()
    stage2 = _sets(train_command(config, "asvr", 2, 2))
    assert _value(stage2, "train.eval_interval") == "2"
    assert _value(stage2, "train.eval_data") == str(tmp_path / "demo/data/eval.jsonl")
    command = evaluate_command(config, "llava", 3)
    assert command[command.index("--checkpoint") + 1] == str(tmp_path / "out/llava/seed3/stage2")
    assert command[command.index("--method") + 1] == "generate"
    assert command[command.index("--out") + 1] == str(tmp_path / "out/llava/seed3/eval")


def test_steps_come_from_the_recipes_unless_given(tmp_path):
    resolved = _config(tmp_path).resolved()
    assert resolved.stage1_steps == load_run_config(CONFIGS / "demo_stage1.yaml").train.steps
    assert resolved.stage2_steps == load_run_config(CONFIGS / "demo_stage2.yaml").train.steps
    overridden = _config(tmp_path, stage1_steps=5, stage2_overrides=("train.steps=12",)).resolved()
    assert (overridden.stage1_steps, overridden.stage2_steps, overridden.eval_interval) == (5, 12, 3)


def test_missing_demo_inputs_are_named(tmp_path):
    (tmp_path / "demo/data").mkdir(parents=True)
    (tmp_path / "demo/data/eval.jsonl").write_text("")
    with pytest.raises(ExperimentError, match=r"lacks data/images, tokenizer, shards/pretrain.*, init: run launch"):
        _config(tmp_path).validate()


def _checkpoint(save_dir, steps):
    """A complete (empty) checkpoint at ``steps`` named by ``latest``."""
    (save_dir / f"iter_{steps:07d}/dist").mkdir(parents=True)
    (save_dir / f"iter_{steps:07d}/model_config.json").write_text("{}")
    (save_dir / f"iter_{steps:07d}/dist/metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    (save_dir / "latest").write_text(f"iter_{steps:07d}")


def test_finished_run_is_recognised(tmp_path):
    save_dir = tmp_path / "run"
    assert not _finished(save_dir, 40)
    _checkpoint(save_dir, 40)
    assert _finished(save_dir, 40) and not _finished(save_dir, 60)


def test_resume_runs_only_what_is_missing(tmp_path, monkeypatch):
    config = _config(tmp_path, stage1_steps=3, stage2_steps=4).resolved()
    ran = []
    monkeypatch.setattr(experiment, "_run", lambda command, log: ran.append(log.name) or 1.5)
    run_dir = config.run_dir("asvr", 2)
    _checkpoint(run_dir / "stage1", 3)
    (run_dir / "eval").mkdir(parents=True)
    (run_dir / "eval/results.json").write_text("{}")  # of an earlier stage 2: evaluated again once it is trained
    timings = Timings(tmp_path / "out/timings.json")
    train_and_evaluate(config, "asvr", 2, timings)
    assert ran == ["asvr_seed2_stage2.log", "asvr_seed2_eval.log"]
    assert json.loads((tmp_path / "out/timings.json").read_text()) == {"asvr/seed2/stage2": 1.5, "asvr/seed2/eval": 1.5}
    _checkpoint(run_dir / "stage2", 4)
    ran.clear()
    train_and_evaluate(config, "asvr", 2, Timings(tmp_path / "out/timings.json"))
    assert ran == []
    (run_dir / "eval/results.json").unlink()
    train_and_evaluate(config, "asvr", 2, timings)
    assert ran == ["asvr_seed2_eval.log"]


def _text_loss(arm, seed, stage, step):
    return 10.0 / (step + stage) + ARM_SHIFT[arm] + SEED_SHIFT[seed]


def _fabricate(config):
    """Finished checkpoints, TensorBoard scalars, results.json and timings of every (arm, seed)."""
    from torch.utils.tensorboard import SummaryWriter

    for arm in ("llava", "asvr"):
        for seed in SEEDS:
            run_dir = config.run_dir(arm, seed)
            for stage, steps in ((1, config.stage1_steps), (2, config.stage2_steps)):
                _checkpoint(run_dir / f"stage{stage}", steps)
                with SummaryWriter(str(run_dir / f"stage{stage}/tensorboard")) as writer:
                    for step in range(1, steps + 1):
                        writer.add_scalar("loss/text", _text_loss(arm, seed, stage, step), step)
                        if arm == "asvr":
                            writer.add_scalar("loss/visual_semantic", 4.0 - 0.25 * step + SEED_SHIFT[seed], step)
                        if stage == 2 and step % 2 == 0:
                            writer.add_scalar("eval/accuracy", 0.125 * step + SEED_SHIFT[seed], step)
                            writer.add_scalar("eval/chance", 0.375, step)
                            writer.add_scalar("eval/true_choice_prob", 0.3 + 0.01 * step, step)
            accuracy = GREEDY[arm] + SEED_SHIFT[seed]
            metrics = {"accuracy": accuracy, "chance": 0.375, "majority": 0.45,
                       "color/accuracy": accuracy / 2, "color/chance": 0.25, "color/majority": 0.3,
                       "yes/no/accuracy": accuracy, "yes/no/chance": 0.5, "yes/no/majority": 0.6}
            (run_dir / "eval").mkdir(parents=True)
            (run_dir / "eval/results.json").write_text(json.dumps(
                {"benchmarks": {"jsonl": {"metrics": metrics, "questions": 12}}}))
    timings = {f"{arm}/seed{seed}/{part}": seconds for arm in ("llava", "asvr") for seed in SEEDS
               for part, seconds in (("stage1", 10.0 * seed), ("stage2", 20.0), ("eval", 3.0))}
    (config.out_dir / "timings.json").write_text(json.dumps(timings))
    for path in experiment.DEMO_INPUTS:
        (config.demo_dir / path).mkdir(parents=True, exist_ok=True)


def _band(axes, label):
    """The (x, y) of the line labelled ``label`` and the band's lower and upper edge at each x."""
    line = next(line for line in axes.get_lines() if line.get_label().startswith(label))
    x, y = line.get_xdata(), line.get_ydata()
    vertices = axes.collections[axes.get_lines().index(line)].get_paths()[0].vertices  # [points, 2]
    edges = [sorted({round(v, 9) for v in vertices[vertices[:, 0] == step, 1]}) for step in x]
    return x, y, np.array([(e[0], e[-1]) for e in edges])


def test_report_over_seeds(tmp_path, monkeypatch):
    config = _config(tmp_path, stage1_steps=3, stage2_steps=4)
    _fabricate(config.resolved())
    monkeypatch.setattr(experiment, "_run", lambda command, log: pytest.fail(f"ran {command}: the runs are done"))
    record = run_experiment(config)

    llava, asvr = record["summary"]["llava"], record["summary"]["asvr"]
    assert llava["greedy/accuracy"] == pytest.approx({"mean": 0.3, "std": 0.1, "n": 3})  # std with ddof=1
    assert asvr["greedy/color/accuracy"] == pytest.approx({"mean": 0.25, "std": 0.05, "n": 3})
    # stage 2 of LLaVA at seed 2: 10 / (step + 2) for steps 1..4, the mean of the last 10 (all 4) steps
    assert record["seeds"]["llava"][2]["stage2_text_loss"] == pytest.approx((10 / 3 + 2.5 + 2.0 + 10 / 6) / 4)
    assert asvr["stage2_text_loss"] == pytest.approx({"mean": (10 / 3 + 2.5 + 2.0 + 10 / 6) / 4 - 0.5, "std": 0.1,
                                                      "n": 3})
    assert "stage2_visual_loss" not in llava and asvr["stage2_visual_loss"]["mean"] == pytest.approx(3.375)
    assert asvr["in_training/accuracy"] == pytest.approx({"mean": 0.5, "std": 0.1, "n": 3})
    assert asvr["train_seconds"] == pytest.approx({"mean": 40.0, "std": 10.0, "n": 3})  # stage 1 10 s x seed + 20 s

    table = (tmp_path / "out/experiment.md").read_text().splitlines()
    assert table[0].startswith("ASVR vs LLaVA on the demo data") and "seeds 1, 2, 3 per arm" in table[0]
    assert "mean ± std over seeds (std: sample, ddof=1)" in table[2]
    assert "| category | chance | majority | LLaVA (no visual loss) | ASVR |" in table
    assert "| all | 0.3750 | 0.4500 | 0.3000 ± 0.1000 | 0.5000 ± 0.1000 |" in table
    assert "| yes/no | 0.5000 | 0.6000 | 0.3000 ± 0.1000 | 0.5000 ± 0.1000 |" in table
    assert "| stage-2 visual loss (mean of last 10 steps) | - | 3.3750 ± 0.1000 |" in table
    assert "| training wall time per seed (s) | 40.0 ± 10.0 | 40.0 ± 10.0 |" in table
    assert "| ASVR | 3 | 0.6000 | 0.3000 | 0.6000 | 3.2111 | 1.9750 | 3.4750 | 50.0 |" in table  # per seed
    assert table[-1] == "Total wall time of training and evaluation: 4.3 min"  # 6 x 3 s eval + 2 x 120 s training

    width, height = plot.PANEL_INCHES
    with Image.open(tmp_path / "out/curves.png") as curves, Image.open(tmp_path / "out/accuracy.png") as accuracy:
        assert curves.size == (round(3 * width * plot.DPI), round(height * plot.DPI))
        assert accuracy.size == tuple(round(v * plot.DPI) for v in plot.BAR_INCHES)

    results = collect(config.resolved(), Timings(tmp_path / "out/timings.json"))
    text, visual, accuracy = curves_png(results, 3).axes
    x, mean, edges = _band(text, "ASVR")
    expected = [_text_loss("asvr", 2, 1, s) for s in (1, 2, 3)] + [_text_loss("asvr", 2, 2, s) for s in (1, 2, 3, 4)]
    assert list(x) == [1, 2, 3, 4, 5, 6, 7] and mean == pytest.approx(expected)  # stage 2 after stage 1's 3 steps
    assert edges == pytest.approx(np.stack([mean - 0.1, mean + 0.1], 1))  # band: mean ± 1 std
    assert [line.get_xdata()[0] for line in text.get_lines() if line.get_linestyle() == ":"] == [3.5]  # stage boundary
    assert [line.get_label() for line in visual.get_lines() if line.get_linestyle() == "-"] == ["ASVR (3 seeds)"]
    x, mean, edges = _band(accuracy, "LLaVA")
    assert list(x) == [2, 4] and mean == pytest.approx([0.25, 0.5]) and edges[:, 1] - mean == pytest.approx(0.1)
    assert [line.get_ydata()[0] for line in accuracy.get_lines() if line.get_label() == "chance"] == [0.375]

    (bars,) = accuracy_png(results).axes
    assert [t.get_text() for t in bars.get_xticklabels()] == ["all", "color", "yes/no"]
    heights = {c.get_label(): [p.get_height() for p in c.patches] for c in bars.containers if hasattr(c, "patches")}
    assert heights["ASVR"] == pytest.approx([0.5, 0.25, 0.5])
    assert heights["LLaVA (no visual loss)"] == pytest.approx([0.3, 0.15, 0.3])
    errors = [c.lines[2][0].get_segments() for c in bars.containers if hasattr(c, "has_yerr")]  # per arm, per group
    lengths = [s[1][1] - s[0][1] for arm in errors for s in arm]
    assert lengths == pytest.approx([0.2, 0.1, 0.2] * 2)  # ± std
    chance = next(c for c in bars.collections if c.get_label() == "chance").get_segments()
    assert [s[0][1] for s in chance] == pytest.approx([0.375, 0.25, 0.5])
