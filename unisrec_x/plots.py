"""The one way result plots are drawn and saved (headless, same size, grid and legend everywhere)."""

from __future__ import annotations

from pathlib import Path


def new_axes():
    """A figure and axes on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4.5))


def save(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> None:
    """Label, lay out and write the figure to ``path`` (parents created), then free it."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
