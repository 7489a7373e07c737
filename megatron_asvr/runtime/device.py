"""Device facts: the parameters' dtype for a precision name, and peak memory for the reports."""

import resource

import torch

# The one mapping from a precision name (config, command lines) to a torch dtype.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_of(precision: str) -> torch.dtype:
    """The torch dtype of ``precision`` (a key of ``DTYPES``); ``auto``: bf16 on a GPU, fp32 on CPU."""
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if precision not in DTYPES:
        raise ValueError(f"precision must be auto or one of {', '.join(DTYPES)}, got {precision!r}")
    return DTYPES[precision]


def peak_memory_bytes() -> int:
    """Peak GPU memory allocated by torch, or on CPU the process's peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
