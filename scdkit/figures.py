"""Writing matplotlib figures: Agg through ``matplotlib.figure.Figure`` (no pyplot global state), atomically."""

from __future__ import annotations

from pathlib import Path

from scdkit.files import atomic_path


def new_figure(width: float, height: float):
    from matplotlib.figure import Figure  # imported late: only the plotting commands need matplotlib

    return Figure(figsize=(width, height))


def save_png(fig, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` via a temporary file in the same folder: never a half-written PNG."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return Path(path)


def frame_count_axes(ax, counts, xlabel: str) -> None:
    """Log-log axes over frame counts, ticked at the measured counts (no log-scale minor labels)."""
    counts = sorted(set(counts))
    ax.set(xscale="log", yscale="log", xlabel=xlabel)
    ax.set_xticks(counts, [str(c) for c in counts])
    ax.minorticks_off()
    ax.grid(True, alpha=0.3)
    ax.legend()
