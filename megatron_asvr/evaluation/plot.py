"""Line charts drawn with PIL (no plotting dependency): panels side by side, each with axes,
ticks, a legend and optional vertical markers, saved as PNG."""

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from PIL import Image, ImageDraw, ImageFont

PANEL_SIZE = (520, 370)
PLOT_BOX = (64, 36, 500, 300)  # left, top, right, bottom of the axes inside a panel
COLORS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14))
FONT_SIZE = 13
TICKS = 5


@dataclass
class Panel:
    title: str
    x_label: str
    y_label: str
    series: Dict[str, List[Tuple[float, float]]]  # label -> (x, y) points, drawn in x order
    markers: List[Tuple[float, str]] = field(default_factory=list)  # vertical lines at x, labelled


def nice_ticks(low: float, high: float, count: int = TICKS) -> List[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    if high <= low:
        high = low + 1.0
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = min((m * power for m in (1, 2, 5, 10) if m * power >= raw))
    first = math.floor(low / step) * step
    intervals = math.ceil((high - first) / step - 1e-9)  # not one more for a rounding error
    return [first + i * step for i in range(intervals + 1)]


def _label(value: float) -> str:
    return f"{value:.3g}"


def _legend(draw: ImageDraw.ImageDraw, panel: Panel, font, colors) -> None:
    """Series names with their colour, in one row below the x-axis label."""
    x, y = PLOT_BOX[0], PANEL_SIZE[1] - FONT_SIZE - 6
    for name in panel.series:
        draw.line([(x, y + FONT_SIZE / 2), (x + 20, y + FONT_SIZE / 2)], fill=colors[name], width=3)
        draw.text((x + 24, y), name, fill=(0, 0, 0), font=font)
        x += 24 + draw.textlength(name, font=font) + 18


def _vertical_text(text: str, font) -> Image.Image:
    """``text`` rotated to read bottom to top."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label = Image.new("RGB", (int(measure.textlength(text, font=font)) + 2, FONT_SIZE + 4), (255, 255, 255))
    ImageDraw.Draw(label).text((0, 0), text, fill=(0, 0, 0), font=font)
    return label.rotate(90, expand=True)


def _draw_panel(panel: Panel, font, colors: Dict[str, Tuple[int, int, int]]) -> Image.Image:
    image = Image.new("RGB", PANEL_SIZE, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    points = [p for s in panel.series.values() for p in s]
    left, top, right, bottom = PLOT_BOX
    draw.text((left, 8), panel.title, fill=(0, 0, 0), font=font)
    draw.rectangle(PLOT_BOX, outline=(0, 0, 0))
    if not points:
        draw.text((left + 10, top + 10), "no data", fill=(120, 120, 120), font=font)
        return image
    xs = nice_ticks(min(p[0] for p in points), max(p[0] for p in points))
    ys = nice_ticks(min(p[1] for p in points), max(p[1] for p in points))

    def at(x: float, y: float) -> Tuple[float, float]:
        return (left + (x - xs[0]) / (xs[-1] - xs[0]) * (right - left),
                bottom - (y - ys[0]) / (ys[-1] - ys[0]) * (bottom - top))

    for x in xs:
        px = at(x, ys[0])[0]
        draw.line([(px, top), (px, bottom)], fill=(230, 230, 230))
        draw.text((px - draw.textlength(_label(x), font=font) / 2, bottom + 4), _label(x), fill=(0, 0, 0), font=font)
    for y in ys:
        py = at(xs[0], y)[1]
        draw.line([(left, py), (right, py)], fill=(230, 230, 230))
        text_x = left - 6 - draw.textlength(_label(y), font=font)
        draw.text((text_x, py - FONT_SIZE / 2), _label(y), fill=(0, 0, 0), font=font)
    for x, text in panel.markers:
        px = at(x, ys[0])[0]
        draw.line([(px, top), (px, bottom)], fill=(120, 120, 120), width=1)
        draw.text((px + 3, top + 3), text, fill=(90, 90, 90), font=font)
    draw.rectangle(PLOT_BOX, outline=(0, 0, 0))
    for name, series in panel.series.items():
        line = [at(x, y) for x, y in sorted(series)]
        if len(line) > 1:
            draw.line(line, fill=colors[name], width=2)
        for px, py in line if len(line) <= 40 else []:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colors[name])
    _legend(draw, panel, font, colors)
    draw.text(((left + right - draw.textlength(panel.x_label, font=font)) / 2, bottom + 22), panel.x_label,
              fill=(0, 0, 0), font=font)
    label = _vertical_text(panel.y_label, font)
    image.paste(label, (6, int((top + bottom - label.height) / 2)))
    return image


def save_chart(panels: Sequence[Panel], path: Path) -> Path:
    """Draw ``panels`` left to right into one PNG at ``path``; a label has one colour in all panels."""
    font = ImageFont.load_default(size=FONT_SIZE)
    labels = list(dict.fromkeys(name for panel in panels for name in panel.series))
    colors = {name: COLORS[i % len(COLORS)] for i, name in enumerate(labels)}
    width, height = PANEL_SIZE
    canvas = Image.new("RGB", (width * len(panels), height), (255, 255, 255))
    for i, panel in enumerate(panels):
        canvas.paste(_draw_panel(panel, font, colors), (i * width, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
