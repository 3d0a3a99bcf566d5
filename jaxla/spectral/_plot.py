"""Optional matplotlib plots: singular value spectra, 2-D PCA scatter, sharpness and losses over training.

matplotlib is imported only when a plot is requested (install the ``jaxla[plot]`` extra). Figures
are built with the object-oriented API (no pyplot global state) and, when ``path`` is given, written
as PNG atomically: rendered to a temporary file in the same directory, then renamed over ``path``.

Dimension legend used in the docstrings:
  K  number of singular values, N number of points, C number of PCA components (>= 2),
  M  number of recorded training steps, G number of grid points of a density
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxla import _files

__all__ = [
    "plot_hessian_density",
    "plot_pca_scatter",
    "plot_sharpness",
    "plot_singular_values",
    "plot_training_curves",
]


def _figure(figsize):
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            "jaxla.spectral plots need matplotlib; install it with `pip install 'jaxla[plot]'` "
            "(or `pip install matplotlib`)"
        ) from e
    return Figure(figsize=figsize, layout="constrained")


def _save(fig, path: str | os.PathLike | None, dpi: int) -> None:
    if path is None:
        return
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    _files.write_atomic(path, buf.getvalue())


def _as_1d(values: Any, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {arr.shape}")
    return arr


def plot_singular_values(
    spectra: Any,
    *,
    path: str | os.PathLike | None = None,
    log: bool = True,
    normalize: bool = False,
    title: str = "Singular value spectrum",
    dpi: int = 120,
):
    """Plots one or several singular value spectra against their index.

    Args:
      spectra: ``(K,)`` singular values, or a mapping ``name -> (K_i,)`` for several curves
        (e.g. ``{name: s}`` built from :func:`jaxla.spectral.singular_values`).
      path: if given, the PNG is written there atomically.
      log: logarithmic y axis (zeros are dropped from a log plot).
      normalize: divide each spectrum by its largest value.
      title: axes title.
      dpi: resolution of the saved PNG.

    Returns:
      The ``matplotlib.figure.Figure``.
    """
    items = spectra.items() if isinstance(spectra, Mapping) else [("σ", spectra)]
    curves = [(str(k), _as_1d(v, f"spectra[{k!r}]")) for k, v in items]
    fig = _figure((6, 4))
    ax = fig.add_subplot()
    for name, s in curves:
        if normalize and s[0] > 0:
            s = s / s[0]
        idx = np.arange(1, s.size + 1)
        keep = s > 0 if log else np.ones_like(s, dtype=bool)
        ax.plot(idx[keep], s[keep], marker=".", label=name)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("index i")
    ax.set_ylabel("σ_i / σ_1" if normalize else "σ_i")
    ax.set_title(title)
    if len(curves) > 1:
        ax.legend()
    _save(fig, path, dpi)
    return fig


def plot_pca_scatter(
    z: Any,
    labels: Sequence[Any] | None = None,
    *,
    path: str | os.PathLike | None = None,
    explained_variance_ratio: Any = None,
    annotate: bool = False,
    title: str = "PCA of embeddings",
    dpi: int = 120,
):
    """Scatter of the first two PCA scores, coloured by label.

    Args:
      z: ``(N, C)`` scores from :func:`jaxla.spectral.pca_transform`, ``C >= 2``.
      labels: optional ``N`` labels; categorical labels get one colour each and a legend (up to 20),
        and with ``annotate`` every point is written next to its marker.
      path: if given, the PNG is written there atomically.
      explained_variance_ratio: optional ``(C,)`` ratios shown in the axis labels.
      annotate: write each label next to its point (for a few dozen tokens).
      title: axes title.
      dpi: resolution of the saved PNG.

    Returns:
      The ``matplotlib.figure.Figure``.
    """
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] < 2:
        raise ValueError(f"z must be (N, C) PCA scores with C >= 2, got shape {z.shape}")
    if labels is not None and len(labels) != z.shape[0]:
        raise ValueError(f"labels has {len(labels)} entries but z has {z.shape[0]} points")
    fig = _figure((6, 5))
    ax = fig.add_subplot()
    if labels is None:
        ax.scatter(z[:, 0], z[:, 1], s=12)
    else:
        names = [str(x) for x in labels]
        uniq = sorted(set(names))
        if len(uniq) <= 20 and not annotate:
            for u in uniq:
                sel = np.array([n == u for n in names])
                ax.scatter(z[sel, 0], z[sel, 1], s=12, label=u)
            ax.legend(fontsize="small")
        else:
            ax.scatter(z[:, 0], z[:, 1], s=12)
        if annotate:
            for (px, py), n in zip(z[:, :2], names, strict=True):
                ax.annotate(n, (px, py), fontsize="x-small", xytext=(2, 2),
                            textcoords="offset points")
    ratio = None if explained_variance_ratio is None else np.asarray(explained_variance_ratio)
    for i, setter in enumerate((ax.set_xlabel, ax.set_ylabel)):
        extra = f" ({ratio[i]:.1%} of variance)" if ratio is not None and ratio.size > i else ""
        setter(f"PC{i + 1}{extra}")
    ax.set_title(title)
    _save(fig, path, dpi)
    return fig


def plot_sharpness(
    steps: Any,
    sharpness: Any,
    *,
    learning_rate: float | None = None,
    path: str | os.PathLike | None = None,
    title: str = "Top Hessian eigenvalue during training",
    dpi: int = 120,
):
    """Plots λ_max(H) over training steps, with the edge of stability 2/η when η is given.

    Args:
      steps: ``(M,)`` training steps.
      sharpness: ``(M,)`` top Hessian eigenvalues (e.g. from
        :func:`jaxla.spectral.sharpness_callback`).
      learning_rate: step size η; draws the horizontal line 2/η.
      path: if given, the PNG is written there atomically.
      title: axes title.
      dpi: resolution of the saved PNG.

    Returns:
      The ``matplotlib.figure.Figure``.
    """
    steps = _as_1d(steps, "steps")
    values = _as_1d(sharpness, "sharpness")
    if steps.shape != values.shape:
        raise ValueError(f"steps {steps.shape} and sharpness {values.shape} must have equal length")
    fig = _figure((6, 4))
    ax = fig.add_subplot()
    ax.plot(steps, values, marker=".", label="λ_max(H)")
    if learning_rate is not None:
        if not learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
        ax.axhline(2.0 / learning_rate, color="red", linestyle="--", label="2/η")
    ax.set_xlabel("step")
    ax.set_ylabel("sharpness")
    ax.set_title(title)
    ax.legend()
    _save(fig, path, dpi)
    return fig


def plot_training_curves(
    curves: Mapping[str, tuple[Any, Any]],
    *,
    path: str | os.PathLike | None = None,
    log: bool = True,
    ylabel: str = "loss",
    title: str = "Training loss",
    dpi: int = 120,
):
    """Plots one curve per name, e.g. the loss of each training phase against its steps.

    Args:
      curves: mapping ``name -> (steps (M,), values (M,))``; at least one curve.
      path: if given, the PNG is written there atomically.
      log: logarithmic y axis (non-positive values are dropped from a log plot).
      ylabel: y axis label.
      title: axes title.
      dpi: resolution of the saved PNG.

    Returns:
      The ``matplotlib.figure.Figure``.
    """
    if not isinstance(curves, Mapping) or not curves:
        raise ValueError(f"curves must be a non-empty mapping name -> (steps, values), got {curves!r}")
    checked = []
    for name, pair in curves.items():
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise ValueError(f"curves[{name!r}] must be a pair (steps, values), got {pair!r}")
        steps = _as_1d(pair[0], f"curves[{name!r}] steps")
        values = _as_1d(pair[1], f"curves[{name!r}] values")
        if steps.shape != values.shape:
            raise ValueError(
                f"curves[{name!r}]: steps {steps.shape} and values {values.shape} must have equal "
                "length"
            )
        checked.append((str(name), steps, values))
    fig = _figure((6, 3.5))
    ax = fig.add_subplot()
    for name, steps, values in checked:
        keep = values > 0 if log else np.ones_like(values, dtype=bool)
        ax.plot(steps[keep], values[keep], label=name)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    _save(fig, path, dpi)
    return fig


def plot_hessian_density(
    density: Any,
    *,
    path: str | os.PathLike | None = None,
    log: bool = True,
    title: str = "Hessian eigenvalue density (SLQ)",
    dpi: int = 120,
):
    """Plots an eigenvalue density against the eigenvalue, as PyHessian's density plots do.

    Args:
      density: a :class:`jaxla.spectral.HessianDensity` (from
        :func:`jaxla.spectral.hessian_density`) or a pair ``(grid (G,), density (G,))``.
      path: if given, the PNG is written there atomically.
      log: logarithmic y axis (values below 1e-12 of the peak are clipped there, so the thin tails
        and outliers stay visible).
      title: axes title.
      dpi: resolution of the saved PNG.

    Returns:
      The ``matplotlib.figure.Figure``.
    """
    if hasattr(density, "grid") and hasattr(density, "density"):
        grid, values = density.grid, density.density
    elif isinstance(density, tuple | list) and len(density) == 2:
        grid, values = density
    else:
        raise ValueError(f"density must be a HessianDensity or a pair (grid, density), got "
                         f"{type(density).__name__}")
    grid = _as_1d(grid, "grid")
    values = _as_1d(values, "density")
    if grid.shape != values.shape:
        raise ValueError(f"grid {grid.shape} and density {values.shape} must have equal length")
    if not (np.all(np.isfinite(grid)) and np.all(np.isfinite(values))):
        raise ValueError("grid and density must be finite (a NaN loss or Hessian gives a NaN "
                         "density; nothing meaningful to plot)")
    fig = _figure((6, 4))
    ax = fig.add_subplot()
    if log:
        floor = max(float(values.max()), 1e-300) * 1e-12
        ax.semilogy(grid, np.maximum(values, floor))
    else:
        ax.plot(grid, values)
    ax.set_xlabel("eigenvalue λ")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    _save(fig, path, dpi)
    return fig
