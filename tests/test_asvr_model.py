"""The whole ASVR model (encoder, projector, LLM, visual head) across TP / PP / SP / DP, and its switches.

Tiny model, a global batch of four samples (one image; text only; two images;
an image in the middle of the prompt), stage 2 (LLM, projector and head
train), both losses on.
"""

import dataclasses

import pytest
import torch

from tests.support.harness import ALL_FAST_PATHS, train_case
from tests.support.multirank import run_ranks
from tests.support.tiny_vlm import TINY_MODEL, VLMCase, losses
from megatron_asvr.config import FastPathsConfig, ParallelConfig
from megatron_asvr.model.canonical import merge_ranks

TOL = 1e-5
STAGE2 = dataclasses.replace(TINY_MODEL, trainable=["projector", "llm", "visual_head"])

LAYOUTS = {
    "tp2_pp2": (4, ParallelConfig(tensor_parallel=2, pipeline_parallel=2)),
    "tp1_pp4": (4, ParallelConfig(pipeline_parallel=4)),
    "tp2_sequence_parallel": (2, ParallelConfig(tensor_parallel=2, sequence_parallel=True)),
    "dp2": (2, ParallelConfig()),
    # uneven: 3 decoder layers on the first stage, 1 on the last (which carries the head)
    "pp2_uneven": (2, ParallelConfig(pipeline_parallel=2)),
}
# Fast paths on in some layouts (the reference runs them off): the head's norms and per-depth MLPs too.
FAST_PATHS = {"tp2_pp2": ALL_FAST_PATHS, "dp2": FastPathsConfig(wgrad_accumulation=True, fused_adam=True)}
UNEVEN = dataclasses.replace(STAGE2, llm=dataclasses.replace(STAGE2.llm, layers_in_last_stage=1))


def _with_asvr(model, **changes):
    return dataclasses.replace(model, asvr=dataclasses.replace(model.asvr, **changes))


def _assert_close(got: dict, expected: dict, tol: float, what: str):
    assert sorted(got) == sorted(expected), what
    for name, value in expected.items():
        diff = (got[name] - value).abs().max().item() if torch.is_tensor(value) else abs(got[name] - value)
        assert diff <= tol, (what, name, diff)


@pytest.fixture(scope="module")
def reference():
    return run_ranks(train_case, 1, VLMCase(model=STAGE2, steps=2))[0]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_single_process(reference, layout):
    world_size, parallel = LAYOUTS[layout]
    model = UNEVEN if layout == "pp2_uneven" else STAGE2
    fast_paths = FAST_PATHS.get(layout, FastPathsConfig())
    case = VLMCase(model=model, steps=2, parallel=parallel, fast_paths=fast_paths)
    results = run_ranks(train_case, world_size, case, reference["initial"])
    resolved = case.resolved_fast_paths()  # auto: off on CPU, unless ASVR_FAST_PATHS=on
    assert {r["fused_adam"] for r in results} == {resolved.fused_adam}
    assert any(r["batched_head_mlp"] for r in results) == resolved.batched_head_mlp  # last stage
    if layout == "pp2_uneven":
        layers = [sorted({n.split(".")[3] for n in r["params"][0] if n.startswith("language_model.decoder.layers.")})
                  for r in results]
        assert layers == [["0", "1", "2"], ["3"]]
    _assert_close(losses(results, STAGE2), losses([reference], STAGE2), TOL, f"{layout} losses")
    for step in range(2):
        grads = merge_ranks([r["grads"][step] for r in results])
        _assert_close(grads, reference["grads"][step], TOL, f"{layout} grads step {step}")
        params = merge_ranks([r["params"][step] for r in results])
        _assert_close(params, reference["params"][step], TOL, f"{layout} params step {step}")


def test_reference_has_both_losses_and_all_gradients(reference):
    got = losses([reference], STAGE2)
    assert 5.0 < got["0/text"] < 6.0 and 2.5 < got["0/semantic"] < 3.5  # ~ln(256), ~ln(20)
    grads = reference["grads"][0]
    nonzero = {n for n, g in grads.items() if g.abs().sum() > 0}
    assert not any(n.startswith("vision_encoder.") for n in grads)  # frozen: no grad at all
    assert {n.split(".")[0] for n in nonzero} == {"projector", "language_model", "visual_heads"}


def test_loss_is_independent_of_the_micro_batch_split():
    """4 samples as 1 micro-batch of 4 or as 4 micro-batches of 1: same losses and gradients."""
    one = run_ranks(train_case, 1, VLMCase(model=STAGE2, steps=1, micro_batch=4))[0]
    four = run_ranks(train_case, 1, VLMCase(model=STAGE2, steps=1, micro_batch=1), one["initial"])[0]
    _assert_close(losses([four], STAGE2), losses([one], STAGE2), TOL, "losses")
    _assert_close(four["grads"][0], one["grads"][0], TOL, "grads")


