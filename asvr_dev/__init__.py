"""The fused-CE micro-benchmark's machinery (tools/bench_fused_ce.py), pending its move into
tools/gpu_check/fused_ce.py. Not installed; the library never imports it (tests/test_layering.py)."""
