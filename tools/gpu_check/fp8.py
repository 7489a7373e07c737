"""Step (e): FP8 through Transformer Engine (tools/benchmark.py bench.mode=ab: bf16 against FP8), where TE imports.

TE's wheel is far larger than what travels to the lent machine, so there the expected result is
"not available on this machine"; on a machine with TE and a Hopper GPU this runs step (d)'s model
with TE layers, the tensorwise recipe.
"""

import importlib

from tools.gpu_check.step_io import NOT_AVAILABLE, OK, main
from tools.gpu_check.throughput import run_benchmark


def run(args) -> dict:
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception as err:  # ImportError, or TE's own errors at import (a CUDA / torch mismatch)
        return {"status": NOT_AVAILABLE, "summary": f"not available on this machine: transformer_engine does not "
                                                    f"import ({type(err).__name__}: {str(err)[:150]})"}
    if args.cpu:
        return {"status": NOT_AVAILABLE, "summary": "not available on this machine: FP8 needs a GPU"}
    from tools.gpu_check.shapes import largest_llm_layers, throughput_overrides

    layers, _ = largest_llm_layers(args.cpu)
    overrides = throughput_overrides(args.cpu, layers) + ["model.transformer_impl=transformer_engine",
                                                          "bench.fp8_recipe=tensorwise", "bench.mode=ab"]
    data = run_benchmark(args.cpu, overrides, args.work)
    ab = data["comparisons"]["ab"]
    diffs = ", ".join(f"{k.split('/', 1)[1]} {v:.3g}" for k, v in ab.items() if k.startswith("max_abs_diff/"))
    return {"status": OK, "summary": f"{layers} LLM layers: FP8 speed-up {ab['speedup']:.3f} over bf16; "
                                     f"max |loss diff| {diffs}", "comparison": ab, "runs": data["runs"]}


if __name__ == "__main__":
    main(run, __doc__)
