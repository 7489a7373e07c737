"""The GPU check (issue 14): one prepared command that turns a lent GPU machine into measured facts.

``scripts/gpu_check.sh`` runs ``tools.gpu_check.run``, which runs each step below in its own process
under its own time budget; ``--cpu`` runs the same steps at tiny shapes (CI).

    wheels.py        the companion of scripts/gpu_wheels.sh: requirements of the wheels that travel
    run.py           the steps, their budgets, the deadline; results and the combined log
    report.py        the JSON and markdown of the results
    stamp.py         device, versions, date, commit
    step_io.py       what every step module shares: arguments, its result file, errors
    kernels.py       (a) the fused multi-depth CE kernels against the reference
    train_resume.py  (b) tools/train.py: 20 steps; killed after the step-10 checkpoint and resumed
    fused_ce.py      (c) fused CE at the real head shape against naive, Liger, Cut Cross-Entropy; the same
                     benchmark is tools/bench_fused_ce.py on CPU
    shapes.py        the shapes of (c), (d) and (e) on GPU and on CPU; the planner's layer count
    throughput.py    (d) tools/benchmark.py bench.mode=compare-asvr at Vicuna-7B widths
    hf_baseline.py   (d) the same model as the released code runs it: transformers LLaVA + plain_head.py
    plain_head.py    the ASVR visual head in plain PyTorch (materialised logits)
    fp8.py           (e) FP8 through Transformer Engine, or "not available on this machine"
"""
