"""Step (nccl), with 2 or more GPUs: TP=2 / PP=2 / DP=2 against one process under NCCL
(tools/gpu_check/nccl_equivalence.py), then a TP=2 throughput row of the ASVR step (6 LLM layers, the recipe
of step d). With one GPU, or --cpu (the CPU tests run these layouts under gloo): not available.
"""

import json
import subprocess
import sys

from tools.gpu_check.shapes import llm_layers, throughput_overrides
from tools.gpu_check.step_io import FAILED, NOT_AVAILABLE, OK, REPO, main
from tools.gpu_check.throughput import run_benchmark, run_rows

GPUS = 2


def _torchrun(*argv: str) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={GPUS}", *argv]


def run(args) -> dict:
    import torch

    count = 0 if args.cpu else torch.cuda.device_count()
    if count < GPUS:
        return {"status": NOT_AVAILABLE, "summary": f"needs {GPUS} GPUs, this machine has {count or 'none'} "
                                                    f"(the CPU tests run the same layouts under gloo)"}
    reference, result = args.work / "reference.pt", args.work / "nccl_equivalence.json"
    for argv in ([sys.executable, "-m", "tools.gpu_check.nccl_equivalence", "--reference", str(reference)],
                 _torchrun("-m", "tools.gpu_check.nccl_equivalence", "--compare", str(reference),
                           "--result", str(result))):
        print("$ " + " ".join(argv), flush=True)
        if subprocess.run(argv, cwd=REPO).returncode:
            return {"status": FAILED, "summary": f"{' '.join(argv[2:4])} failed (its output is in the log)"}
    layouts = json.loads(result.read_text())
    layers, planned = llm_layers(args.cpu, "6")
    overrides = throughput_overrides(args.cpu, layers) + ["parallel.tensor_parallel=2", "bench.mode=single",
                                                          "bench.profile=false"]
    data = run_benchmark(args.cpu, overrides, args.work, launcher=_torchrun())
    rows = run_rows(data, planned)
    tp2 = rows[0]
    ok = all(v["ok"] for v in layouts.values())
    summary = ("NCCL layouts " + ", ".join(f"{k} {'ok' if v['ok'] else 'DIFFERS'} (loss {v['max_loss_diff']:.1e}, "
                                           f"params {v['max_param_diff']:.1e})" for k, v in layouts.items())
               + f"; TP=2 ASVR step {tp2['step_time_s']:.3f} s, {tp2['tflops_per_gpu']:.4g} TFLOP/s/GPU")
    return {"status": OK if ok else FAILED, "summary": summary, "layouts": layouts, "runs": rows}


if __name__ == "__main__":
    main(run, __doc__)
