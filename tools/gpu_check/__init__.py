"""The GPU check (issue 14): one prepared command that turns a lent GPU machine into measured facts.

``scripts/gpu_check.sh`` runs ``tools.gpu_check.run``, which runs each step below in its own process
under its own time budget; ``--cpu`` runs the same steps at tiny shapes (CI).

    wheels.py           the companion of scripts/gpu_wheels.sh: requirements of the wheels that travel
    run.py              the steps, their budgets and caps, the deadline; results, profile summary, combined log
    report.py           the JSON and markdown of the results
    stamp.py            device, versions, date, commit
    step_io.py          what every step module shares: arguments, its result file, errors
    kernels.py          (a) the fused multi-depth CE kernels against the reference
    levers.py           (k) each fast path's lever in ms without a model build (docs/fast_paths.md)
    fused_ce.py         (c) fused CE at the real head shape against naive, Liger, Cut Cross-Entropy; the
                        same benchmark is tools/bench_fused_ce.py on CPU
    shapes.py           the shapes of (c), (d) and the race; the layer count from the device's memory
    throughput.py       (d), (d12), (dmax) tools/benchmark.py on configs/bench_vicuna7b_1gpu.yaml
    hf_baseline.py      (d-hf) the fair race with transformers LLaVA + plain_head.py: pairs A and B
    plain_head.py       the ASVR visual head in plain PyTorch (materialised logits)
    multi_gpu.py        (nccl) with 2+ GPUs: nccl_equivalence.py's layouts and a TP=2 throughput row
    nccl_equivalence.py TP2 / PP2 / DP2 against one process under NCCL (the tiny GPT of the CPU tests)
    train_resume.py     (b) tools/train.py: 20 steps; killed after the step-10 checkpoint and resumed
    fp8.py              (e) FP8 through Transformer Engine, or "not available on this machine"
"""
