"""What the tests share, outside the library and never installed (tests/test_layering.py).

    multirank.py      run a function on N CPU ranks (gloo) from pytest and collect what each returns
    harness.py        train / evaluate a Case through the Trainer at any layout; parameter comparison
    tiny_gpt.py       tiny_vlm.py   tiny models and batches for the equivalence tests
    tiny_run.py       a complete tiny training set-up on disk (the demo pipeline at test size)
    faults.py         tools/train.py with faults injected (killed, stalled, disk full), run under torchrun
    torchrun_job.py   a torchrun job from pytest, watched: its output, exit code, helpers left alive
    fixtures.py       test data outside the repository ($MEGATRON_ASVR_SHARED_DATA)
"""
