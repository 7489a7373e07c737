"""Image loading and SigLIP preprocessing: square resize, pad to square, anyres tiling.

Every mode ends in 384 x 384 tiles normalised exactly as HF's SiglipImageProcessor
does it (PIL resize, x * (1 / 255) in float64 cast to float32, then
(x - 0.5) / 0.5 in float32), so the pixels match the reference bit for bit. The
resize filter is the encoder's (``vision.resample``): bicubic for SigLIP, bilinear
for SigLIP2, whose processor differs from SigLIP's only there.

Modes (one image -> [T, 3, 384, 384]):
- ``resize`` (stage 1): resize to 384 x 384, aspect ratio not kept; T = 1.
- ``pad`` (stage 2): LLaVA's ``expand2square`` with the gray (127, 127, 127)
  background, then as ``resize``; T = 1.
- ``anyres`` (high resolution, LLaVA-NeXT): the image resized to 384 x 384 first,
  then the tiles of the best grid resolution (up to 1152 x 1152); T = 1 + tiles.

Offline passes over image files (targets, tokenizer fitting) read them with
``image_batches``: batches decoded ahead by DataLoader worker processes.
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
import math
import os
from pathlib import Path
from typing import Optional, get_args

import numpy as np
from PIL import Image
import torch

from megatron_asvr.config import ImageMode, Resample

TILE_SIZE = 384
PATCHES_PER_TILE = 729  # SigLIP-SO400M-patch14-384: (384 // 14) ** 2 = 27 * 27
IMAGE_MEAN = 0.5  # the same for all three channels
IMAGE_STD = 0.5
PAD_BACKGROUND = (int(IMAGE_MEAN * 255),) * 3  # (127, 127, 127), as LLaVA computes it from the mean
ANYRES_FILL = (0, 0, 0)  # LLaVA-NeXT pads the resized image with black before tiling
MODES = get_args(ImageMode)  # resize, pad, anyres
# (width, height) of every grid of 1..3 x 1..3 tiles, up to 1152 x 1152.
DEFAULT_GRID_PINPOINTS = tuple(
    (cols * TILE_SIZE, rows * TILE_SIZE) for cols in range(1, 4) for rows in range(1, 4)
)


FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}  # Resample -> PIL's


class ImageLoadError(ValueError):
    """An image file that is missing or cannot be decoded; the message names the file."""


def _normalisation_table() -> np.ndarray:
    """Float32 value of each uint8 level after rescale and normalise, as HF computes it."""
    rescaled = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    return (rescaled - np.float32(IMAGE_MEAN)) / np.float32(IMAGE_STD)  # [256] float32


_NORMALISED_LEVEL = _normalisation_table()


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode an image file into an RGB PIL image (alpha dropped, as LLaVA's ``convert``)."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageLoadError(f"{os.fspath(path)}: cannot load image: {err}") from err


def expand2square(image: Image.Image, background: tuple[int, int, int] = PAD_BACKGROUND) -> Image.Image:
    """LLaVA's ``expand2square``: centre the image on a square canvas of its longer side."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def to_normalised_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 [3, h, w] scaled by 1/255 and normalised with mean = std = 0.5."""
    levels = np.asarray(image).transpose(2, 0, 1)  # [3, h, w] uint8
    return torch.from_numpy(np.take(_NORMALISED_LEVEL, levels))  # [3, h, w] float32


def siglip_preprocess(image: Image.Image, resample: Resample = "bicubic") -> torch.Tensor:
    """SigLIP's processor: resize to 384 x 384, rescale, normalise -> [3, 384, 384]."""
    resized = image.resize((TILE_SIZE, TILE_SIZE), FILTERS[resample])
    return to_normalised_tensor(resized)


