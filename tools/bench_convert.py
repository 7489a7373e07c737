"""Measure the peak memory and time of HF import and export per layout (a markdown table).

    python tools/bench_convert.py --sizes small medium --layouts 1x1 2x1 1x2

The table behind "bounded memory". A random llava-hf model of the chosen size (transformers, fp32, SigLIP-shaped
tower, LLaMA-shaped LM) is imported into our checkpoint and exported back, at
each TP x PP layout on that many CPU ranks. Per rank, peak memory is the peak
resident set size during the conversion (VmHWM, reset through
/proc/self/clear_refs once the runtime is up) minus the resident size at that
moment; it is shown next to the bytes of the whole model and of one rank's
share of it. Streaming keeps a rank near its own share (plus one tensor, one
safetensors shard buffer and the dist checkpoint's buffers); two full copies of
the model would show as a ratio of 2 or more at TP = PP = 1.
"""

import argparse
import dataclasses
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import torch

from megatron_asvr.config import (
    ASVRConfig, CodebookSpec, HeadConfig, LLMConfig, ModelConfig, ParallelConfig, VisionConfig,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests/ is not installed
from tests.support.multirank import run_ranks  # noqa: E402

MIB = 2**20
SIZES: Dict[str, ModelConfig] = {
    "small": ModelConfig(
        vision=VisionConfig(num_layers=3, hidden_size=128, num_attention_heads=4, ffn_hidden_size=256, image_size=56),
        llm=LLMConfig(num_layers=4, hidden_size=512, num_attention_heads=8, ffn_hidden_size=1376, vocab_size=8000),
    ),
    "medium": ModelConfig(
        vision=VisionConfig(num_layers=4, hidden_size=384, num_attention_heads=6, ffn_hidden_size=1536, image_size=112),
        llm=LLMConfig(num_layers=8, hidden_size=1024, num_attention_heads=16, num_query_groups=4,
                      ffn_hidden_size=2816, vocab_size=32000),
    ),
}
HEAD = ASVRConfig(head=HeadConfig(hidden_size=256, num_layers=2, num_attention_heads=4),
                  semantic=CodebookSpec(sizes=[1024] * 4, dim=64))


@dataclass(frozen=True)
class Row:
    size: str
    phase: str  # import | export
    tp: int
    pp: int
    model_mib: float
    peak_mib: float  # the largest rank's peak above its resident size before converting
    seconds: float


def _read_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(f"/proc/self/status has no {field}")


def _convert_on_rank(phase: str, parallel: ParallelConfig, source: str, out: str, base: ModelConfig,
                     shard_mib: int) -> dict:
    from megatron_asvr import runtime
    from megatron_asvr.config.tools import ExportOptions, ImportSources
    from megatron_asvr.convert.hf_export import export_hf
    from megatron_asvr.convert.hf_import import import_hf

    info = runtime.initialize(parallel)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _read_kib("VmRSS")
    started = time.perf_counter()
    if phase == "import":
        import_hf(ImportSources(llava=Path(source)), out, parallel, base, torch.float32, info.device, progress=False)
    else:
        options = ExportOptions(dtype="fp32", max_shard_bytes=shard_mib * MIB, progress=False)
        export_hf(source, out, parallel, options, info.device)
    seconds = time.perf_counter() - started
    peak = _read_kib("VmHWM") - before
    runtime.destroy()
    return {"peak_mib": peak / 1024, "seconds": seconds}


def write_hf_model(model: ModelConfig, directory: Path) -> int:
    """A random llava-hf model of ``model``'s shape in ``directory``; returns its bytes."""
    import transformers

    from megatron_asvr.convert.hf_config import llava_to_hf
    from megatron_asvr.convert.hf_vocab import appended_vocab

    config = llava_to_hf(model, appended_vocab(model.llm.vocab_size), model.vision.num_layers, -2, "float32")
    hf = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig.from_dict(config))
    hf.save_pretrained(directory, max_shard_size="256MB")
    return sum(p.numel() * p.element_size() for p in hf.parameters())


def run(sizes: List[str], layouts: List[tuple], shard_mib: int = 64) -> List[Row]:
    """Import then export each size at each (tp, pp) layout; one row per conversion. The export
    writes safetensors shards of ``shard_mib`` MiB (its buffer is part of the peak)."""
    rows = []
    for size in sizes:
        base = dataclasses.replace(SIZES[size], asvr=HEAD, transformer_impl="local")
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            model_bytes = write_hf_model(base, root / "hf")
            for tp, pp in layouts:
                parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp)
                ours, back = root / f"ours_tp{tp}_pp{pp}", root / f"hf_tp{tp}_pp{pp}"
                for phase, source, out in (("import", root / "hf", ours), ("export", ours, back)):
                    results = run_ranks(_convert_on_rank, tp * pp, phase, parallel, str(source), str(out), base,
                                        shard_mib, timeout=1800)
                    rows.append(Row(size, phase, tp, pp, model_bytes / MIB, max(r["peak_mib"] for r in results),
                                    max(r["seconds"] for r in results)))
    return rows


def format_table(rows: List[Row]) -> str:
    lines = [
        "| model | phase | TP x PP | model MiB | model MiB per rank | peak MiB (largest rank) | peak / model | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = r.model_mib / (r.tp * r.pp)
        lines.append(f"| {r.size} | {r.phase} | {r.tp} x {r.pp} | {r.model_mib:.0f} | {share:.0f} | "
                     f"{r.peak_mib:.0f} | {r.peak_mib / r.model_mib:.2f} | {r.seconds:.1f} |")
    return "\n".join(lines)


def _layout(text: str) -> tuple:
    tp, pp = text.lower().split("x")
    return int(tp), int(pp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["small"])
    parser.add_argument("--layouts", nargs="+", type=_layout, default=[(1, 1), (2, 1)], metavar="TPxPP")
    parser.add_argument("--shard-mib", type=int, default=64, help="safetensors shard size of the export")
    args = parser.parse_args()
    print(f"export shards: {args.shard_mib} MiB")
    print(format_table(run(args.sizes, args.layouts, args.shard_mib)))


if __name__ == "__main__":
    main()
