"""Line plots of training curves as standalone SVG files (any browser or image viewer shows them).

SVG keeps plotting free of a graphics dependency: a curve is a polyline over scaled coordinates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from xml.sax.saxutils import escape

WIDTH, HEIGHT, MARGIN = 640, 360, 56
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")


def write_line_plot(path: Path, title: str, xs: Sequence[float], series: Mapping[str, Sequence[float]]) -> None:
    """Write one SVG chart of each named series against ``xs`` (non-finite points are left out); with several
    processes, the main one writes it."""
    from alignkit.distributed import is_main_process

    if not is_main_process():
        return
    points = {name: [(x, y) for x, y in zip(xs, ys) if math.isfinite(y)] for name, ys in series.items()}
    every_y = [y for line in points.values() for _, y in line] or [0.0]
    x_low, x_high = _span([float(x) for x in xs] or [0.0])
    y_low, y_high = _span(every_y)

    def place(x: float, y: float) -> str:
        px = MARGIN + (x - x_low) / (x_high - x_low) * (WIDTH - 2 * MARGIN)
        py = HEIGHT - MARGIN - (y - y_low) / (y_high - y_low) * (HEIGHT - 2 * MARGIN)
        return f"{px:.1f},{py:.1f}"

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" '
        f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
        f'<text x="{WIDTH / 2}" y="20" text-anchor="middle" font-size="14">{escape(title)}</text>',
        f'<polyline fill="none" stroke="black" points="{place(x_low, y_high)} {place(x_low, y_low)} '
        f'{place(x_high, y_low)}"/>',
    ]
    for fraction in (0.0, 0.5, 1.0):  # three ticks on each axis
        y = y_low + fraction * (y_high - y_low)
        x = x_low + fraction * (x_high - x_low)
        px, py = place(x_low, y).split(",")
        parts.append(f'<text x="{float(px) - 6}" y="{float(py) + 4}" text-anchor="end">{_label(y)}</text>')
        px, py = place(x, y_low).split(",")
        parts.append(f'<text x="{px}" y="{float(py) + 16}" text-anchor="middle">{_label(x)}</text>')
    for index, (name, line) in enumerate(points.items()):
        colour = COLOURS[index % len(COLOURS)]
        if line:
            coordinates = " ".join(place(x, y) for x, y in line)
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{coordinates}"/>')
        parts.append(f'<text x="{WIDTH - MARGIN}" y="{40 + 16 * index}" text-anchor="end" fill="{colour}">'
                     f'{escape(name)}</text>')
    parts.append("</svg>")
    Path(path).write_text("\n".join(parts) + "\n")


def _span(values: Sequence[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    if high - low < 1e-12:  # a flat line still needs a range to be drawn in
        return low - 1, high + 1
    return low, high


def _label(value: float) -> str:
    return f"{value:.3g}"
