"""What every step module shares: its arguments, its device, and one JSON result file.

A step module's ``run(args) -> dict`` returns at least {"status": "ok" | "failed" | "not available",
"summary": one line}; an exception becomes a failed result with its traceback, exit status 1.
"""

import argparse
import json
import sys
import traceback
from pathlib import Path
from typing import Callable, Optional

OK, FAILED, NOT_AVAILABLE = "ok", "failed", "not available"
REPO = Path(__file__).resolve().parents[2]


def device(cpu: bool):
    """CPU with ``--cpu``; else the GPU, which must be there."""
    import torch

    if cpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device visible (use --cpu on a machine without a GPU)")
    return torch.device("cuda")


def main(run: Callable[[argparse.Namespace], dict], description: str,
         add_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None) -> None:
    """Parse ``--cpu --result PATH --work DIR``, run the step, write its result, exit 1 when it failed."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on CPU")
    parser.add_argument("--result", type=Path, required=True, help="the step's JSON result")
    parser.add_argument("--work", type=Path, required=True, help="scratch directory")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    try:
        result = run(args)
    except Exception as err:  # the step's own failure, recorded; the check goes on
        traceback.print_exc()
        result = {"status": FAILED, "summary": f"{type(err).__name__}: {err}".splitlines()[0][:300],
                  "error": traceback.format_exc()[-3000:]}
    args.result.write_text(json.dumps(result, indent=2, default=str))
    print(f"{result['status']}: {result['summary']}", flush=True)
    sys.exit(1 if result["status"] == FAILED else 0)
