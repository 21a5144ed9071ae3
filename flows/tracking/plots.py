"""The night's plots, drawn without pyplot (no global backend switch, no figure left open)."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path


def norm_plot(history: Mapping[str, Sequence[tuple[int, float]]], out_png: Path, title: str, ylabel: str) -> Path:
    """Plot one line per key (e.g. "layer 3") against edits so far and write ``out_png`` atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_png = Path(out_png)
    # A bare Figure on an Agg canvas: no pyplot, so no global backend switch and no figure leaks.
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    plotted = 0
    for key, points in history.items():
        if not points:
            continue
        steps, values = zip(*sorted(points, key=lambda p: p[0]), strict=True)
        # NaN/inf (a collapsed edit) would wreck autoscaling; they show up as gaps instead.
        ys = [v if math.isfinite(v) else math.nan for v in map(float, values)]
        hidden = sum(1 for v in ys if math.isnan(v))
        label = f"{key} ({hidden} non-finite hidden)" if hidden else str(key)
        ax.plot(steps, ys, marker="o" if len(steps) <= 40 else None, markersize=3, label=label)
        plotted += 1
    if plotted:
        ax.legend(fontsize="small", loc="best")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title)
    ax.set_xlabel("edits so far")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()

    out_png.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_png.parent, prefix=f".{out_png.name}.", suffix=".png")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png")
        os.replace(tmp, out_png)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_png
