"""Matplotlib without a display, one way to write a figure (atomically, as PNG), integer ticks for axes that
count rounds, and the client count above which figures draw distributions instead of one mark per client."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedhubert.atomic import atomic_path  # noqa: E402
from fedhubert.display import MANY_CLIENTS  # noqa: E402

__all__ = ["MANY_CLIENTS", "integer_ticks", "plt", "save_figure"]


def integer_ticks(ax: Axes) -> None:
    """Ticks only at whole numbers on the x axis of `ax` (rounds, Lloyd rounds), even when it shows one point."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def save_figure(fig, path: Path, dpi: int = 90) -> None:
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
