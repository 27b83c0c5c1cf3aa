"""Matplotlib without a display, and one way to write a figure (atomically, as PNG)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from fedhubert.atomic import atomic_path  # noqa: E402

__all__ = ["plt", "save_figure"]


def save_figure(fig, path: Path, dpi: int = 90) -> None:
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
