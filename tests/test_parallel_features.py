"""bf16 with fp32 main params, dropout through the RNG tracker, dist checkpoints across layouts, and a
Qwen-shaped decoder with tied embeddings through pipeline parallelism and the distributed optimizer."""

import dataclasses

import torch

from tests.support.harness import evaluate_checkpoint, load_checkpoint, train_case
from tests.support.multirank import run_ranks
from tests.support.tiny_gpt import TINY_LLAMA, GPTCase
from tests.support.tiny_gpt import mean_losses as _mean_losses
from megatron_asvr.config import FastPathsConfig, LLMConfig, ParallelConfig
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
    # Pure bf16 (train.master_weights=false, the race's pair B): AdamW steps the bf16 parameters themselves on
    # bf16 gradients, clipped by the foreach clip; it follows the fp32-master run within bf16 resolution.
    pure = run_ranks(train_case, 1, dataclasses.replace(case, master_weights=False, fast_paths=FastPathsConfig(
        foreach_clip=True, fused_adam=True)), reference["initial"])[0]
    assert pure["main_param_dtypes"] == {torch.bfloat16} and pure["fused_adam"]
    got = _mean_losses([pure])
    assert max(abs(got[k] - v) for k, v in expected.items()) <= 2e-2 and got != expected
    for name, value in reference["params"][-1].items():
        assert (pure["params"][-1][name].float() - value.float()).abs().max().item() <= 3e-2, name


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


# Qwen's variations all at once: tied embeddings, q/k/v biases, per-head q/k norms, head_dim 24 != 64 / 4.
TIED_QWEN = LLMConfig(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, head_dim=24,
                      ffn_hidden_size=96, vocab_size=256, max_sequence_length=32, rotary_base=1e6, norm_eps=1e-6,
                      untie_embeddings=False, qkv_bias=True, qk_norm=True)
EMBEDDING, OUTPUT = "embedding.word_embeddings.weight", "output_layer.weight"


def test_tied_embeddings_through_pipeline_and_distributed_optimizer(tmp_path):
    """TP=2 (sequence parallel) x PP=2 with the distributed optimizer: the first stage's embedding and the
    last stage's copy of it as LM head (megatron's shared-embedding group sums their gradients) follow the
    single-process run for 20 steps, and so do the q/k norms (each TP rank holds half the heads: their
    gradients are summed over TP); the copies stay bitwise equal after every step, after reloading the
    checkpoint at the same layout and after resharding it to TP=1 x PP=1, which evaluates the same."""
    # Adam's first steps move a weight by ~lr * g / (|g| + eps): with eps far below the noise of summing
    # gradients in another order (~1e-10 here), a near-zero gradient's step is that noise amplified.
    case = GPTCase(llm=TIED_QWEN, steps=20, adam_eps=1e-6)
    reference = run_ranks(train_case, 1, case)[0]
    assert OUTPUT not in reference["initial"]  # one stage: the LM head is the embedding itself
    initial = dict(reference["initial"], **{OUTPUT: reference["initial"][EMBEDDING]})
    parallel = ParallelConfig(tensor_parallel=2, pipeline_parallel=2, sequence_parallel=True,
                              distributed_optimizer=True)
    directory = str(tmp_path / "ckpt")
    results = run_ranks(train_case, 4, dataclasses.replace(case, parallel=parallel), initial, save_to=directory)

    expected, got = _mean_losses([reference]), _mean_losses(results)
    assert sorted(got) == sorted(expected) and len(got) == 20 * 4
    worst = max(abs(got[key] - value) for key, value in expected.items())
    print(f"tied TP=2 (SP) x PP=2 vs TP=PP=1 over 20 steps: worst per-micro-batch loss difference {worst:.2e}")
    assert worst <= 1e-5
    moved = [n for n, p in reference["params"][-1].items() if torch.equal(p, reference["initial"][n])]
    assert moved == []  # every parameter, the q/k norms and biases included, trains
    for step in range(20):
        params = merge_ranks([r["params"][step] for r in results])
        assert torch.equal(params.pop(OUTPUT), params[EMBEDDING]), step
        for name, value in reference["params"][step].items():
            assert (params[name] - value).abs().max().item() <= 1e-5, (step, name)

    saved_eval = _mean_losses(results, key="eval")
    for world_size, layout in [(4, parallel), (1, ParallelConfig())]:
        loaded = run_ranks(load_checkpoint, world_size, dataclasses.replace(case, parallel=layout), directory)
        params = merge_ranks([r["params"] for r in loaded])
        if OUTPUT in params:
            assert torch.equal(params.pop(OUTPUT), params[EMBEDDING])
        trained = merge_ranks([r["params"][-1] for r in results])
        assert all(torch.equal(params[name], trained[name]) for name in params)
        got = _mean_losses([{"eval": r["eval"]} for r in loaded], key="eval")
        assert sorted(got) == sorted(saved_eval)
        assert all(abs(got[k] - v) <= 1e-6 for k, v in saved_eval.items()), (layout, got, saved_eval)
