"""TP=2, PP=2 and DP=2 against one process under NCCL: the equivalence test's tiny GPT (tests/support/tiny_gpt.py)
trained 3 steps at each layout, its losses, grad norms and parameters compared with the single-process run.

    python -m tools.gpu_check.nccl_equivalence --reference REF.pt             # one process: the reference
    torchrun --nproc_per_node 2 -m tools.gpu_check.nccl_equivalence --compare REF.pt --result OUT.json

Every fast path as ``auto`` decides (on with CUDA), on both sides. The layouts share one process group
(megatron's groups are rebuilt per layout); the last rank writes the comparison.
"""

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_asvr import runtime
from megatron_asvr.config import ParallelConfig
from megatron_asvr.model.canonical import merge_ranks
from tests.support.harness import train_case
from tests.support.tiny_gpt import GPTCase, mean_losses

LAYOUTS = {"tp2": ParallelConfig(tensor_parallel=2), "pp2": ParallelConfig(pipeline_parallel=2),
           "dp2_distributed_optimizer": ParallelConfig(distributed_optimizer=True)}
TOLERANCE = 1e-4  # losses, parameters (absolute) and grad norms (relative): NCCL's reduction order, fp32


def _cpu(value):
    if torch.is_tensor(value):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu(v) for v in value)
    return value  # numbers, dtypes; the loss reports are on the host already


def compare(reference: dict, results: list) -> dict:
    """Worst differences of ``results`` (every rank's) from ``reference``."""
    expected, got = mean_losses([reference]), mean_losses(results)
    loss = max(abs(got[k] - v) for k, v in expected.items())
    norms = max(abs(n - r) / r for result in results for n, r in zip(result["grad_norms"], reference["grad_norms"]))
    params = max((merge_ranks([r["params"][step] for r in results])[name] - value).abs().max().item()
                 for step in range(len(reference["params"])) for name, value in reference["params"][step].items())
    return {"max_loss_diff": loss, "max_grad_norm_rel_diff": norms, "max_param_diff": params,
            "ok": max(loss, norms, params) <= TOLERANCE}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, help="write the single-process run here")
    parser.add_argument("--compare", type=Path, help="the reference to compare the layouts with")
    parser.add_argument("--result", type=Path, help="the comparison's JSON (with --compare)")
    args = parser.parse_args()
    if args.reference:
        torch.save(_cpu(train_case(GPTCase())), args.reference)
        return
    reference = torch.load(args.compare, weights_only=False)
    # One process group for every layout: train_case's teardown keeps it (megatron's groups are rebuilt).
    from megatron.core import parallel_state

    runtime.destroy = parallel_state.destroy_model_parallel
    out = {}
    for name, parallel in LAYOUTS.items():
        mine = _cpu(train_case(GPTCase(parallel=parallel), reference["initial"]))
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        out[name] = compare(reference, everyone)
        print(f"{name}: {out[name]}", flush=True)
    if dist.get_rank() == dist.get_world_size() - 1:
        args.result.write_text(json.dumps(out, indent=2))
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