def select_best_resolution(
    width: int, height: int, pinpoints: Sequence[tuple[int, int]] = DEFAULT_GRID_PINPOINTS
) -> tuple[int, int]:
    """LLaVA-NeXT's rule: the (width, height) pinpoint that keeps the most original pixels,
    ties broken by the least padding, then by list order."""
    best, best_effective, best_wasted = None, 0, math.inf
    for target_width, target_height in pinpoints:
        scale = min(target_width / width, target_height / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = target_width * target_height - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (target_width, target_height), effective, wasted
    return best


def resize_and_pad(image: Image.Image, target_width: int, target_height: int,
                   resample: Resample = "bicubic") -> Image.Image:
    """Resize keeping the aspect ratio to fit the target, centred on black (LLaVA-NeXT)."""
    width, height = image.size
    scale_w, scale_h = target_width / width, target_height / height
    if scale_w < scale_h:
        new_width, new_height = target_width, min(math.ceil(height * scale_w), target_height)
    else:
        new_width, new_height = min(math.ceil(width * scale_h), target_width), target_height
    resized = image.resize((new_width, new_height), FILTERS[resample])
    canvas = Image.new("RGB", (target_width, target_height), ANYRES_FILL)
    canvas.paste(resized, ((target_width - new_width) // 2, (target_height - new_height) // 2))
    return canvas


def anyres_views(
    image: Image.Image, pinpoints: Sequence[tuple[int, int]] = DEFAULT_GRID_PINPOINTS, resample: Resample = "bicubic"
) -> list[Image.Image]:
    """The whole image resized to 384 x 384, then the grid's 384 x 384 tiles in row-major order."""
    grid_width, grid_height = select_best_resolution(*image.size, pinpoints)
    canvas = resize_and_pad(image, grid_width, grid_height, resample)
    tiles = [
        canvas.crop((left, top, left + TILE_SIZE, top + TILE_SIZE))
        for top in range(0, grid_height, TILE_SIZE)
        for left in range(0, grid_width, TILE_SIZE)
    ]
    return [image.resize((TILE_SIZE, TILE_SIZE), FILTERS[resample]), *tiles]


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"image mode {mode!r} is not one of {MODES}")


def preprocess_image(
    image: Image.Image, mode: str, pinpoints: Sequence[tuple[int, int]] = DEFAULT_GRID_PINPOINTS,
    resample: Resample = "bicubic",
) -> torch.Tensor:
    """One RGB image -> float32 [T, 3, 384, 384] for ``mode`` (see the module docstring)."""
    _check_mode(mode)
    if mode == "resize":
        return siglip_preprocess(image, resample).unsqueeze(0)
    if mode == "pad":
        return siglip_preprocess(expand2square(image), resample).unsqueeze(0)
    return torch.stack([to_normalised_tensor(view) for view in anyres_views(image, pinpoints, resample)])


def tile_count(
    width: int, height: int, mode: str, pinpoints: Sequence[tuple[int, int]] = DEFAULT_GRID_PINPOINTS
) -> int:
    """Number of 384 x 384 tiles ``preprocess_image`` gives for an image of this size."""
    _check_mode(mode)
    if mode != "anyres":
        return 1
    grid_width, grid_height = select_best_resolution(width, height, pinpoints)
    return 1 + (grid_width // TILE_SIZE) * (grid_height // TILE_SIZE)


def image_token_count(
    width: int,
    height: int,
    mode: str,
    pinpoints: Sequence[tuple[int, int]] = DEFAULT_GRID_PINPOINTS,
    patches_per_tile: int = PATCHES_PER_TILE,
) -> int:
    """Visual positions one image takes in the sequence: ``patches_per_tile`` (729 for
    SigLIP-384) per tile, the base view included.

    LLaVA-NeXT differs for ``anyres``: it removes the feature rows/columns that
    cover the black padding ("unpadding") and appends a learned ``image_newline``
    embedding after each feature row, so its count depends on the aspect ratio
    in a different way. We keep all 729 positions of every tile and add no
    newline tokens, so every position has a visual target of its own.
    """
    return patches_per_tile * tile_count(width, height, mode, pinpoints)


@dataclass(frozen=True)
class ImageBatch:
    """The tiles of several images stacked in order; image i owns ``tiles_per_image[i]`` rows."""

    pixels: torch.Tensor  # [sum(tiles_per_image), 3, 384, 384] float32
    tiles_per_image: tuple[int, ...]


def load_image_batch(
    paths: Sequence[str | os.PathLike],
    mode: str,
    pinpoints: Sequence[tuple[int, int]] = DEFAULT_GRID_PINPOINTS,
    resample: Resample = "bicubic",
) -> ImageBatch:
    """Decode and preprocess image files; a plain module-level function, so it pickles
    into loader worker processes. Raises ImageLoadError naming the first bad file."""
    _check_mode(mode)
    per_image = [preprocess_image(load_rgb(path), mode, pinpoints, resample) for path in paths]
    if not per_image:
        return ImageBatch(torch.empty(0, 3, TILE_SIZE, TILE_SIZE), ())
    return ImageBatch(torch.cat(per_image), tuple(len(tiles) for tiles in per_image))


class ImageFiles(torch.utils.data.Dataset):
    """(position, tiles [T, 3, 384, 384] or None, error or None) per image file, decoded by loader workers;
    a path of None stands for a blank tile (all zeros: mid-gray once normalised; targets' ZERO_IMAGE)."""

    def __init__(self, paths: Sequence[Optional[Path]], mode: str, resample: Resample = "bicubic"):
        self.paths, self.mode, self.resample = list(paths), mode, resample

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int):
        if self.paths[position] is None:
            return position, torch.zeros(1, 3, TILE_SIZE, TILE_SIZE), None
        try:
            tiles = preprocess_image(load_rgb(self.paths[position]), self.mode, resample=self.resample)
            return position, tiles, None
        except ImageLoadError as err:
            return position, None, str(err)


def _as_list(items: list) -> list:
    return items


def image_batches(paths: Sequence[Optional[Path]], mode: str, batch_images: int, workers: int,
                  resample: Resample = "bicubic") -> Iterator[list]:
    """Lists of ``ImageFiles`` items, in order, decoded ahead by ``workers`` processes."""
    loader = torch.utils.data.DataLoader(
        ImageFiles(paths, mode, resample), batch_size=batch_images, num_workers=workers, collate_fn=_as_list,
        prefetch_factor=2 if workers else None,
    )
    yield from loader
