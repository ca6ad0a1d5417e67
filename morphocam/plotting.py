"""One matplotlib setup for every plot the project writes (training, clients, benchmarks).

Plots are written by servers, CI and headless benchmark runs: the Agg backend is selected before
pyplot is first imported, so no display is ever needed. matplotlib is imported on first use only,
so modules that can plot stay cheap to import.
"""

from __future__ import annotations

import io
from pathlib import Path

DPI = 110  # resolution of every saved figure


def pyplot():
    """``matplotlib.pyplot`` on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def subplots(*args, **kwargs):
    """``plt.subplots`` on the project's backend: returns ``(figure, axes)``."""
    return pyplot().subplots(*args, **kwargs)


def save(fig, path: Path, dpi: int = DPI) -> None:
    """Lay out, write to ``path`` (format from its suffix) and free the figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def png_bytes(fig, dpi: int | None = None) -> bytes:
    """Lay out and render to PNG in memory (for HTML reports), then free the figure."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi if dpi is not None else "figure")
    pyplot().close(fig)
    return buf.getvalue()
