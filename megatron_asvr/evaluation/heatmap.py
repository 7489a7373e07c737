"""An attention grid drawn over the image it came from (matplotlib): the image, the heat
overlaid with a colormap and constant alpha, a colour bar in attention units, and the question
and answer as the title.

The grid covers the model's square 384-pixel view (its first grid x patch pixels:
a partial last patch is dropped); the view is mapped back onto the original
image: stretched for ``resize``, the padding cropped off for ``pad`` (and the
base view of ``anyres``, which is a plain resize).
"""

import textwrap
from typing import List

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure
from PIL import Image

from megatron_asvr.data.images import TILE_SIZE
from megatron_asvr.evaluation.attention_map import AttentionMap
from megatron_asvr.evaluation.plot import new_figure

FIGURE_INCHES = (6.4, 7.2)  # the PNG is this x plot.DPI pixels
COLORMAP = "inferno"
ALPHA = 0.55  # the heat layer's opacity over the image
CAPTION_CHARS = 70  # title lines wrap at this many characters


def heat_on_image(grid: np.ndarray, width: int, height: int, image_mode: str, patch_size: int) -> np.ndarray:
    """grid [g, g] -> the attention per patch at each pixel of the original image [height, width]
    (bilinear between patches; pixels beyond the last whole patch get the grid's minimum)."""
    covered = grid.shape[0] * patch_size  # pixels of the 384 view the patches cover
    patch_map = Image.fromarray(grid.astype(np.float32)).resize((covered, covered), Image.Resampling.BILINEAR)
    view = Image.new("F", (TILE_SIZE, TILE_SIZE), float(grid.min()))
    view.paste(patch_map, (0, 0))
    if image_mode == "pad":
        side = max(width, height)
        square = view.resize((side, side), Image.Resampling.BILINEAR)
        left, top = (side - width) // 2, (side - height) // 2
        view = square.crop((left, top, left + width, top + height))
    else:
        view = view.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(view, dtype=np.float64)


def _wrapped(text: str) -> List[str]:
    """``text``'s lines (its own newlines kept), each wrapped at CAPTION_CHARS."""
    return [line for paragraph in text.split("\n") for line in textwrap.wrap(paragraph, CAPTION_CHARS) or [""]]


def _layers(layers: List[int]) -> str:
    contiguous = layers == list(range(layers[0], layers[-1] + 1))
    return f"layers {layers[0]}-{layers[-1]}" if contiguous else f"layers {layers}"


def render(image: Image.Image, result: AttentionMap, image_mode: str, patch_size: int) -> Figure:
    """The image with the attention per patch overlaid (its values on the colour bar), titled with
    the question and the answer."""
    heat = heat_on_image(result.grid, image.width, image.height, image_mode, patch_size)  # [h, w]
    figure = new_figure(FIGURE_INCHES)
    axes = figure.subplots()
    axes.imshow(np.asarray(image.convert("RGB")))
    overlay = axes.imshow(heat, cmap=COLORMAP, alpha=ALPHA, vmin=result.grid.min(), vmax=result.grid.max())
    scale = ScalarMappable(overlay.norm, overlay.cmap)  # the colour bar unblended
    figure.colorbar(scale, ax=axes, shrink=0.8, label="last-token attention per patch")
    axes.set_title("\n".join(_wrapped(f"Q: {result.question}") + _wrapped(f"A: {result.answer}")),
                   loc="left", fontsize="medium")
    axes.set_xticks([])
    axes.set_yticks([])
    axes.set_xlabel(f"mean of {_layers(result.layers)} x {len(result.heads)} heads; "
                    f"{result.image_share:.1%} of the attention on the image", fontsize="small")
    return figure
