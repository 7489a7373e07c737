"""megatron-core's TP / PP / VP / SP / DP paths on CPU match the single-process run.

A LLaMA-shaped GPT (4 layers, GQA 4 heads / 2 KV heads, RoPE, SwiGLU, fp32) is
trained for 3 AdamW steps (grad clipping at 0.5 engaged) on fixed batches; the
per-micro-batch losses, grad norms and all parameters after every step must
equal the TP=PP=DP=1 run. Some layouts run with fast paths on (``FAST_PATHS``; the reference runs
every one off): each switch is on in one layout at least and off in the others.
"""

import pytest
import torch

from tests.support.harness import ALL_FAST_PATHS, train_case
from tests.support.multirank import run_ranks
from tests.support.tiny_gpt import GPTCase, mean_losses
from megatron_asvr.config import FastPathsConfig, ParallelConfig
from megatron_asvr.model.canonical import merge_ranks

LOSS_TOL = 1e-5  # per-micro-batch mean loss, absolute
PARAM_TOL = 1e-5  # every parameter element after every step, absolute
GRAD_NORM_RTOL = 1e-5

LAYOUTS = {
    "tp2_pp2": (4, ParallelConfig(tensor_parallel=2, pipeline_parallel=2)),
    "tp1_pp4": (4, ParallelConfig(pipeline_parallel=4)),
    "tp2_sequence_parallel": (2, ParallelConfig(tensor_parallel=2, sequence_parallel=True)),
    "dp2_distributed_optimizer": (2, ParallelConfig(distributed_optimizer=True)),
    "pp2_virtual2": (2, ParallelConfig(pipeline_parallel=2, virtual_pipeline=2)),
    # DP communication overlapped with compute (bucketed reduce-scatter in backward, param
    # all-gather in the next forward), small buckets so several are in flight
    "tp2_pp2_dp2_overlap": (8, ParallelConfig(tensor_parallel=2, pipeline_parallel=2, distributed_optimizer=True,
                                              overlap_grad_reduce=True, overlap_param_gather=True)),
}
BUCKETS = {"tp2_pp2_dp2_overlap": 8192}  # elements per gradient bucket: 4 on a first-stage rank (~40k parameters)
FAST_PATHS = {
    "tp2_pp2": ALL_FAST_PATHS,
    "dp2_distributed_optimizer": FastPathsConfig(fused_adam=True, foreach_clip=True),  # AdamW on shards
    # wgrad into main_grad after the sequence-parallel all-gather; SDPA's CPU flash kernel
    "tp2_sequence_parallel": FastPathsConfig(wgrad_accumulation=True, rms_norm="torch", attention="flash"),
    # main_grad written by the GEMM while DDP's overlapped bucket hooks watch grad_added_to_main_grad
    "tp2_pp2_dp2_overlap": FastPathsConfig(wgrad_accumulation=True, fused_adam=True, bias_fusions=True),
}


@pytest.fixture(scope="module")
def reference():
    return run_ranks(train_case, 1, GPTCase())[0]


def test_reference_trains(reference):
    losses = mean_losses([reference])
    assert len(losses) == 3 * 4
    # Clipping is engaged (norms above 0.5) and the steps change every parameter.
    assert all(norm > 0.5 for norm in reference["grad_norms"])
    moved = [n for n, p in reference["params"][-1].items() if torch.equal(p, reference["initial"][n])]
    assert moved == []


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_single_process(reference, layout):
    world_size, parallel = LAYOUTS[layout]
    fast_paths = FAST_PATHS.get(layout, FastPathsConfig())
    case = GPTCase(parallel=parallel, bucket_size=BUCKETS.get(layout), fast_paths=fast_paths)
    results = run_ranks(train_case, world_size, case, reference["initial"])
    resolved = case.resolved_fast_paths()  # auto: off on CPU, unless ASVR_FAST_PATHS=on
    assert {r["fused_adam"] for r in results} == {resolved.fused_adam}
    if layout in BUCKETS:  # megatron buckets the first pipeline stage only
        assert max(r["grad_buckets"] for r in results) > 1, [r["grad_buckets"] for r in results]

    expected, got = mean_losses([reference]), mean_losses(results)
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert abs(got[key] - value) <= LOSS_TOL, (layout, key, got[key], value)

    for result in results:
        for norm, ref_norm in zip(result["grad_norms"], reference["grad_norms"]):
            assert abs(norm - ref_norm) <= GRAD_NORM_RTOL * ref_norm, (layout, norm, ref_norm)

    for step in range(3):
        params = merge_ranks([r["params"][step] for r in results])
        ref_params = reference["params"][step]
        assert sorted(params) == sorted(ref_params)
        for name, value in ref_params.items():
            diff = (params[name] - value).abs().max().item()
            assert diff <= PARAM_TOL, (layout, step, name, diff)
