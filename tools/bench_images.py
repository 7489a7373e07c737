"""Benchmark JPEG decode + preprocessing to 384 x 384 in one process on one core.

Prints images/s per source size for decode only and for decode + each mode of
megatron_asvr.data.images (goal: >= 150 images/s per core for decode + resize).
By default it times generated photo-like JPEGs; --images DIR times real files.
"""

import argparse
import os
from pathlib import Path
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
import torch  # noqa: E402

from megatron_asvr.data import images  # noqa: E402

DEFAULT_SIZES = ["500x375", "640x480", "336x448", "1024x768"]


def _photo_like_jpeg(path: Path, width: int, height: int, seed: int) -> None:
    """Gradients, blocks and mild noise: compresses like a photo, not like white noise."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.stack([xs / width * 255, ys / height * 255, (xs + ys) / (width + height) * 255], axis=-1)
    for _ in range(12):
        left, top = rng.integers(0, width), rng.integers(0, height)
        pixels[top : top + height // 4, left : left + width // 4] = rng.integers(0, 256, 3)
    pixels += rng.normal(0, 6, pixels.shape)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)


def _rate(fn, paths: list[Path], min_seconds: float) -> float:
    """Images per second of ``fn`` over ``paths``, repeated for at least ``min_seconds``."""
    fn(paths[0])  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        for path in paths:
            fn(path)
        done += len(paths)
    return done / (time.perf_counter() - start)


STAGES = {
    "decode": images.load_rgb,
    **{
        f"decode+{mode}": (lambda path, mode=mode: images.preprocess_image(images.load_rgb(path), mode))
        for mode in images.MODES
    },
}


def _bench_group(label: str, paths: list[Path], min_seconds: float) -> None:
    rates = [_rate(fn, paths, min_seconds) for fn in STAGES.values()]
    print(f"{label:>12} {len(paths):>6} " + " ".join(f"{rate:>14.1f}" for rate in rates), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, help="time these *.jpg files instead of generated ones")
    parser.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES, help="generated sizes, WIDTHxHEIGHT")
    parser.add_argument("--count", type=int, default=16, help="generated images per size")
    parser.add_argument("--seconds", type=float, default=2.0, help="minimum timing per cell")
    args = parser.parse_args()
    torch.set_num_threads(1)

    print(f"images/s, one process, torch threads = {torch.get_num_threads()}")
    print(f"{'source':>12} {'files':>6} " + " ".join(f"{stage:>14}" for stage in STAGES))
    if args.images:
        paths = sorted(args.images.rglob("*.jpg"))
        if not paths:
            parser.error(f"{args.images}: no *.jpg files found")
        _bench_group(args.images.name, paths, args.seconds)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            width, height = (int(side) for side in size.lower().split("x"))
            paths = [Path(tmp, f"{size}_{i}.jpg") for i in range(args.count)]
            for seed, path in enumerate(paths):
                _photo_like_jpeg(path, width, height, seed)
            _bench_group(size, paths, args.seconds)


if __name__ == "__main__":
    main()
