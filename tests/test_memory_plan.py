"""The memory planner against the model built on the meta device and against arithmetic by hand;
the production recipes load, validate and fit; the launchers' comments carry the planner's numbers."""

import dataclasses
import re
import subprocess
from pathlib import Path

import pytest
import torch

from tests.support.multirank import run_ranks
from tests.support.tools import load_tool
from megatron_asvr.config import LLM_PRESETS, VISION_PRESETS, ASVRConfig, ModelConfig, ParallelConfig, load_run_config
from megatron_asvr.planner import Cluster, format_plan, plan_memory
from megatron_asvr.planner.param_counts import stage_parameters
from megatron_asvr.planner.plan import sweep_layouts

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30

# --- parameter counts: planner vs the real model on meta ------------------------

VICUNA_13B = ModelConfig(
    vision=VISION_PRESETS["siglip_so400m_384"],
    llm=dataclasses.replace(LLM_PRESETS["vicuna_13b"], layers_in_first_stage=21, layers_in_last_stage=19),
)
MISTRAL_CLIP_DUAL = ModelConfig(  # GQA, CLIP (class token, pre-norm), two visual heads
    vision=VISION_PRESETS["clip_vit_l_336"], llm=LLM_PRESETS["mistral_7b"], asvr=ASVRConfig(supervision="dual"),
)
# Qwen3-4B (q/k norms, 32 x 128 q width != hidden 2560, tied embeddings: the last stage's LM-head copy), with
# Qwen2's q/k/v biases on top
QWEN_TIED = ModelConfig(vision=VISION_PRESETS["siglip_so400m_384"],
                        llm=dataclasses.replace(LLM_PRESETS["qwen3_4b"], qkv_bias=True))
LAYOUTS = [(VICUNA_13B, ParallelConfig(tensor_parallel=2, pipeline_parallel=2)),
           (MISTRAL_CLIP_DUAL, ParallelConfig(tensor_parallel=4)),
           (QWEN_TIED, ParallelConfig(tensor_parallel=2, pipeline_parallel=2))]


def _part(name: str) -> str:
    if name.startswith("language_model.decoder.layers."):
        return "llm_layers"
    if name.startswith("language_model.embedding."):
        return "embedding"
    if name.startswith(("language_model.output_layer.", "language_model.decoder.final_layernorm.")):
        return "output"
    return {"vision_encoder": "vision", "projector": "projector", "visual_heads": "visual_head"}[name.split(".")[0]]


def _count_on_meta(model: ModelConfig, parallel: ParallelConfig):
    """(pipeline stage, parameters by part) of this rank's stage, built on the meta device."""
    from megatron.core import parallel_state as ps

    from megatron_asvr import runtime
    from megatron_asvr.model.vlm import stage_builder

    runtime.initialize(parallel)
    books = {b: [torch.empty(v, getattr(model.asvr, b).dim, device="meta") for v in getattr(model.asvr, b).sizes]
             for b in ("semantic", "appearance")}
    with torch.device("meta"):
        build = stage_builder(model, parallel, "local", books, use_cpu_initialization=True,
                              perform_initialization=False)
        stage = build(ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage(), None)
    counts = {}
    for name, param in stage.named_parameters():
        counts[_part(name)] = counts.get(_part(name), 0) + param.numel()
    pp_rank = ps.get_pipeline_model_parallel_rank()
    runtime.destroy()
    return pp_rank, counts


@pytest.mark.parametrize("model, parallel", LAYOUTS, ids=["vicuna13b_tp2_pp2_21_19", "mistral_clip_dual_tp4",
                                                                  "qwen3_4b_bias_tied_tp2_pp2"])
def test_parameter_counts_equal_the_meta_built_stages(model, parallel):
    planned = stage_parameters(model, parallel.tensor_parallel, parallel.pipeline_parallel)
    for stage, counts in run_ranks(_count_on_meta, 4, model, parallel):
        assert counts == planned[stage], stage