def test_stage_freezing_and_frozen_pipeline_stages():
    """Stage 1: gradients only in the projector and the head; stage 2 adds the LLM; the
    encoder never gets one. At PP=4 in stage 1 the two middle stages train nothing and
    the step neither hangs nor breaks the optimizer (same losses and updates as PP=1)."""
    stage1 = run_ranks(train_case, 1, VLMCase(model=TINY_MODEL, steps=2))[0]
    assert {n.split(".")[0] for n in stage1["grads"][0]} == {"projector", "visual_heads"}
    assert all(g.abs().sum() > 0 for n, g in stage1["grads"][0].items() if "visual_heads" in n or "projector" in n)
    frozen = [n for n in stage1["initial"] if n.startswith(("language_model.", "vision_encoder."))]
    assert frozen and all(torch.equal(stage1["params"][-1][n], stage1["initial"][n]) for n in frozen)

    pp4 = run_ranks(train_case, 4, VLMCase(model=TINY_MODEL, steps=2, parallel=ParallelConfig(pipeline_parallel=4)),
                    stage1["initial"])
    _assert_close(losses(pp4, TINY_MODEL), losses([stage1], TINY_MODEL), TOL, "stage-1 PP=4 losses")
    _assert_close(merge_ranks([r["params"][-1] for r in pp4]), stage1["params"][-1], TOL, "stage-1 PP=4 params")


def test_target_shift_moves_targets_to_the_next_patch():
    """Shift 1: each image's last position loses its target (12 of 16 rows); text is untouched."""
    base = run_ranks(train_case, 1, VLMCase(model=STAGE2, steps=1))[0]
    shifted_model = _with_asvr(STAGE2, target_shift=1)
    shifted = run_ranks(train_case, 1, VLMCase(model=shifted_model, steps=1), base["initial"])[0]

    def rows(result):
        return sum(rep.branches["semantic"].rows.item() for _, rep in result["reports"][0])

    assert (rows(base), rows(shifted)) == (16, 12)
    a, b = losses([base], STAGE2), losses([shifted], shifted_model)
    assert a["0/text"] == b["0/text"]
    assert abs(a["0/semantic"] - b["0/semantic"]) > 1e-3


def test_text_only_samples_masked_or_given_the_zero_image():
    """Default: the text-only sample has no visual positions. Released behaviour: it gets the
    zero image right after BOS, whose codes are supervised; the other samples are unchanged."""
    masked = run_ranks(train_case, 1, VLMCase(model=STAGE2, steps=1))[0]
    supervised_model = _with_asvr(STAGE2, supervise_text_only=True)
    supervised = run_ranks(train_case, 1, VLMCase(model=supervised_model, steps=1), masked["initial"])[0]
    m, s = dict(masked["reports"][0]), dict(supervised["reports"][0])
    assert m[1].branches["semantic"].rows.item() == 0 and s[1].branches["semantic"].rows.item() == 4
    for micro in (0, 2, 3):  # samples with their own images: identical reports
        assert torch.equal(m[micro].flat(), s[micro].flat())


def test_dual_supervision_adds_an_appearance_head():
    """Dual: a second head with its own loss; the semantic head and the text loss are unchanged,
    the LLM's gradient gains the appearance term."""
    dual_model = _with_asvr(STAGE2, supervision="dual")
    dual = run_ranks(train_case, 1, VLMCase(model=dual_model, steps=1))[0]
    semantic = run_ranks(train_case, 1, VLMCase(model=STAGE2, steps=1), dual["initial"])[0]
    d, s = losses([dual], dual_model), losses([semantic], STAGE2)
    assert d["0/text"] == s["0/text"] and d["0/semantic"] == s["0/semantic"]
    assert "0/appearance" in d and "0/appearance" not in s and d["0/appearance"] > 1.0
    assert any(n.startswith("visual_heads.appearance.") for n in dual["grads"][0])
    head = [n for n in semantic["grads"][0] if n.startswith("visual_heads.semantic.classifiers")]
    assert head and all(torch.equal(dual["grads"][0][n], semantic["grads"][0][n]) for n in head)
    llm = "language_model.decoder.layers.3.mlp.linear_fc2.weight"
    assert not torch.allclose(dual["grads"][0][llm], semantic["grads"][0][llm])


def test_appearance_only_supervision():
    appearance_model = _with_asvr(STAGE2, supervision="appearance")
    result = run_ranks(train_case, 1, VLMCase(model=appearance_model, steps=1))[0]
    got = losses([result], appearance_model)
    assert "0/appearance" in got and "0/semantic" not in got
    assert {n.split(".")[1] for n in result["grads"][0] if n.startswith("visual_heads.")} == {"appearance"}


