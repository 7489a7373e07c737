"""Training-throughput benchmark on synthetic batches at real shapes: tokens/s, TFLOP/s and MFU from the
whole-model FLOP count, peak memory, the visual head's share, ASVR-vs-baseline and bf16-vs-FP8 comparisons."""

from megatron_asvr.benchmark.settings import BenchmarkError, BenchmarkSettings

__all__ = ["BenchmarkError", "BenchmarkSettings"]
