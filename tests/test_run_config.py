"""Bad recipes fail before any model is built, with one line that says what to change."""

import dataclasses
import json

import pytest

from tests.support.tiny_run import tiny_run_config
from megatron_asvr.config import ConfigError, ParallelConfig, load_run_config


@pytest.fixture
def good(tmp_path):
    for part in ("shards", "data/images", "targets", "tokenizer"):
        (tmp_path / part).mkdir(parents=True)
    (tmp_path / "targets/targets.json").write_text("{}")
    return tiny_run_config(str(tmp_path), str(tmp_path / "save"))


def _error(config, world_size=1) -> str:
    with pytest.raises(ConfigError) as info:
        config.validate(world_size)
    message = str(info.value)
    assert "\n" not in message
    return message


def _with(config, section, **changes):
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **changes)})


def test_the_good_config_passes(good):
    good.validate(1)
    dataclasses.replace(good, parallel=ParallelConfig(tensor_parallel=2)).validate(2)


def test_six_bad_configurations(good):
    llm = good.model.llm
    bad = {
        "world": (dataclasses.replace(good, parallel=ParallelConfig(tensor_parallel=2)), 3,
                  "world size 3 is not divisible by tensor_parallel x pipeline_parallel"),
        "kv heads": (dataclasses.replace(good, parallel=ParallelConfig(tensor_parallel=4)), 4,
                     "llm.num_query_groups=2 is not divisible by parallel.tensor_parallel=4"),
        "layers": (dataclasses.replace(good, parallel=ParallelConfig(pipeline_parallel=3)), 3,
                   "llm.num_layers=4 is not divisible by pipeline_parallel x virtual_pipeline = 3 x 1"),
        "sequence": (_with(good, "data", seq_length=100), 1,
                     "data.seq_length=100 cannot hold one image (144 positions)"),
        "files": (_with(good, "data", shards="/nonexistent/shards"), 1,
                  "data.shards='/nonexistent/shards' is not a directory: run tools/preprocess.py"),
        "batch": (_with(good, "train", global_batch=6, micro_batch=4), 1,
                  "train.global_batch=6 is not divisible by data-parallel size x micro_batch = 1 x 4"),
        "targets": (_with(good, "data", targets=None), 1,
                    "the visual loss is on (model.asvr.visual_loss) but data.targets is not set"),
    }
    assert llm.num_query_groups == 2
    for name, (config, world, expected) in bad.items():
        assert expected in _error(config, world), name


def test_recipes_in_configs_load_and_name_unknown_keys(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  llm: {preset: vicuna_7b}\n  vision: {preset: siglip_so400m_384}\n"
                      "train: {lr: 2.0e-5}\n")
    config = load_run_config(recipe, ["train.global_batch=128"])
    assert (config.model.llm.hidden_size, config.model.vision.num_patches) == (4096, 729)
    assert (config.train.lr, config.train.global_batch) == (2e-5, 128)
    recipe.write_text("train: {learning_rate: 1.0}\n")
    with pytest.raises(ConfigError, match="unknown config key train.learning_rate"):
        load_run_config(recipe)
    recipe.write_text("model: {llm: {preset: llama_70b}}\n")
    with pytest.raises(ConfigError, match="model.llm.preset='llama_70b' is unknown"):
        load_run_config(recipe)


def test_targets_must_come_from_the_runs_tokenizer_and_image_mode(tmp_path):
    from megatron_asvr.data.targets import PLAN_FILE, VisualTargets, file_sha256

    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "config.json").write_text('{"depth": 4}')
    (tokenizer / "tokenizer.ckpt").write_bytes(b"weights of the tokenizer")
    targets = tmp_path / "targets"
    targets.mkdir()
    record = {"config_sha256": file_sha256(tokenizer / "config.json"),
              "checkpoint_sha256": file_sha256(tokenizer / "tokenizer.ckpt")}
    (targets / PLAN_FILE).write_text(json.dumps({"mode": "resize", "tokenizer": record}))
    files = (tokenizer / "config.json", tokenizer / "tokenizer.ckpt")

    VisualTargets.check_made_with(str(targets), *files, "resize")
    VisualTargets.check_made_with(None, *files, "pad")  # a run without targets
    with pytest.raises(ConfigError) as info:
        VisualTargets.check_made_with(str(targets), *files, "pad")
    assert str(info.value) == (
        f"{targets / PLAN_FILE} holds codes of 'resize' images but data.image_mode='pad': "
        "set data.image_mode=resize or recompute the targets with --mode pad")
    other = tmp_path / "other.ckpt"
    other.write_bytes(b"weights of another tokenizer")
    with pytest.raises(ConfigError) as info:
        VisualTargets.check_made_with(str(targets), files[0], other, "resize")
    assert str(info.value) == (
        f"{targets / PLAN_FILE} was computed with another visual tokenizer ({other} has SHA-256 "
        f"{file_sha256(other)[:12]}..., the targets record checkpoint {record['checkpoint_sha256'][:12]}...): "
        "point train.visual_tokenizer at the tokenizer the targets were made with, or recompute them with this one")
