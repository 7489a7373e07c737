"""Loader throughput without image decoding: samples/s per core for the middle and last stages.

    python tools/bench_loader.py --samples 4000 --seq-length 2048

Writes synthetic shards (one 729-position image per sample, LLaVA-665K-like text
lengths) and a uint16 code array, then times ``SampleBuilder`` + collation in one
process (one core): the middle stage (tokens, masks, image positions) and the
last stage (plus visual targets read from a memory-mapped uint16 array, as
``VisualTargets`` does). Pixels are the first stage's and are benchmarked by
tools/bench_images.py.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from megatron_asvr.config import ASVRConfig
from megatron_asvr.data.llava import TokenizedSample
from megatron_asvr.data.loader import SampleBuilder, StageNeeds, collate_micro_batch
from megatron_asvr.data.shards import ShardDataset, ShardWriter
from megatron_asvr.tokenizers.templates import IMAGE_PLACEHOLDER


class MemmapTargets:
    """Codes [images, 729, 8] in a uint16 memmap, looked up by image key like VisualTargets."""

    def __init__(self, path: Path, keys):
        self.rows = {key: i for i, key in enumerate(keys)}
        codes = np.memmap(path, np.uint16, "w+", shape=(len(keys), 729, 8))
        codes[:] = np.random.default_rng(0).integers(0, 16384, codes.shape, dtype=np.uint16)
        codes.flush()
        self.codes_array = np.memmap(path, np.uint16, "r", shape=(len(keys), 729, 8))

    def __contains__(self, key):
        return key in self.rows

    def codes(self, key, branch="semantic"):
        return self.codes_array[self.rows[key]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        writer = ShardWriter(tmp / "shards")
        keys = [f"coco/{i:06d}.jpg" for i in range(args.samples)]
        for i, key in enumerate(keys):
            text = rng.integers(3, 32000, int(rng.integers(60, 600))).astype(np.int32)
            ids = np.concatenate([[1, IMAGE_PLACEHOLDER], text]).astype(np.int32)
            mask = (rng.random(len(ids)) > 0.5).astype(np.uint8)
            writer.add(TokenizedSample(f"s{i}", "coco", ids, mask, (key,), ((640, 480),), len(ids) + 728))
        writer.finalize({})
        shards = ShardDataset(tmp / "shards")
        targets = MemmapTargets(tmp / "codes.u16", keys)
        asvr = ASVRConfig()
        print(f"{'stage':<8} {'samples/s (1 core)':>20}")
        stages = (("middle", StageNeeds(pixels=False, targets=False)), ("last", StageNeeds(pixels=False, targets=True)))
        for name, needs in stages:
            builder = SampleBuilder(shards, tmp, targets, asvr, args.seq_length, "pad", needs, patches_per_tile=729)
            start = time.perf_counter()
            for first in range(0, args.samples, args.micro_batch):
                items = [builder(i) for i in range(first, min(first + args.micro_batch, args.samples))]
                collate_micro_batch(items, asvr, needs)
            print(f"{name:<8} {args.samples / (time.perf_counter() - start):>20.0f}")


if __name__ == "__main__":
    main()
