"""Development support, outside the library: megatron_asvr never imports it (tests/test_layering.py).

Used by tests/, tools/ and tools/gpu_check/; installed beside megatron_asvr by setup.py.

    multirank.py      run a function on N CPU ranks (gloo) from pytest and collect what each returns
    harness.py        train / evaluate a Case through the Trainer at any layout; parameter comparison
    tiny_gpt.py       tiny_vlm.py   tiny models and batches for the equivalence tests
    tiny_run.py       a complete tiny training set-up on disk (the demo pipeline at test size)
    faults.py         tools/train.py with faults injected (killed, stalled, disk full), run under torchrun
    torchrun_job.py   a torchrun job from pytest, watched: its output, exit code, helpers left alive
    fixtures.py       test data outside the repository (../shared/data)
    demo_data.py      the synthetic, learnable VQA corpus of the demo and the tests
    demo_encoder.py   a random SigLIP in HF format, the demo's visual-tokenizer encoder
    bench_convert.py  memory and time of the HF import / export (tools/bench_convert.py)
"""
