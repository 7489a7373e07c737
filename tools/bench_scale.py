"""The data path at 0.1M-2M records: preprocessing, shards, loader start-up and memory, packing plans,
and an exact resume near the end of an epoch. Prints a markdown table (docs/benchmarks/scale_2m.md).

    python tools/bench_scale.py --records 100000 500000 2000000 --work /tmp/scale \\
        --tokenizer checkpoints/vicuna-7b-v1.5/tokenizer.model

For each size: a synthetic corpus (tools/make_scale_corpus.py), preprocessed with ``--workers``
workers (wall and CPU seconds: other jobs share the cores); the shards' bytes per part; then, in
fresh processes for each bunny2m recipe (configs/bunny2m_stage*.yaml: its global batch, micro-batch,
sequence length, packing), the loader's start-up time and resident memory, the time to plan one
step's micro-batches (the whole global batch on one rank: data-parallel size 1, the most a rank
plans), and a resume at 90% of an epoch: the time to its first step, and whether the next 100
samples are the ones a run from step 0 gets, in the same micro-batches (``benchmark.data_scale``).
The corpus is deleted once preprocessed, the shards after the measurements (``--keep`` keeps them).

``--replicate SHARDS --times K`` measures the loader side only, over K copies of a finished shard
directory (hard links, no disk): K x its records, each sample K times (identical copies train alike,
so the resume check still compares what training would see).
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = ("bunny2m_stage1", "bunny2m_stage2")
PLANNED_STEPS = 200  # random steps whose plans are timed
TARGET_CODES_BYTES = 729 * 8 * 2  # one image's semantic codes: SigLIP-384's 729 patches x depth 8, uint16


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def make_shards(records: int, work: Path, tokenizer: Path, workers: int) -> dict:
    """Corpus, then shards; their times and bytes."""
    from megatron_asvr.benchmark.scale_corpus import write_scale_corpus
    from megatron_asvr.config.tools import PreprocessConfig, ValidationConfig
    from megatron_asvr.data.preprocess import preprocess

    corpus, shards = work / f"corpus_{records}", work / f"shards_{records}"
    for path in (corpus, shards):
        shutil.rmtree(path, ignore_errors=True)
    start = time.perf_counter()
    write_scale_corpus(corpus, records)
    out = {"records": records, "corpus_seconds": time.perf_counter() - start,
           "corpus_bytes": (corpus / "corpus.jsonl").stat().st_size,
           "pool_images": sum(1 for p in (corpus / "images").rglob("*") if p.is_file()),
           "pool_bytes": sum(p.stat().st_size for p in (corpus / "images").rglob("*") if p.is_file())}
    load, cpu, start = _load(), _cpu_seconds(), time.perf_counter()
    report = preprocess(PreprocessConfig(
        inputs=((None, corpus / "corpus.jsonl"),), output_dir=shards, tokenizer=tokenizer, template="vicuna_v1",
        validation=ValidationConfig(image_root=corpus / "images"), workers=workers, progress=False))
    out.update(preprocess_seconds=time.perf_counter() - start, preprocess_cpu_seconds=_cpu_seconds() - cpu,
               preprocess_load_before=load, preprocess_load_after=_load(), written=report["written"],
               skipped=report["skipped"], workers=workers,
               main_peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    parts = {}
    for path in shards.glob("shard_*"):
        part = path.name.split(".", 1)[1]  # tokens.bin, tokens.idx, ..., table.npy
        parts[part] = parts.get(part, 0) + path.stat().st_size
    out["shard_bytes"] = parts
    shutil.rmtree(corpus)
    return out


def replicate(shards: Path, times: int, out: Path) -> int:
    """``out``: the shards of ``shards`` listed ``times`` times (hard links); returns its record count."""
    from megatron_asvr.data.shards import SHARD_MANIFEST

    manifest = json.loads((shards / SHARD_MANIFEST).read_text())
    out.mkdir(parents=True)
    listed = []
    for copy in range(times):
        for shard in manifest["shards"]:
            prefix = f"shard_{len(listed):05d}"
            for path in shards.glob(f"{shard['prefix']}.*"):
                os.link(path, out / (prefix + path.name[len(shard["prefix"]):]))
            listed.append({**shard, "prefix": prefix})
    (out / SHARD_MANIFEST).write_text(json.dumps({**manifest, "shards": listed,
                                                  "num_samples": sum(s["num_samples"] for s in listed)}))
    return sum(s["num_samples"] for s in listed)


def measure_recipes(shards: Path) -> dict:
    return {recipe: {"loader": _in_fresh_process("measure_loader", recipe, shards),
                     "resume": _in_fresh_process("measure_resume", recipe, shards)} for recipe in RECIPES}


def _config(recipe: str, shards: Path):
    from megatron_asvr.config.loading import load_run_config

    return load_run_config(REPO / "configs" / f"{recipe}.yaml", [f"data.shards={shards}"])


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def measure_loader(recipe: str, shards: Path) -> dict:
    """In a fresh process: start-up (shards opened, loader built, first step's plan), its RSS, plan times."""
    import numpy as np

    start = time.perf_counter()
    from megatron_asvr.benchmark.data_scale import recipe_loader
    from megatron_asvr.data.shards import ShardDataset

    imported, rss_imported, cpu = time.perf_counter(), _rss_bytes(), time.process_time()
    dataset = ShardDataset(shards)
    loader = recipe_loader(_config(recipe, shards), dataset)
    loader.steps.plans(loader.steps.samples(0))
    built, start_cpu = time.perf_counter(), time.process_time() - cpu
    rss = _rss_bytes()
    steps = loader.order.batches_per_epoch
    times, cpu = [], time.process_time()
    for k in np.random.default_rng(0).integers(0, steps, PLANNED_STEPS):
        begin = time.perf_counter()
        loader.steps.plans(loader.steps.samples(int(k)))
        times.append(time.perf_counter() - begin)
    plan_cpu = (time.process_time() - cpu) / PLANNED_STEPS
    return {"import_seconds": imported - start, "start_seconds": built - imported, "start_cpu_seconds": start_cpu,
            "plan_cpu_ms_mean": 1e3 * plan_cpu, "rss_bytes": rss,
            "rss_imported_bytes": rss_imported,
            "plan_ms_mean": 1e3 * float(np.mean(times)), "plan_ms_max": 1e3 * float(np.max(times)),
            "steps_per_epoch": steps, "global_batch": loader.order.global_batch}


def measure_resume(recipe: str, shards: Path) -> dict:
    """In a fresh process: the shards opened and the loader resumed at 90% of the epoch, to its first
    step; then the check against the run from step 0."""
    from megatron_asvr.benchmark.data_scale import recipe_loader, resume_check
    from megatron_asvr.data.shards import ShardDataset

    start, cpu = time.perf_counter(), time.process_time()
    dataset = ShardDataset(shards)
    config = _config(recipe, shards)
    step = int(0.9 * (len(dataset) // config.train.global_batch))
    recipe_loader(config, dataset, consumed_samples=step * config.train.global_batch).next_step()
    first_step, first_step_cpu = time.perf_counter() - start, time.process_time() - cpu
    check = resume_check(config, dataset, step, samples=100)
    return {"resume_step": step, "resume_seconds": first_step, "resume_cpu_seconds": first_step_cpu,
            "exact": check.exact, "compared_samples": check.samples,
            "compared_micro_batches": sum(len(s) for s in check.resumed), "walk_seconds": check.walk_seconds}


def _in_fresh_process(function: str, recipe: str, shards: Path) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(REPO)!r}); from tools.bench_scale import {function}; "
            f"print(json.dumps({function}({recipe!r}, __import__('pathlib').Path({str(shards)!r}))))")
    cpu = _cpu_seconds()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        raise SystemExit(f"{function}({recipe}) failed:\n{done.stderr[-3000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "cpu_seconds": _cpu_seconds() - cpu}


def _table(results: list) -> str:
    rows = ["| records | preprocess s (CPU s) | records/s | shard bytes (B/sample) | loader start s | RSS MiB | "
            "plan ms/step mean (max) | resume at 90% s | resume exact |", "|" + "---|" * 9]
    for r in results:
        shard_bytes = sum(r["shard_bytes"].values())
        for recipe in RECIPES:
            loader, resume = r[recipe]["loader"], r[recipe]["resume"]
            rows.append(
                f"| {r['records']:,} {recipe} | {r['preprocess_seconds']:.0f} ({r['preprocess_cpu_seconds']:.0f}) | "
                f"{r['records'] / r['preprocess_seconds']:.0f} | {shard_bytes:,} ({shard_bytes / r['written']:.0f}) | "
                f"{loader['start_seconds']:.2f} | {loader['rss_bytes'] / 2**20:.0f} | {loader['plan_ms_mean']:.2f} "
                f"({loader['plan_ms_max']:.2f}) | {resume['resume_seconds']:.2f} | {resume['exact']} "
                f"({resume['compared_samples']} samples, {resume['compared_micro_batches']} micro-batches) |")
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, nargs="+", default=[100_000, 500_000, 2_000_000])
    parser.add_argument("--work", type=Path, default=Path("/tmp/scale"))
    parser.add_argument("--tokenizer", type=Path, required=True, help="the Llama-2 SentencePiece model")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument("--keep", action="store_true", help="keep the shards")
    parser.add_argument("--replicate", type=Path, help="a finished shard directory: measure the loader over copies")
    parser.add_argument("--times", type=int, default=20, help="copies of --replicate")
    args = parser.parse_args(argv)
    if args.replicate:
        out = args.work / f"replicated_{args.times}x"
        records = replicate(args.replicate, args.times, out)
        result = {"records": records, "replicated_from": str(args.replicate), **measure_recipes(out),
                  "load_after": _load()}
        print(json.dumps(result), flush=True)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1) + "\n")
        shutil.rmtree(out)
        return
    results = []
    for records in args.records:
        result = make_shards(records, args.work, args.tokenizer, args.workers)
        shards = args.work / f"shards_{records}"
        result.update(measure_recipes(shards), load_after=_load())
        results.append(result)
        print(json.dumps(result), flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1) + "\n")
        if not args.keep:
            shutil.rmtree(shards)
    pool = results[-1]["pool_images"]
    print(_table(results))
    print(f"visual targets of the image pool: {pool} images x {TARGET_CODES_BYTES} B = {pool * TARGET_CODES_BYTES:,} B "
          f"(semantic codes, 729 x 8 uint16 per image), whatever the record count")


if __name__ == "__main__":
    main()