def test_hand_counts_of_a_13b_pipeline_split():
    first, last = stage_parameters(VICUNA_13B, 2, 2)
    assert first["llm_layers"] == 21 * (2 * 5120 + (4 * 5120 * 5120 + 3 * 5120 * 13824) // 2)
    assert last["llm_layers"] == 19 * (2 * 5120 + (4 * 5120 * 5120 + 3 * 5120 * 13824) // 2)
    assert first["embedding"] == 32000 * 5120 // 2 and last["output"] == 5120 + 32000 * 5120 // 2
    assert last["visual_head"] == 370_509_824  # TP halves of the 724M head's split weights, all replicated ones


# --- memory by hand ------------------------------------------------------------------

SIGLIP_LAYER = 4 * 1152 + 4 * 1152 * 1152 + 4 * 1152 + 2 * 1152 * 4304 + 4304 + 1152
SIGLIP = (3 * 14 * 14 * 1152 + 1152) + 729 * 1152 + 26 * SIGLIP_LAYER
VICUNA_7B_VLM = 7_894_203_680  # tests/test_param_counts.py: SigLIP, projector, LLM, head


def _recipe(name: str, *overrides: str):
    return load_run_config(ROOT / "configs" / f"{name}.yaml", list(overrides))


def test_vicuna_7b_stage2_memory_by_hand():
    plan = plan_memory(_recipe("vicuna7b_stage2"), Cluster(nodes=1, gpus_per_node=8))
    (stage,) = plan.stages
    trainable = VICUNA_7B_VLM - SIGLIP  # the frozen encoder has no gradients and no optimizer state
    assert stage.trainable_params == trainable
    assert stage.param_bytes == VICUNA_7B_VLM * 2
    assert stage.grad_bytes == trainable * 4
    assert stage.optimizer_bytes == trainable * 12 / 8  # fp32 main params + Adam moments over DP=8
    h, f, e = 4096, 11008, 2048
    llm_layer = 2 * (4 * h + 2 * h + 2 * h + 3 * f)  # norms in/out; Q, attention out, K, V; gate/up, SwiGLU
    last = 2 * 2 * h + 4 * 32000  # final norm in/out (bf16), fp32 softmax of the LM head
    projector = 2 * (1152 + 2 * h)
    head = 2 * (h + 7 * 1152 + 2 * e + 3 * 8 * (4 * e + 4 * e + 2 * 2 * e) + 2 * 8 * e)
    per_micro = 2048 * (32 * llm_layer + last) + 729 * (projector + head)
    assert stage.activation_bytes_per_micro == per_micro
    assert (stage.in_flight, stage.recompute_bytes) == (1, 0)
    assert round(stage.total_bytes / GIB, 2) == 62.29 and plan.fits
    pure = plan_memory(_recipe("vicuna7b_stage2", "train.master_weights=false"), Cluster(nodes=1, gpus_per_node=8))
    (bf16,) = pure.stages  # bf16 gradients, bf16 Adam moments, not sharded (the trainer's pure bf16)
    assert (bf16.grad_bytes, bf16.optimizer_bytes) == (trainable * 2, trainable * 4)
    assert bf16.activation_bytes_per_micro == per_micro and not pure.distributed_optimizer
    assert pure.precision == "bf16 (no master weights)"


def test_pipeline_stages_hold_their_parts_and_micro_batches_in_flight():
    plan = plan_memory(_recipe("vicuna13b_stage2"), Cluster(nodes=2, gpus_per_node=8))
    first, last = plan.stages
    assert (plan.tensor_parallel, plan.pipeline_parallel, plan.data_parallel, plan.num_microbatches) == (2, 2, 4, 16)
    assert set(first.params) == {"vision", "projector", "embedding", "llm_layers"}
    assert set(last.params) == {"llm_layers", "output", "visual_head"}
    assert (first.layers, last.layers, first.in_flight, last.in_flight) == (21, 19, 2, 1)
    # sequence parallel: a layer's activations are all split over TP=2
    h, f = 5120, 13824
    projector = 2 * 729 * 2 * (1152 + 2 * h / 2)  # 2 images, bf16: input, then the TP-split hidden twice
    assert first.activation_bytes_per_micro - projector == 21 * 2 * 2048 * 2 * (6 * h + 2 * h + 3 * f) / 2
    text = format_plan(plan, "vicuna13b_stage2")
    assert "| 0 | 21 | vision+projector+embedding |" in text and "| 1 | 19 | output+visual_head |" in text
    assert "fits: largest stage 0 needs 42.35 GiB of 72 GiB usable" in text
    sweep = sweep_layouts(_recipe("vicuna13b_stage2"), Cluster(nodes=2))
    assert "| 2 | 2 | 4 | 42.35 | yes |" in sweep and "| 1 | 1 | 16 | 114.90 | NO |" in sweep
    assert "| 1 | 4 | 4 | 54.25 | yes |" in sweep  # other PPs split the 40 layers evenly
    whole = plan_memory(_recipe("vicuna13b_stage2", "parallel.tensor_parallel=1", "parallel.pipeline_parallel=1",
                                "parallel.sequence_parallel=false"), Cluster(nodes=2))
    assert not whole.fits and "DOES NOT FIT" in format_plan(whole)


def test_full_recompute_keeps_layer_inputs():
    plan = plan_memory(_recipe("vicuna7b_stage2", "train.recompute=full"), Cluster())
    (stage,) = plan.stages
    h, f, e = 4096, 11008, 2048
    kept_llm = 32 * 2048 * h * 2
    head_inputs = 729 * 2 * (h + 7 * 1152 + 2 * e + 3 * 8 * e + 2 * 8 * e)
    last, projector = 2048 * (2 * 2 * h + 4 * 32000), 729 * 2 * (1152 + 2 * h)
    assert stage.activation_bytes_per_micro == kept_llm + last + projector + head_inputs
    assert stage.recompute_bytes == max(2048 * 2 * (6 * h + 2 * h + 3 * f), 729 * 2 * 8 * (4 * e + 4 * e + 4 * e))


def test_the_tool_prints_the_plan_and_fails_a_layout_that_does_not_fit(capsys):
    tool = load_tool("plan_memory")
    with pytest.raises(SystemExit) as ok:
        tool.main(["--config", str(ROOT / "configs/vicuna13b_stage2.yaml"), "--nodes", "2"])
    assert ok.value.code == 0 and "| 1 | 19 | output+visual_head |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as bad:
        tool.main(["--config", str(ROOT / "configs/vicuna13b_stage2.yaml"), "--set", "parallel.pipeline_parallel=1"])
    assert bad.value.code == 1 and "DOES NOT FIT" in capsys.readouterr().out
    with pytest.raises(SystemExit) as error:
        tool.main(["--config", str(ROOT / "configs/vicuna13b_stage2.yaml"), "--nodes", "3", "--gpus-per-node", "1"])
    assert error.value.code == "plan_memory: error: world size 3 is not divisible by tensor_parallel x " \
                               "pipeline_parallel = 2 x 2 = 4: launch a multiple of 4 ranks or change the layout"


# --- recipes and launchers ------------------------------------------------------------

# recipe -> (stage, nodes its launcher is sized for)
RECIPES = {
    "vicuna7b_stage1": (1, 1), "vicuna7b_stage2": (2, 1), "vicuna13b_stage1": (1, 2), "vicuna13b_stage2": (2, 2),
    "mistral7b_stage1": (1, 1), "mistral7b_stage2": (2, 1), "bunny2m_stage1": (1, 4), "bunny2m_stage2": (2, 4),
    "highres1152_stage2": (2, 1), "qwen2_5_7b_stage1": (1, 1), "qwen2_5_7b_stage2": (2, 1),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipes_follow_the_paper_validate_and_fit(name, tmp_path):
    stage, nodes = RECIPES[name]
    for part in ("shards", "images", "targets", "tokenizer", "load"):
        (tmp_path / part).mkdir()
    (tmp_path / "targets" / "targets.json").write_text("{}")
    config = _recipe(name, *(f"{key}={tmp_path / part}" for key, part in (
        ("data.shards", "shards"), ("data.image_root", "images"), ("data.targets", "targets"),
        ("train.visual_tokenizer", "tokenizer"), ("train.load", "load"))))
    config.validate(nodes * 8)  # layout, shapes, batch arithmetic, files
    t = config.train
    expected = {1: (256, 1e-3, ["projector", "visual_head"]),
                2: (128, 2e-5, ["projector", "llm", "visual_head"])}[stage]
    assert (t.global_batch, t.lr, config.model.trainable) == expected
    assert (t.warmup_ratio, t.weight_decay, t.epochs, t.precision, t.min_lr) == (0.03, 0.0, 1.0, "bf16", 0.0)
    assert config.data.seq_length == (8192 if name.startswith("highres") else 2048)
    assert config.data.image_mode == ("resize" if stage == 1 else "anyres" if name.startswith("highres") else "pad")
    assert config.model.asvr.branches == ["semantic"] and config.model.vision.num_patches == 729
    assert plan_memory(config, Cluster(nodes=nodes)).fits


LAUNCHERS = ["pretrain_7b", "finetune_7b", "pretrain_13b", "finetune_13b", "pretrain_2m", "finetune_2m",
             "pretrain_qwen7b", "finetune_qwen7b"]


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launchers_run_their_recipe_with_the_planners_numbers(name):
    script = ROOT / "launch" / f"{name}.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    (recipe,) = re.findall(r'^recipe="(configs/\w+\.yaml)"$', text, re.MULTILINE)  # bash and Python read it
    assert 'run_recipe "${RECIPE:-$recipe}" "$@"' in text
    (nodes,) = re.findall(r"tools/plan_memory.py --nodes (\d+)", text)
    plan = plan_memory(load_run_config(ROOT / recipe), Cluster(nodes=int(nodes)))
    totals = {int(s): float(v) for s, v in re.findall(r"stage (\d) total = ([\d.]+) GiB", text)}
    assert totals == {s.stage: round(s.total_bytes / GIB, 2) for s in plan.stages} and plan.fits
    assert 'source "$(dirname "$0")/multinode.sh"' in text
