"""Where the step metrics go: TensorBoard and, when a project is set, Weights & Biases (offline here)."""

import ast
from pathlib import Path

import pytest

import megatron_asvr
from megatron_asvr.config import RunConfig, TrainConfig
from megatron_asvr.training.metrics import MetricsLogger, TensorBoardSink, WandbSink

STEP = dict(grad_norm=1.0, skipped=False, lr=1e-3, tokens=256, samples=2, flops=1e9, step_time=0.5, data_time=0.1)


def test_wandb_offline_run_gets_the_logged_scalars(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR", "WANDB_CONFIG_DIR", "TMPDIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home"))  # nothing of W&B's outside the test's directory
    config = {"train": {"lr": 1e-3}}
    sink = WandbSink("asvr-test", "offline", str(tmp_path), config)
    logger = MetricsLogger(True, total_steps=3, start_step=0, num_gpus=1, peak_tflops=989.0, sinks=[sink])
    for step, loss in enumerate([3.0, 2.5, 2.25], start=1):
        logger.record(step, {"loss/text": loss}, **STEP)
        if step == 2:
            logger.log_scalars({"eval/accuracy": 0.75}, step)  # the held-out score joins the step's row
    summary = dict(sink.run.summary)  # W&B commits a step's row when a later step arrives: step 2's
    assert summary["loss/text"] == 2.5 and summary["eval/accuracy"] == 0.75 and summary["lr"] == 1e-3
    assert sink.run.config["train"] == {"lr": 1e-3}
    logger.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_sinks_follow_the_config(tmp_path):
    from megatron_asvr.training.loop import metric_sinks

    config = RunConfig(train=TrainConfig(save_dir=str(tmp_path), tensorboard=True))
    sinks = metric_sinks(config)
    assert [type(s) for s in sinks] == [TensorBoardSink]
    for sink in sinks:
        sink.close()


def test_wandb_is_imported_only_when_enabled():
    """Our code imports wandb in WandbSink alone (megatron-core itself imports it when installed)."""
    package = Path(megatron_asvr.__file__).parent
    imports = [(path.relative_to(package).as_posix(), node.lineno)
               for path in package.rglob("*.py") for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, (ast.Import, ast.ImportFrom))
               and any(name.split(".")[0] == "wandb" for name in
                       ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]))]
    source = (package / "training/metrics.py").read_text().splitlines()
    assert [path for path, _ in imports] == ["training/metrics.py"]
    assert source[imports[0][1] - 1].startswith("        import wandb")  # inside WandbSink.__init__
