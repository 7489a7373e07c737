"""An attention grid drawn over the image it came from, with the question and answer beneath (PNG).

The grid covers the model's square 384-pixel view (its first grid x patch pixels:
a partial last patch is dropped); the view is mapped back onto the original
image: stretched for ``resize``, the padding cropped off for ``pad`` (and the
base view of ``anyres``, which is a plain resize).
"""

from typing import List

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from megatron_asvr.data.images import TILE_SIZE
from megatron_asvr.evaluation.attention_map import AttentionMap

# "inferno"-like colour ramp: dark purple -> red -> orange -> pale yellow.
RAMP = np.array([(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)], dtype=np.float64)
MAX_ALPHA = 0.65  # opacity of the heat colour where the attention is largest
DISPLAY_SIDE = 512  # the image's longer side in the PNG
MARGIN = 12
FONT_SIZE = 16
COLOR_BAR_HEIGHT = 12


def colorize(heat: np.ndarray) -> np.ndarray:
    """heat [h, w] in [0, 1] -> RGB [h, w, 3] float along RAMP."""
    position = np.clip(heat, 0, 1) * (len(RAMP) - 1)
    low = np.minimum(np.floor(position).astype(int), len(RAMP) - 2)
    frac = (position - low)[..., None]
    return RAMP[low] * (1 - frac) + RAMP[low + 1] * frac


def heat_on_image(grid: np.ndarray, width: int, height: int, image_mode: str, patch_size: int) -> np.ndarray:
    """grid [g, g] -> heat [height, width] over the original image, scaled so that the grid's
    minimum is 0 and its maximum 1 (pixels beyond the last whole patch are 0)."""
    g = grid.shape[0]
    covered = g * patch_size  # pixels of the 384 view the patches cover
    spread = grid.max() - grid.min()
    scaled = ((grid - grid.min()) / spread if spread > 0 else np.zeros_like(grid)).astype(np.float32)
    patch_map = Image.fromarray(scaled, mode="F").resize((covered, covered), Image.Resampling.BILINEAR)
    view = Image.new("F", (TILE_SIZE, TILE_SIZE), 0.0)
    view.paste(patch_map, (0, 0))
    if image_mode == "pad":
        side = max(width, height)
        square = view.resize((side, side), Image.Resampling.BILINEAR)
        left, top = (side - width) // 2, (side - height) // 2
        view = square.crop((left, top, left + width, top + height))
    else:
        view = view.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(view, dtype=np.float64)


def _font(size: int):
    return ImageFont.load_default(size=size)


def _wrap(text: str, draw: ImageDraw.ImageDraw, font, width: int) -> List[str]:
    """Lines of ``text`` (its own newlines kept), words wrapped at ``width`` pixels."""
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and draw.textlength(candidate, font=font) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def render(image: Image.Image, result: AttentionMap, image_mode: str, patch_size: int) -> Image.Image:
    """The image with the attention heat blended in, a colour bar, and the caption."""
    heat = heat_on_image(result.grid, image.width, image.height, image_mode, patch_size)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    alpha = MAX_ALPHA * heat[..., None]
    blended = Image.fromarray((pixels * (1 - alpha) + colorize(heat) * alpha).round().astype(np.uint8))
    scale = DISPLAY_SIDE / max(image.size)
    shown = blended.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)

    width = max(shown.width, DISPLAY_SIDE) + 2 * MARGIN
    font = _font(FONT_SIZE)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    layers = f"layers {result.layers[0]}-{result.layers[-1]}" if result.layers == list(
        range(result.layers[0], result.layers[-1] + 1)) else f"layers {result.layers}"
    text_width = width - 2 * MARGIN
    summary = (f"last-token attention, mean of {layers} x {len(result.heads)} heads; "
               f"{result.image_share:.1%} of it on the image")
    caption = (_wrap(f"Q: {result.question}", measure, font, text_width)
               + _wrap(f"A: {result.answer}", measure, font, text_width)
               + _wrap(summary, measure, font, text_width))
    line_height = FONT_SIZE + 4
    height = MARGIN + shown.height + MARGIN + COLOR_BAR_HEIGHT + line_height + MARGIN + line_height * len(caption)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    canvas.paste(shown, (MARGIN, MARGIN))
    draw = ImageDraw.Draw(canvas)
    y = MARGIN + shown.height + MARGIN
    bar = colorize(np.linspace(0, 1, width - 2 * MARGIN))[None].repeat(COLOR_BAR_HEIGHT, 0)
    canvas.paste(Image.fromarray(bar.round().astype(np.uint8)), (MARGIN, y))
    y += COLOR_BAR_HEIGHT + 2
    small = _font(FONT_SIZE - 4)
    draw.text((MARGIN, y), f"min {result.grid.min():.4f} per patch", fill=(0, 0, 0), font=small)
    peak = f"max {result.grid.max():.4f} per patch"
    draw.text((width - MARGIN - draw.textlength(peak, font=small), y), peak, fill=(0, 0, 0), font=small)
    y += line_height + MARGIN // 2
    for line in caption:
        draw.text((MARGIN, y), line, fill=(0, 0, 0), font=font)
        y += line_height
    return canvas
