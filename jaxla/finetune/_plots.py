"""Optional PNG plots of a run (loss curves, singular values), written only when matplotlib exists.

matplotlib is imported lazily with the non-interactive Agg backend, so plotting never opens a window
or needs a display; every PNG is rendered to a temporary file in the run directory and renamed.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxla import _files

__all__ = ["write_plots"]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    _files.write_atomic(path, buf.getvalue())


def write_plots(
    out: Path,
    records: Sequence[Mapping[str, Any]],
    spectra: Mapping[str, np.ndarray] | None = None,
) -> list[str]:
    """Writes ``loss.png`` (loss per step, one curve per phase) and ``singular_values.png``.

    Args:
      out: the run directory.
      records: metrics records (``phase``, ``step``, ``loss``).
      spectra: ``{label: singular values}`` to draw on one log-scale plot; skipped when None.

    Returns:
      The file names written (empty without matplotlib).
    """
    plt = _pyplot()
    if plt is None:
        return []
    written = []
    phases: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        phases.setdefault(r["phase"], []).append((r["step"], r["loss"]))
    if phases:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for phase, pts in phases.items():
            steps, losses = zip(*sorted(pts), strict=True)
            ax.semilogy(steps, losses, label=phase)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        _save(plt, fig, out / "loss.png")
        written.append("loss.png")
    if spectra:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for i, (label, values) in enumerate(spectra.items()):
            values = np.asarray(values)
            ax.semilogy(np.arange(1, values.size + 1), values, "o-" if i == 0 else "x--", label=label)
        ax.set_xlabel("index")
        ax.set_ylabel("singular value")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        _save(plt, fig, out / "singular_values.png")
        written.append("singular_values.png")
    return written