def _discrete_features(codes):
    from tests.support.tiny_vlm import codebooks, VLMCase
    from megatron_asvr import runtime

    case = VLMCase(model=_with_asvr(STAGE2, discrete_input=True))
    runtime.initialize(case.parallel)
    stage = case.chunk_builder()(True, True, None)
    books = codebooks(case.model)["semantic"]
    expected_input = sum(book[codes[..., d]] for d, book in enumerate(books))  # [n, P, C]
    got = stage.image_features(None, codes)
    expected = stage.projector(expected_input)
    names = {n.split(".")[0] for n, _ in stage.named_parameters()}
    fc1 = stage.projector.encoder.linear_fc1.weight.shape
    runtime.destroy()
    return (got - expected).abs().max().item(), names, tuple(fc1)


def test_discrete_input_replaces_encoder_features_by_codebook_vectors():
    codes = torch.stack([torch.randint(0, v, (2, 4)) for v in TINY_MODEL.asvr.semantic.sizes], dim=-1)
    diff, names, fc1 = run_ranks(_discrete_features, 1, codes)[0]
    assert diff == 0.0
    assert "vision_encoder" not in names
    assert fc1 == (64, 12)  # projector input is the codebook width C, not the encoder width
    discrete_model = _with_asvr(STAGE2, discrete_input=True)
    continuous = run_ranks(train_case, 1, VLMCase(model=STAGE2, steps=1))[0]
    result = run_ranks(train_case, 1, VLMCase(model=discrete_model, steps=1))[0]
    got, base = losses([result], discrete_model), losses([continuous], STAGE2)
    assert got["0/text"] != base["0/text"] and 2.5 < got["0/semantic"] < 3.5
    assert result["grads"][0]["projector.encoder.linear_fc1.weight"].shape == (64, 12)


def test_dist_checkpoint_reshards_the_whole_model(tmp_path):
    """Saved at TP=2 x PP=2 (head linears in containers, TP-sharded classifiers), loaded at
    TP=1 x PP=1 and at PP=2 x DP=2: the same evaluation losses (1e-6)."""
    from tests.support.harness import evaluate_checkpoint

    directory = str(tmp_path / "ckpt")
    saved = run_ranks(train_case, 4, VLMCase(model=STAGE2, steps=1, parallel=ParallelConfig(2, 2)), save_to=directory)
    expected = losses(saved, STAGE2, key="eval")
    for world_size, parallel in [(1, ParallelConfig()), (4, ParallelConfig(pipeline_parallel=2))]:
        results = run_ranks(evaluate_checkpoint, world_size, VLMCase(model=STAGE2, parallel=parallel), directory)
        got = losses([{"eval": r} for r in results], STAGE2, key="eval")
        _assert_close(got, expected, 1e-6, f"eval at {parallel}")


def test_activation_recompute_changes_nothing_but_memory():
    """Full recompute (LLM layers and head layers) and selective recompute (LLM core attention):
    the same losses and gradients as no recompute."""
    from tests.support import tiny_vlm

    plain = run_ranks(train_case, 1, VLMCase(model=STAGE2, steps=1))[0]
    for changes in ({"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
                    {"recompute_granularity": "selective"}):
        case = tiny_vlm.VLMCase(model=STAGE2, steps=1, config_changes=changes)
        result = run_ranks(train_case, 1, case, plain["initial"])[0]
        _assert_close(losses([result], STAGE2), losses([plain], STAGE2), 1e-6, f"{changes} losses")
        _assert_close(result["grads"][0], plain["grads"][0], 1e-6, f"{changes} grads")


def _load_into_model_with_heads(directory):
    from megatron_asvr import runtime
    from megatron_asvr.model.canonical import full_state
    from megatron_asvr.checkpoint.model import VISUAL_HEADS, load_weights
    from megatron_asvr.model.chunks import build_model_chunks

    case = VLMCase(model=STAGE2)
    info = runtime.initialize(case.parallel)
    chunks = build_model_chunks(case.chunk_builder(), info.device)
    before = full_state(chunks)
    load_weights(chunks, directory, optional=(VISUAL_HEADS,))
    after = full_state(chunks)
    runtime.destroy()
    return before, after


def test_stage2_with_heads_loads_a_stage1_checkpoint_without_them(tmp_path):
    """The paper's "visual loss only in stage 2" ablation: stage 1 trains without a head; stage 2
    loads everything else from it and starts its heads from their initialisation."""
    no_visual = _with_asvr(STAGE2, visual_loss=False)
    saved = run_ranks(train_case, 1, VLMCase(model=no_visual, steps=1), save_to=str(tmp_path / "ckpt"))[0]
    before, after = run_ranks(_load_into_model_with_heads, 1, str(tmp_path / "ckpt"))[0]
    heads = [n for n in after if n.startswith("visual_heads.")]
    assert heads and all(torch.equal(after[n], before[n]) for n in heads)
    assert all(torch.equal(after[n], saved["params"][-1][n]) for n in after if n not in heads)
