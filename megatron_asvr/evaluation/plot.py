"""Figures over seeds, drawn with matplotlib on an Agg canvas (no pyplot state): curves as the
seeds' mean with a shaded mean ± std band, and grouped bars with std error bars and each
group's chance and majority levels. Builders return the Figure; ``save_figure`` writes a PNG."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 100
PANEL_INCHES = (5.0, 3.8)  # one curve panel; a PNG is panels x this x DPI pixels
BAR_INCHES = (8.0, 4.2)
BAND_ALPHA = 0.25
DDOF = 1  # standard deviations over seeds are sample std (divisor n - 1)


def std(values: np.ndarray) -> np.ndarray:
    """Standard deviation over seeds (axis 0, ddof=DDOF): values [seeds, ...] -> [...]; NaN for one seed."""
    if len(values) <= DDOF:
        return np.full(np.shape(values)[1:], np.nan)
    return np.std(values, axis=0, ddof=DDOF)


@dataclass
class Band:
    """One arm's curve over seeds at x [n]: mean [n] and std [n] of the seeds' values."""

    label: str
    x: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    seeds: int


def seed_band(label: str, runs: Sequence[Sequence[Tuple[float, float]]]) -> Band:
    """Mean and std over the runs that logged anything (one list of (x, y) per seed; at least one),
    at the x that all of them logged."""
    points = [dict(run) for run in runs if run]
    x = sorted(set.intersection(*map(set, points)))
    values = np.array([[p[v] for v in x] for p in points])  # [seeds, n]
    return Band(label, np.array(x), values.mean(0), std(values), len(points))


@dataclass
class Panel:
    title: str
    x_label: str
    y_label: str
    bands: List[Band]
    markers: List[Tuple[float, str]] = field(default_factory=list)  # vertical dotted lines: x, label
    levels: List[Tuple[float, str, str]] = field(default_factory=list)  # horizontal lines: y, label, line style


def new_figure(inches: Tuple[float, float]) -> Figure:
    """An empty figure of ``inches`` on its own Agg canvas, laid out to fit its labels."""
    figure = Figure(figsize=inches, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _colors(labels: Sequence[str]) -> Dict[str, str]:
    """One colour of matplotlib's default cycle per label, the same in every panel."""
    return {label: f"C{i}" for i, label in enumerate(dict.fromkeys(labels))}


def curves_figure(panels: Sequence[Panel], title: str) -> Figure:
    """``panels`` side by side; each band a mean line and a shaded mean ± std region."""
    figure = new_figure((PANEL_INCHES[0] * len(panels), PANEL_INCHES[1]))
    colors = _colors([band.label for panel in panels for band in panel.bands])
    for axes, panel in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        for band in panel.bands:
            color = colors[band.label]
            axes.plot(band.x, band.mean, color=color, label=f"{band.label} ({band.seeds} seeds)")
            axes.fill_between(band.x, band.mean - band.std, band.mean + band.std, color=color, alpha=BAND_ALPHA,
                              linewidth=0)
        for x, text in panel.markers:
            axes.axvline(x, color="0.4", linestyle=":", linewidth=1, label=text)
        for y, text, style in panel.levels:
            axes.axhline(y, color="k", linestyle=style, linewidth=1, label=text)
        axes.set(title=panel.title, xlabel=panel.x_label, ylabel=panel.y_label)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps
        axes.grid(alpha=0.3)
        if panel.bands:
            axes.legend(fontsize="small")
        else:
            axes.text(0.5, 0.5, "no data", transform=axes.transAxes, ha="center", color="0.5")
    figure.suptitle(title)
    return figure


def bars_figure(groups: Sequence[str], bars: Dict[str, Tuple[Sequence[float], Sequence[float]]],
                chance: Sequence[float], majority: Sequence[float], title: str, y_label: str) -> Figure:
    """Grouped bars: per group one bar a label (bars: label -> (heights [g], errors [g])) with
    error bars, and short dashed (chance) and dotted (majority) lines across each group."""
    figure = new_figure(BAR_INCHES)
    axes = figure.subplots()
    width = 0.8 / max(len(bars), 1)
    centers = np.arange(len(groups))  # [g]
    for i, (label, (heights, errors)) in enumerate(bars.items()):
        axes.bar(centers + (i - (len(bars) - 1) / 2) * width, heights, width, yerr=errors, capsize=3, label=label,
                 color=f"C{i}")
    left, right = centers - 0.45, centers + 0.45
    axes.hlines(chance, left, right, colors="k", linestyles="--", linewidth=1.2, label="chance")
    axes.hlines(majority, left, right, colors="0.35", linestyles=":", linewidth=1.5, label="majority answer")
    axes.set_xticks(centers, groups)
    axes.set(title=title, ylabel=y_label, ylim=(0, 1.05))
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize="small", ncols=2)
    return figure


def save_figure(figure: Figure, path: Path) -> Path:
    """Write ``figure`` as a PNG at its own size (inches x DPI)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    return path
