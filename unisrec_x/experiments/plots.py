"""The one way result plots are drawn and saved (headless, same axes size, grid, legend beside the axes)."""

from __future__ import annotations

from pathlib import Path


def palette() -> list:
    """20 distinct colours, tab20's dark shades first and then its light ones: the transfer plot has
    11 arms, more than matplotlib's default 10-colour cycle, which would repeat the first colour."""
    import matplotlib

    tab20 = matplotlib.colormaps["tab20"].colors
    return list(tab20[0::2]) + list(tab20[1::2])


def new_axes():
    """A figure and axes on the Agg backend (no display needed), cycling through ``palette()``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.set_prop_cycle(color=palette())
    return fig, ax


def save(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> None:
    """Label, lay out and write the figure to ``path`` (parents created), then free it."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    # beside the axes, not on them: with a dozen arms an inside legend hides the lines it names
    # and the saved image grows to hold it (bbox_inches), so the axes keep their size
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
