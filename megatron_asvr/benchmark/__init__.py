"""Training throughput on synthetic batches at a recipe's real shapes (tools/benchmark.py): tokens/s,
TFLOP/s and MFU from the whole-model FLOP count, peak memory, the visual head's share, and the
ASVR-vs-LLaVA, packing and precision A/B comparisons. Settings: a recipe with a ``bench`` section
(``config.BenchRunConfig``); the trainer is built as training builds it."""
