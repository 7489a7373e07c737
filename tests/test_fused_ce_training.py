"""The fused CE inside megatron's training step equals the unfused path.

Fused: the head passes the loss's per-depth gradient (model/loss.py visual_grad_scale, known before
the step) and the classifiers' gradients accumulate straight into megatron's fp32 ``main_grad``,
in the forward (grads_in_forward) or in the backward (recompute). Unfused: the same op under plain
autograd, its weight gradients added to main_grad by DDP's hooks. The tiny VLM trains 2 steps of
4 micro-batches; losses, every reduced gradient (main_grad) and every parameter after each step
must agree: in one process (fp32, also with full activation recompute; bf16 params), and at
TP=2 x PP=2 in both modes against the single-process unfused run.
"""

import dataclasses

import pytest
import torch

from tests.support.harness import train_case
from tests.support.multirank import run_ranks
from tests.support.tiny_vlm import TINY_MODEL, VLMCase, losses
from megatron_asvr.config import ParallelConfig
from megatron_asvr.model.canonical import merge_ranks

STAGE2 = dataclasses.replace(TINY_MODEL, trainable=["projector", "llm", "visual_head"])
FULL_RECOMPUTE = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
TP2_PP2 = ParallelConfig(tensor_parallel=2, pipeline_parallel=2)


def _train_runs(runs, initial=None):
    """Train each run (name, case, CE modes, fused) in turn in this rank, from the same initial
    weights; the op's calls take the modes in turn. Per run: the harness's results and, per
    differentiable call of the op, (mode, main_grad, grad_scale given)."""
    import megatron_asvr.model.head as head

    op, out = head.multi_depth_cross_entropy, {}
    for name, case, modes, fused in runs:
        calls = []

        def recorded(*args, **kwargs):
            kwargs["mode"] = modes[len(calls) % len(modes)]
            if not fused:
                kwargs.update(grad_scale=None, main_grad=False)
            if torch.is_grad_enabled():
                calls.append((kwargs["mode"], kwargs["main_grad"], kwargs["grad_scale"] is not None))
            return op(*args, **kwargs)

        head.multi_depth_cross_entropy = recorded
        try:
            result = train_case(case, initial)
        finally:
            head.multi_depth_cross_entropy = op
        initial = initial if initial is not None else result["initial"]
        out[name] = (result, calls)
    return out


def _assert_close(got: dict, expected: dict, tol: float, what: str):
    assert sorted(got) == sorted(expected), what
    for name, value in expected.items():
        if torch.is_tensor(value):
            diff, scale = (got[name].float() - value.float()).abs().max().item(), value.float().abs().max().item()
        else:
            diff, scale = abs(got[name] - value), abs(value)
        assert diff <= tol * max(1.0, scale), (what, name, diff, scale)


def _assert_same_training(results, reference, tol: float, what: str, model=STAGE2):
    _assert_close(losses(results, model), losses([reference], model), tol, f"{what} losses")
    for step in range(2):
        for key in ("grads", "params"):
            got = merge_ranks([r[key][step] for r in results])
            _assert_close(got, reference[key][step], tol, f"{what} {key} step {step}")


@pytest.fixture(scope="module")
def one_process():
    case = VLMCase(model=STAGE2, steps=2)
    bf16 = dataclasses.replace(case, params_dtype=torch.bfloat16)
    runs = [
        ("unfused", case, ("recompute",), False),
        ("grads_in_forward", case, ("grads_in_forward",), True),
        ("recompute", case, ("recompute",), True),
        ("full_recompute", dataclasses.replace(case, config_changes=FULL_RECOMPUTE), ("grads_in_forward",), True),
        ("bf16_unfused", bf16, ("recompute",), False),
        ("bf16_grads_in_forward", bf16, ("grads_in_forward",), True),
    ]
    return run_ranks(_train_runs, 1, runs)[0]


def test_training_runs_the_fused_path_and_the_unfused_one(one_process):
    for name, (_, calls) in one_process.items():
        assert len(calls) == 2 * 3, name  # 2 steps x 3 micro-batches with an image (one is text only)
        fused = not name.endswith("unfused")
        assert {(main_grad, scaled) for _, main_grad, scaled in calls} == {(fused, fused)}, name


@pytest.mark.parametrize("name", ["grads_in_forward", "recompute", "full_recompute"])
def test_fused_training_step_equals_unfused_in_one_process(one_process, name):
    _assert_same_training([one_process[name][0]], one_process["unfused"][0], 1e-6, name)


def test_bf16_fused_training_step_matches_unfused(one_process):
    # fused: the weight gradients accumulate in fp32; unfused: rounded to bf16, then added
    fused, unfused = one_process["bf16_grads_in_forward"][0], one_process["bf16_unfused"][0]
    _assert_close(losses([fused], STAGE2), losses([unfused], STAGE2), 1e-2, "bf16 losses")
    for step in range(2):
        _assert_close(fused["grads"][step], unfused["grads"][step], 2e-2, f"bf16 grads step {step}")


def test_tp2_pp2_fused_training_step_equals_unfused_single_process(one_process):
    # one launch: the micro-batches take grads_in_forward and recompute in turn (both accumulate into
    # main_grad, one in the forward, one in the backward)
    reference = one_process["unfused"][0]
    case = VLMCase(model=STAGE2, steps=2, parallel=TP2_PP2)
    results = run_ranks(_train_runs, 4, [("fused", case, ("grads_in_forward", "recompute"), True)],
                        reference["initial"])
    for rank in (2, 3):  # the last stage, where the head is
        assert sorted(set(results[rank]["fused"][1])) == [("grads_in_forward", True, True), ("recompute", True, True)]
    _assert_same_training([r["fused"][0] for r in results], reference, 1e-5, "tp2 pp2")
