"""PNG line charts of training curves (matplotlib, drawn off-screen: no display needed)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path


def write_line_plot(path: Path, title: str, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *,
                    xlabel: str = "step", ylabel: str = "") -> bool:
    """Write one PNG chart of each named ``(xs, ys)`` series; non-finite points are left out. Returns whether a
    chart was written (False when no series has a finite point)."""
    import matplotlib

    matplotlib.use("Agg")  # off-screen: a headless cluster node has no display
    from matplotlib import pyplot

    lines = {name: [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
             for name, (xs, ys) in series.items()}
    lines = {name: points for name, points in lines.items() if points}
    if not lines:
        return False
    figure, axes = pyplot.subplots(figsize=(6.4, 3.6), dpi=100)
    try:
        for name, points in lines.items():
            xs, ys = zip(*points)
            # A series of a few points (held-out evaluations) shows its points; a dense one is a plain line.
            axes.plot(xs, ys, label=name, marker="o" if len(points) <= 12 else None, markersize=4, linewidth=1.5)
        axes.set_title(title)
        axes.set_xlabel(xlabel)
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        figure.savefig(path, format="png")
    finally:
        pyplot.close(figure)
    return True
