"""Writing matplotlib figures: Agg through ``matplotlib.figure.Figure`` (no pyplot global state), atomically."""

from __future__ import annotations

import os
from pathlib import Path


def new_figure(width: float, height: float):
    from matplotlib.figure import Figure  # imported late: only the plotting commands need matplotlib

    return Figure(figsize=(width, height))


def save_png(fig, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` via a temporary file in the same folder: never a half-written PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")  # not mkstemp: that would make the file 0600
    try:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def frame_count_axes(ax, counts, xlabel: str) -> None:
    """Log-log axes over frame counts, ticked at the measured counts (no log-scale minor labels)."""
    counts = sorted(set(counts))
    ax.set(xscale="log", yscale="log", xlabel=xlabel)
    ax.set_xticks(counts, [str(c) for c in counts])
    ax.minorticks_off()
    ax.grid(True, alpha=0.3)
    ax.legend()
