"""The throughput benchmark: synthetic batches at real shapes, the timed loop on CPU, FP8 settings and errors."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from megatron_asvr.benchmark.fp8 import FP8Unavailable, check_fp8_runnable, fp8_llm_changes
from megatron_asvr.benchmark.model import stage_configs
from megatron_asvr.benchmark.report import comparisons_of, render, to_json
from megatron_asvr.benchmark.runner import benchmark_variants, run_variants
from megatron_asvr.benchmark.synthetic import synthetic_micro_batches
from megatron_asvr.config import BenchRunConfig, ConfigError, load_config, with_overrides
from megatron_asvr.model.flops import StepShape, step_flops
from tests.support.multirank import run_ranks
from tests.support.tools import load_tool

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "benchmark.py"
TINY_RECIPE, VICUNA_7B = REPO / "configs/bench_tiny.yaml", REPO / "configs/vicuna7b_stage2.yaml"
TINY = load_config(BenchRunConfig, TINY_RECIPE, ["bench.warmup=1", "bench.steps=2", "train.precision=fp32"])


def test_synthetic_batches_have_vicuna_7b_shapes():
    model = load_config(BenchRunConfig, VICUNA_7B).model
    (batch,) = synthetic_micro_batches(model, micro_batch=2, samples=2, seq_length=2048)
    assert batch.tokens.shape == (2, 2048) and batch.images.shape == (2, 3, 384, 384)
    # BOS, then the image, in each sample of the flattened [2 * 2048] batch
    assert batch.image_index.tolist() == list(range(1, 730)) + list(range(2049, 2778))
    # answer tokens: 2048 - 729 image positions - 16 prompt tokens; the label of the last prompt token is the first
    assert batch.loss_mask.sum(dim=1).tolist() == [1303, 1303]
    assert (batch.tokens[:, 730:] >= 3).all() and (batch.tokens[:, 730:] < 32000).all()
    codes = batch.visual_targets["semantic"]
    assert codes.shape == (2 * 729, 8) and int(codes.max()) < 16384
    assert batch.visual_rows.tolist() == list(range(1458))


def test_bench_errors_are_one_line():
    with pytest.raises(ConfigError, match="train.global_batch=6 is not divisible by data-parallel size x micro_batch "
                                          "= 1 x 4"):
        with_overrides(TINY, ["train.global_batch=6", "train.micro_batch=4"]).validate(1)
    with pytest.raises(ConfigError, match="data.seq_length=64 cannot hold one image \\(64 positions\\) plus a prompt"):
        with_overrides(TINY, ["data.seq_length=64"]).validate(1)
    with pytest.raises(ConfigError, match="bench.precision must be fp32, bf16, fp8 or null, got 'fp16'"):
        with_overrides(TINY, ["bench.precision=fp16"])
    with pytest.raises(ConfigError, match="only with the tensorwise or mxfp8 recipe, not delayed"):
        with_overrides(TINY, ["bench.precision=fp8", "bench.fp8_bf16_edge_layers=1"]).validate(1)
    with pytest.raises(ConfigError, match="bench.fp8_bf16_edge_layers applies to FP8 runs only"):
        with_overrides(TINY, ["bench.fp8_bf16_edge_layers=1", "bench.fp8_recipe=tensorwise"]).validate(1)


def test_fp8_changes_reach_the_llm_config_only():
    config = with_overrides(TINY, ["bench.precision=fp8", "bench.fp8_recipe=tensorwise",
                                   "bench.fp8_bf16_edge_layers=1", "model.transformer_impl=local"])
    configs = stage_configs(config)
    llm = configs.llm
    assert (llm.fp8, llm.fp8_recipe, llm.first_last_layers_bf16, llm.num_layers_at_start_in_bf16,
            llm.num_layers_at_end_in_bf16) == ("hybrid", "tensorwise", True, 1, 1)
    assert (configs.vision.fp8, configs.projector.fp8, configs.head.fp8) == (None, None, None)
    assert llm.params_dtype == torch.bfloat16 and configs.head.params_dtype == torch.bfloat16
    assert fp8_llm_changes("mxfp8") == {"fp8": "e4m3", "fp8_recipe": "mxfp8"}
    assert fp8_llm_changes("delayed") == {"fp8": "hybrid", "fp8_recipe": "delayed", "fp8_amax_history_len": 1024,
                                          "fp8_amax_compute_algo": "max"}


def test_fp8_checks_device_capability_and_rows(monkeypatch):
    with pytest.raises(FP8Unavailable, match="this machine has no GPU"):
        check_fp8_runnable(TINY, "local")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (9, 0))
    with pytest.raises(FP8Unavailable, match="needs the Transformer Engine layers"):
        check_fp8_runnable(TINY, "local")
    with pytest.raises(FP8Unavailable, match="mxfp8 FP8 recipe needs compute capability 10.0 or newer; this GPU has"):
        check_fp8_runnable(with_overrides(TINY, ["bench.fp8_recipe=mxfp8"]), "transformer_engine")
    with pytest.raises(FP8Unavailable, match="rows in multiples of 16; micro-batch x sequence length / TP = 100"):
        check_fp8_runnable(with_overrides(TINY, ["train.micro_batch=1", "data.seq_length=200",
                                                 "parallel.tensor_parallel=2", "parallel.sequence_parallel=true"]),
                           "transformer_engine")
    check_fp8_runnable(TINY, "transformer_engine")  # 2 x 128 rows on a Hopper: fine


def _load_tool():
    return load_tool("benchmark")


def test_the_tool_reports_fp8_on_cpu_as_one_line(capsys):
    tool = _load_tool()
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--config", str(TINY_RECIPE), "--set", "bench.precision=fp8"])
    assert exit_info.value.code == ("benchmark: error: FP8 needs an NVIDIA GPU with Transformer Engine and this "
                                    "machine has no GPU: set bench.precision=bf16 on a GPU (fp32 on CPU)")


def test_overrides_set_any_key_of_the_recipe_and_name_a_bad_one():
    config = load_config(BenchRunConfig, VICUNA_7B, ["model.llm.num_layers=12", "model.asvr.head.num_layers=2",
                                                     "bench.mode=compare-packing"])
    model = config.model
    assert (model.llm.num_layers, model.llm.hidden_size, model.asvr.head.num_layers) == (12, 4096, 2)
    assert model.trainable == ["projector", "llm", "visual_head"]  # the recipe's stage is kept
    assert [name for name, _ in benchmark_variants(config)] == ["pad_full", "pad_longest", "pack"]
    with pytest.raises(ConfigError, match=r"^unknown config key model\.llm\.num_layerz \(known: "):
        load_config(BenchRunConfig, TINY_RECIPE, ["model.llm.num_layerz=3"])
    tool = _load_tool()
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--config", str(TINY_RECIPE), "--set", "model.vision.num_layerz=1"])
    assert str(exit_info.value.code).startswith("benchmark: error: unknown config key model.vision.num_layerz (known")


def _modes(config):
    """compare-asvr, then an A/B of fp32 against itself (must agree exactly)."""
    compare = run_variants(config, benchmark_variants(with_overrides(config, ["bench.mode=compare-asvr"])))
    same = run_variants(config, benchmark_variants(with_overrides(config, ["bench.mode=ab", "bench.ab=[fp32, fp32]"])))
    return compare, same


@pytest.fixture(scope="module")
def cpu_runs():
    return run_ranks(_modes, 1, TINY)[0]


def test_compare_asvr_measures_both_steps(cpu_runs):
    (baseline, asvr), _ = cpu_runs
    model = TINY.model
    shape = StepShape.uniform(samples=4, seq_length=128, image_tiles=4, visual_rows=4 * 64)
    for run, visual_loss in ((baseline, False), (asvr, True)):
        expected = step_flops(dataclasses.replace(model, asvr=dataclasses.replace(model.asvr, visual_loss=visual_loss)),
                              shape)
        assert run.flops == expected
        assert len(run.step_times) == 2 and len(run.losses) == 3 and min(run.step_times) > 0
        step = sum(run.step_times) / 2  # the median of two steps
        assert run.derived["step_time_s"] == pytest.approx(step)
        assert run.derived["tokens_per_s_per_gpu"] == pytest.approx(4 * 128 / step)
        assert run.derived["tflops_per_gpu"] == pytest.approx(expected["total"] / step / 1e12)
        assert run.derived["mfu"] is None  # no peak given on CPU
    assert baseline.flops["visual_head"] == 0 and asvr.flops["visual_head"] > 0
    assert baseline.derived["visual_head_share"] == 0.0 and 0 < asvr.derived["visual_head_share"] < 1
    assert "loss/visual_semantic" not in baseline.losses[0]
    # Same seed, same batches, heads built after the LLM: the first text losses agree.
    assert asvr.losses[0]["loss/text"] == pytest.approx(baseline.losses[0]["loss/text"], abs=1e-6)
    assert asvr.losses[0]["loss/text"] == pytest.approx(math.log(1024), abs=0.05)  # ~uniform over the padded vocab
    assert asvr.losses[0]["loss/visual_semantic"] == pytest.approx(math.log(256), abs=0.1)


def test_the_table_and_json_carry_the_ratio(cpu_runs):
    runs, _ = cpu_runs
    comparisons = comparisons_of("compare-asvr", runs)
    ratio = runs[1].derived["step_time_s"] / runs[0].derived["step_time_s"]
    assert comparisons["asvr"]["asvr_over_baseline_step_time"] == pytest.approx(ratio)
    text = render(runs, comparisons, on_gpu=False)
    fastest = min(runs[1].step_times) / min(runs[0].step_times)
    assert f"ASVR / baseline step time: {ratio:.3f} (median), {fastest:.3f} (min)" in text
    assert f"| asvr | fp32 | pad_full | 1x1x1 | 2/4 x 128 (full) | {runs[1].derived['step_time_s']:.4f} |" in text
    assert "| baseline | fp32 |" in text
    data = json.loads(to_json(runs, comparisons))
    assert data["runs"][1]["derived"]["visual_head_share"] == runs[1].derived["visual_head_share"]
    assert data["comparisons"]["asvr"]["flops_ratio"] == pytest.approx(runs[1].flops["total"] / runs[0].flops["total"])


def test_ab_of_identical_runs_differs_by_nothing(cpu_runs):
    _, (a, b) = cpu_runs
    numbers = comparisons_of("ab", [a, b])["ab"]
    assert numbers["same_initial_weights"] and numbers["steps_compared"] == 3
    assert numbers["max_abs_diff/loss/text"] == 0.0 and numbers["max_abs_diff/loss/visual_semantic"] == 0.0
    assert a.losses[-1]["loss/text"] != a.losses[0]["loss/text"]  # the optimizer stepped


def _pipelined(config):
    return run_variants(config, [("asvr", ())])[0]


def test_pipeline_parallel_times_the_head_on_the_last_stage():
    first, last = run_ranks(_pipelined, 2, with_overrides(TINY, ["parallel.pipeline_parallel=2"]))
    assert first.losses == [{}, {}, {}] and "loss/visual_semantic" in last.losses[0]
    assert first.step_times == last.step_times and first.head_times == last.head_times  # slowest rank's
    assert 0 < last.derived["visual_head_share"] < 1
    assert last.data_parallel == 1 and last.world_size == 2


def test_llava_like_lengths_pack_with_little_padding():
    """Stage-2-like samples at Vicuna-7B shapes, 16 per rank: packed into micro-batches of 4 rows of 2048
    they carry far less padding than full padding (lengths only: no model runs)."""
    model = load_config(BenchRunConfig, VICUNA_7B).model
    shares = {}
    for batching in ("pad_full", "pack"):
        micro = synthetic_micro_batches(model, micro_batch=4, samples=16, seq_length=2048, seed=3,
                                        batching=batching, lengths="stage2")
        real = sum(sum(m.sample_lengths) for m in micro)
        shares[batching] = 1 - real / sum(m.computed_positions for m in micro)
        assert sum(m.num_samples for m in micro) == 16
        assert all(m.num_image_positions % 729 == 0 for m in micro)
    assert shares["pad_full"] > 0.3 and shares["pack"] < 0.1, shares
