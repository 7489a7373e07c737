"""bf16 with fp32 main params, dropout through the RNG tracker, and dist checkpoints across layouts."""

import dataclasses

import torch

from tests.support.harness import evaluate_checkpoint, train_case
from tests.support.multirank import run_ranks
from tests.support.tiny_gpt import TINY_LLAMA, GPTCase
from tests.support.tiny_gpt import mean_losses as _mean_losses
from megatron_asvr.config import ParallelConfig
from megatron_asvr.model.canonical import merge_ranks


def test_bf16_params_with_fp32_main_params_distributed_optimizer():
    """bf16 model params, fp32 main params in megatron's distributed optimizer.

    DP=2 (distributed optimizer) and TP=2 x SP x DP=2 (distributed optimizer)
    follow the bf16 DP=1 run within bf16 resolution over 3 steps.
    """
    case = GPTCase(params_dtype=torch.bfloat16)
    reference = run_ranks(train_case, 1, case)[0]
    assert reference["main_param_dtypes"] == {torch.float32}
    expected = _mean_losses([reference])
    layouts = [
        (2, ParallelConfig(distributed_optimizer=True)),
        (4, ParallelConfig(tensor_parallel=2, sequence_parallel=True, distributed_optimizer=True)),
    ]
    for world_size, parallel in layouts:
        results = run_ranks(train_case, world_size, dataclasses.replace(case, parallel=parallel), reference["initial"])
        assert {d for r in results for d in r["main_param_dtypes"]} == {torch.float32}
        got = _mean_losses(results)
        assert sorted(got) == sorted(expected)
        for key, value in expected.items():
            assert abs(got[key] - value) <= 2e-3, (parallel, key, got[key], value)
        params = merge_ranks([r["params"][-1] for r in results])
        assert all(p.dtype == torch.bfloat16 for p in params.values())
        for name, value in reference["params"][-1].items():
            assert (params[name].float() - value.float()).abs().max().item() <= 2e-2, (parallel, name)


def test_dropout_is_reproducible_through_the_rng_tracker():
    """Dropout at TP=2 x DP=2: same seed -> bitwise the same run; TP ranks draw from
    different model-parallel streams, yet replicated parameters stay identical
    (merge_ranks checks replicas bitwise); dropout really changes the losses."""
    llm = dataclasses.replace(TINY_LLAMA, hidden_dropout=0.1, attention_dropout=0.1)
    parallel = ParallelConfig(tensor_parallel=2)
    case = GPTCase(parallel=parallel, llm=llm, steps=2)
    first = run_ranks(train_case, 4, case)
    second = run_ranks(train_case, 4, case, first[0]["initial"])
    no_dropout = run_ranks(train_case, 4, dataclasses.replace(case, llm=TINY_LLAMA), first[0]["initial"])

    assert _mean_losses(first) == _mean_losses(second)
    for step in range(2):
        a = merge_ranks([r["params"][step] for r in first])
        b = merge_ranks([r["params"][step] for r in second])
        assert all(torch.equal(a[n], b[n]) for n in a)
    losses, plain = _mean_losses(first), _mean_losses(no_dropout)
    assert all(abs(losses[k] - plain[k]) > 1e-4 for k in losses)

    by_rank = {(r["tp_rank"], r["dp_rank"]): r["model_parallel_rng"] for r in first}
    assert not torch.equal(by_rank[(0, 0)], by_rank[(1, 0)])  # TP ranks differ
    assert torch.equal(by_rank[(0, 0)], by_rank[(0, 1)])  # DP replicas agree


def test_dist_checkpoint_loads_at_other_layouts(tmp_path):
    """Saved at TP=2 x PP=2 after one step; loaded at TP=1 x PP=1 and TP=1 x PP=2 x DP=2."""
    directory = str(tmp_path / "ckpt")
    saved = run_ranks(train_case, 4, GPTCase(parallel=ParallelConfig(2, 2), steps=1), save_to=directory)
    expected = _mean_losses(saved, key="eval")
    assert len(expected) == 4
    for world_size, parallel in [(1, ParallelConfig()), (4, ParallelConfig(pipeline_parallel=2))]:
        results = run_ranks(evaluate_checkpoint, world_size, GPTCase(parallel=parallel), directory)
        got = _mean_losses([{"eval": r} for r in results], key="eval")
        assert sorted(got) == sorted(expected)
        for key, value in expected.items():
            assert abs(got[key] - value) <= 1e-6, (parallel, key, got[key], value)
