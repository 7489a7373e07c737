"""The experiment's pieces without training: the two arms' commands, TensorBoard reading, the
summary table, the loss-curve PNG, and the resume check."""

import numpy as np
import pytest
from PIL import Image

from megatron_asvr.evaluation import plot
from megatron_asvr.evaluation.experiment import (
    ExperimentConfig,
    ExperimentError,
    _finished,
    curve_panels,
    evaluate_command,
    format_summary,
    read_scalars,
    summarize,
    train_command,
)


def _config(tmp_path, **changes):
    return ExperimentConfig(demo_dir=tmp_path / "demo", out_dir=tmp_path / "out", **changes)


def _sets(command):
    return [command[i + 1] for i, arg in enumerate(command) if arg == "--set"]


def test_arms_differ_only_in_the_visual_loss(tmp_path):
    config = _config(tmp_path, stage1_steps=7, stage2_steps=9, seed=5)
    for stage in (1, 2):
        llava, asvr = (_sets(train_command(config, arm, stage)) for arm in ("llava", "asvr"))
        own = {s for s in asvr if "/asvr/" in s}  # each arm's own output directories
        assert set(asvr) - set(llava) == own
        theirs = {s.replace("/asvr/", "/llava/") for s in own}
        assert set(llava) - set(asvr) == {"model.asvr.visual_loss=false"} | theirs
        assert f"train.steps={7 if stage == 1 else 9}" in asvr and "train.seed=5" in asvr and "train.seed=5" in llava
    stage2 = _sets(train_command(config, "asvr", 2))
    assert f"train.load={tmp_path / 'out/asvr/stage1'}" in stage2
    assert f"train.eval_interval={config.eval_interval}" in stage2
    assert "train.lr=1.0e-3" in stage2 and "train.lr=1.0e-3" not in _sets(train_command(config, "asvr", 1))
    assert f"train.eval_data={tmp_path / 'demo/data/eval.jsonl'}" in stage2
    command = evaluate_command(config, "llava", "likelihood")
    assert command[command.index("--checkpoint") + 1] == str(tmp_path / "out/llava/stage2")
    assert command[command.index("--method") + 1] == "likelihood"


def test_missing_demo_inputs_are_named(tmp_path):
    (tmp_path / "demo/data").mkdir(parents=True)
    (tmp_path / "demo/data/eval.jsonl").write_text("")
    with pytest.raises(ExperimentError, match=r"lacks data/images, tokenizer, shards/pretrain.*run launch/demo.sh"):
        _config(tmp_path).validate()


def test_finished_run_is_recognised(tmp_path):
    save_dir = tmp_path / "run"
    assert not _finished(save_dir, 40)
    (save_dir / "iter_0000040/dist").mkdir(parents=True)
    (save_dir / "iter_0000040/model_config.json").write_text("{}")
    (save_dir / "iter_0000040/dist/metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    (save_dir / "latest").write_text("iter_0000040")
    assert _finished(save_dir, 40) and not _finished(save_dir, 60)


def test_scalars_summary_table_and_plot(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    config = _config(tmp_path, stage1_steps=3, stage2_steps=4)
    curves = {}
    for arm, offset in (("llava", 0.0), ("asvr", -0.5)):
        curves[arm] = {}
        for stage, steps in ((1, 3), (2, 4)):
            log_dir = tmp_path / arm / f"stage{stage}"
            with SummaryWriter(str(log_dir)) as writer:
                for step in range(1, steps + 1):
                    writer.add_scalar("loss/text", 10.0 / (step + stage) + offset, step)
                    if arm == "asvr":
                        writer.add_scalar("loss/visual_semantic", 4.0 - 0.25 * step, step)
                    if stage == 2 and step % 2 == 0:
                        writer.add_scalar("eval/accuracy", 0.25 * step / 2 - offset, step)
                        writer.add_scalar("eval/true_choice_prob", 0.3 + 0.01 * step, step)
            curves[arm][stage] = read_scalars(log_dir)
    assert curves["asvr"][2]["eval/accuracy"] == [(2, 0.75), (4, 1.0)]
    steps, values = zip(*curves["llava"][1]["loss/text"])
    assert steps == (1, 2, 3) and values == pytest.approx([5.0, 10 / 3, 2.5])

    def evaluation(accuracy):
        metrics = {"accuracy": accuracy, "color/accuracy": accuracy / 2, "choice/accuracy": 0.5,
                   "yes/no/accuracy": 0.75}
        return {"benchmarks": {"jsonl": {"metrics": metrics, "questions": 12}}}

    evaluations = {arm: {"generate": evaluation(acc), "likelihood": evaluation(acc)}
                   for arm, acc in (("llava", 0.25), ("asvr", 0.5))}
    summary = summarize(config, curves, evaluations, {"asvr_stage1": 10.0, "asvr_stage2": 20.5})
    # stage 2 of llava: 10 / (step + 2) for steps 1..4
    assert summary["llava"]["stage2_text_loss"] == pytest.approx((10 / 3 + 2.5 + 2.0 + 10 / 6) / 4)
    assert summary["llava"]["stage2_visual_loss"] is None
    assert summary["asvr"]["stage2_visual_loss"] == pytest.approx(3.375)
    assert summary["asvr"]["in_training"] == pytest.approx({"accuracy": 1.0, "true_choice_prob": 0.34})
    table = format_summary(config, summary).splitlines()
    assert table[2] == "| | LLaVA (no visual loss) | ASVR |"
    assert "| held-out accuracy, greedy (12 questions) | 0.2500 | 0.5000 |" in table
    assert "|   color/accuracy | 0.1250 | 0.2500 |" in table
    assert "| stage-2 visual loss | - | 3.3750 |" in table
    assert "| training wall time (s) | 0.0 | 30.5 |" in table

    path = plot.save_chart(curve_panels(config, curves), tmp_path / "curves.png")
    image = np.asarray(Image.open(path).convert("RGB")).astype(int)
    width, height = plot.PANEL_SIZE
    assert image.shape == (height, 3 * width, 3)
    for panel, color in ((0, plot.COLORS[0]), (0, plot.COLORS[1]), (1, plot.COLORS[1]), (2, plot.COLORS[0])):
        left, top, right, bottom = plot.PLOT_BOX
        box = image[top:bottom, panel * width + left:panel * width + right]
        assert (np.abs(box - np.array(color)).sum(-1) == 0).sum() > 20  # the series' line is drawn
    last_step, last_loss = curve_panels(config, curves)[0].series["ASVR"][-1]
    assert last_step == 7 and last_loss == pytest.approx(10 / 6 - 0.5)


def test_nice_ticks():
    assert plot.nice_ticks(0.37, 6.9) == [0, 2, 4, 6, 8]
    assert plot.nice_ticks(1, 80) == [0, 20, 40, 60, 80]
    assert plot.nice_ticks(0.425, 0.5) == pytest.approx([0.42, 0.44, 0.46, 0.48, 0.5])
