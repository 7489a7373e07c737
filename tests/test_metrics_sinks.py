"""Where the step metrics go: TensorBoard and, when a project is set, Weights & Biases (offline here)."""

from pathlib import Path

import pytest

from megatron_asvr.config import RunConfig, TrainConfig
from megatron_asvr.training.metrics import MetricsLogger, StepTimings, TensorBoardSink, WandbSink
from megatron_asvr.training.trainer import StepCounts, StepResult
from tests.support.multirank import run_ranks

COUNTS = StepCounts(non_finite=False, stop=False, dropped=0, unreadable=0, image_positions=64, real_tokens=256,
                    computed_positions=256, flops=1e9)


def _result(step: int, loss: float) -> StepResult:
    return StepResult(step=step, lr=1e-3, grad_norm=1.0, samples=2, counts=COUNTS, losses={"loss/text": loss},
                      reports=[])


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR", "WANDB_CONFIG_DIR", "TMPDIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home"))  # nothing of W&B's outside the test's directory


def test_wandb_offline_run_gets_the_logged_scalars(tmp_path, wandb_offline):
    config = {"train": {"lr": 1e-3}}
    sink = WandbSink("asvr-test", "offline", str(tmp_path), config)
    logger = MetricsLogger(True, total_steps=3, start_step=0, num_gpus=1, peak_tflops=989.0, sinks=[sink])
    for step, loss in enumerate([3.0, 2.5, 2.25], start=1):
        logger.record(_result(step, loss), StepTimings(step_s=0.5, data_s=0.1))
        if step == 2:
            logger.log_scalars({"eval/accuracy": 0.75}, step)  # the held-out score joins the step's row
    summary = dict(sink.run.summary)  # W&B commits a step's row when a later step arrives: step 2's
    assert summary["loss/text"] == 2.5 and summary["eval/accuracy"] == 0.75 and summary["lr"] == 1e-3
    assert summary["tokens_per_s"] == 256 / 0.5 and summary["data_wait_s"] == 0.1
    assert sink.run.config["train"] == {"lr": 1e-3}
    logger.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_sinks_follow_the_config(tmp_path, wandb_offline):
    from megatron_asvr.training.loop import metric_sinks

    tensorboard_only = RunConfig(train=TrainConfig(save_dir=str(tmp_path / "a"), tensorboard=True))
    both = RunConfig(train=TrainConfig(save_dir=str(tmp_path / "b"), tensorboard=True, wandb_project="asvr-test",
                                       wandb_mode="offline"))
    neither = RunConfig(train=TrainConfig(save_dir=str(tmp_path / "c"), tensorboard=False))
    for config, kinds in ((tensorboard_only, [TensorBoardSink]), (both, [TensorBoardSink, WandbSink]),
                          (neither, [])):
        sinks = metric_sinks(config)
        assert [type(s) for s in sinks] == kinds
        for sink in sinks:
            sink.close()
    assert list((tmp_path / "b/wandb").glob("offline-run-*")), "the W&B run is written under save_dir"


def _sinks_without_wandb(save_dir: str) -> list:
    """In a rank of its own: wandb unimportable, a TensorBoard-only config's sinks, then a W&B one's
    failure (where it was raised)."""
    import sys
    import traceback

    from megatron_asvr.training.loop import metric_sinks

    sys.modules["wandb"] = None  # `import wandb` raises ImportError from here on
    out = [[type(s).__name__ for s in metric_sinks(RunConfig(train=TrainConfig(save_dir=save_dir)))]]
    try:
        metric_sinks(RunConfig(train=TrainConfig(save_dir=save_dir, wandb_project="p")))
    except ImportError as err:
        where = traceback.extract_tb(err.__traceback__)[-1]
        out.append((where.name, Path(where.filename).name, where.line))
    return out


def test_wandb_is_needed_only_when_enabled(tmp_path):
    """With wandb unimportable, a TensorBoard-only run builds its sinks; one with a W&B project fails
    on wandb's import, in WandbSink."""
    names, failed = run_ranks(_sinks_without_wandb, 1, str(tmp_path))[0]
    assert names == ["TensorBoardSink"]
    assert failed == ("__init__", "metrics.py", "import wandb")  # WandbSink.__init__
