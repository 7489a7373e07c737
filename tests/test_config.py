"""Bad set-ups are rejected with one actionable line before megatron sees them."""

import dataclasses

import pytest

from megatron_asvr import runtime
from megatron_asvr.config import (
    LLM_PRESETS,
    ConfigError,
    LLMConfig,
    ParallelConfig,
    TrainConfig,
    apply_overrides,
    from_dict,
    load_run_config,
    load_yaml,
)


def _one_line_error(fn, *args) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_world_size_not_divisible_by_tp_x_pp():
    message = _one_line_error(ParallelConfig(tensor_parallel=2, pipeline_parallel=2).validate, 6)
    assert "world size 6 is not divisible by tensor_parallel x pipeline_parallel = 2 x 2 = 4" in message


def test_initialize_rejects_layout_before_any_process_group(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    message = _one_line_error(runtime.initialize, ParallelConfig(tensor_parallel=2))
    assert "world size 3" in message
    import torch.distributed as dist

    assert not dist.is_initialized()


def test_heads_not_divisible_by_tp():
    llm = LLMConfig(num_attention_heads=6, num_query_groups=6, hidden_size=96)
    message = _one_line_error(llm.validate, ParallelConfig(tensor_parallel=4))
    assert message.startswith("llm.num_attention_heads=6 is not divisible by parallel.tensor_parallel=4")


def test_kv_heads_not_divisible_by_tp():
    message = _one_line_error(LLM_PRESETS["mistral_7b"].validate, ParallelConfig(tensor_parallel=16))
    assert "llm.num_attention_heads=32" not in message  # 32 % 16 == 0: the KV heads are the problem
    assert message.startswith("llm.num_query_groups=8 is not divisible by parallel.tensor_parallel=16")


def test_layers_not_divisible_by_pp_x_vp():
    llm = LLMConfig(num_layers=6)
    message = _one_line_error(llm.validate, ParallelConfig(pipeline_parallel=2, virtual_pipeline=2))
    assert "llm.num_layers=6 is not divisible by pipeline_parallel x virtual_pipeline = 2 x 2 = 4" in message
    llm.validate(ParallelConfig(pipeline_parallel=2))  # 6 layers over 2 stages is fine
    llm.validate(ParallelConfig(pipeline_parallel=3))


def test_uneven_layer_split():
    llm = LLMConfig(num_layers=10, layers_in_last_stage=1)
    llm.validate(ParallelConfig(pipeline_parallel=4))  # 3 + 3 + 3 + 1
    llm.validate(ParallelConfig())  # unpipelined: one stage holds all 10
    empty_middle = LLMConfig(num_layers=40, layers_in_first_stage=21, layers_in_last_stage=19)
    message = _one_line_error(empty_middle.validate, ParallelConfig(pipeline_parallel=4))
    assert "remaining 0 layers evenly over 2" in message
    bad = dataclasses.replace(llm, layers_in_last_stage=2)
    assert "remaining 8 layers evenly over 3" in _one_line_error(bad.validate, ParallelConfig(pipeline_parallel=4))


def test_other_impossible_layouts():
    assert "virtual_pipeline" in _one_line_error(ParallelConfig(virtual_pipeline=2).validate, 1)
    assert "sequence_parallel" in _one_line_error(ParallelConfig(sequence_parallel=True).validate, 2)
    assert "overlap_param_gather needs" in _one_line_error(ParallelConfig(overlap_param_gather=True).validate, 1)


def test_presets_validate_at_their_intended_layouts():
    LLM_PRESETS["vicuna_7b"].validate(ParallelConfig(tensor_parallel=4, pipeline_parallel=2))
    LLM_PRESETS["vicuna_13b"].validate(ParallelConfig(tensor_parallel=8, pipeline_parallel=2))
    LLM_PRESETS["mistral_7b"].validate(ParallelConfig(tensor_parallel=8))


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("tensor_parallel: 2\nsequence_parallel: true\n")
    data = load_yaml(path, ["pipeline_parallel=4", "virtual_pipeline=2"])
    assert from_dict(ParallelConfig, data) == ParallelConfig(2, 4, 2, True)
    assert apply_overrides({}, ["a.b.c=[1, 2]"]) == {"a": {"b": {"c": [1, 2]}}}
    assert "unknown config key tensor_paralel" in _one_line_error(from_dict, ParallelConfig, {"tensor_paralel": 2})
    assert "section.key=value" in _one_line_error(apply_overrides, {}, ["novalue"])
    # YAML 1.1 reads 1e-3 as a string: floats are parsed; other wrong types are named
    assert from_dict(TrainConfig, apply_overrides({}, ["lr=1e-3", "steps=5"])).lr == 1e-3
    assert "train.steps must be int or null, got 'many'" in _one_line_error(
        from_dict, TrainConfig, {"steps": "many"}, "train.")
    assert "must be bool" in _one_line_error(from_dict, ParallelConfig, {"sequence_parallel": "yes please"})
    assert "does not exist" in _one_line_error(load_yaml, tmp_path / "missing.yaml")


def test_schema_errors_name_the_key_the_value_and_what_is_allowed(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model:\n  asvr: {head: {hidden: 64}}\ntrain: {precision: fp16}\n")
    assert _one_line_error(load_run_config, recipe) == (
        "unknown config key model.asvr.head.hidden "
        "(known: hidden_size, mlp_ratio, norm_eps, num_attention_heads, num_layers)")
    recipe.write_text("train: {precision: fp16}\n")
    assert _one_line_error(load_run_config, recipe) == "train.precision must be auto, bf16 or fp32, got 'fp16'"
    assert _one_line_error(load_run_config, recipe, ["train.precision=bf16", "train.lr=abc"]) == (
        "train.lr must be float, got 'abc'")
    assert _one_line_error(load_run_config, recipe, ["train.precision=bf16", "model.trainable=[llm, lm_head]"]) == (
        "model.trainable[1] must be vision, projector, llm or visual_head, got 'lm_head'")
    assert _one_line_error(load_run_config, recipe, ["train.precision=bf16", "parallel.tensor_parallel=0"]) == (
        "parallel.tensor_parallel must be >= 1, got 0")


def test_files_are_read_strictly_python_callers_get_config_errors_too(tmp_path):
    # as JSON is read strictly: an int stands for a float, nothing else converts
    assert from_dict(TrainConfig, {"lr": 1}).lr == 1.0
    assert _one_line_error(from_dict, TrainConfig, {"global_batch": "256"}) == "global_batch must be int, got '256'"
    assert (_one_line_error(from_dict, TrainConfig, {"steps": 5.5}, "train.")
            == "train.steps must be int or null, got 5.5")
    assert (_one_line_error(from_dict, ParallelConfig, {"sequence_parallel": 1})
            == "sequence_parallel must be bool, got 1")
    assert _one_line_error(from_dict, TrainConfig, [1], "x.json: ") == "x.json must be a mapping, got [1]"
    # constructing a section (or dataclasses.replace) checks the fields too, naming the class
    assert _one_line_error(ParallelConfig, 0) == "ParallelConfig.tensor_parallel must be >= 1, got 0"
    assert _one_line_error(lambda: dataclasses.replace(TrainConfig(), nan_policy="retry")) == (
        "TrainConfig.nan_policy must be skip or stop, got 'retry'")
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("train:\n  lr: [1\n")
    assert _one_line_error(load_yaml, recipe) == (
        f"config file {recipe} is not valid YAML: expected ',' or ']', but got '<stream end>' (line 3, column 1)")
