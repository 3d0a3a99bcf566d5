"""Spectral matrix metrics with exact definitions, and a per-matrix report over a parameter pytree.

Dimension legend used in the docstrings:
  ...  optional leading dimensions (stacked layers); every metric is computed per matrix
  m, n the matrix dimensions; σ_1 >= ... >= σ_{min(m,n)} >= 0 its singular values

Definitions:
  spectral_norm     σ_1
  stable_rank       ‖W‖_F² / ‖W‖₂² = Σσ_i² / σ_1²  (0 for the zero matrix)
  effective_rank    exp(−Σ p_i log p_i), p_i = σ_i / Σ_j σ_j (Roy & Vetterli 2007; 0 for W = 0)
  condition_number  σ_1 / σ_min(m,n)  (inf when σ_min = 0, nan for W = 0)
  numerical_rank    #{i : σ_i > rtol · σ_1}, default rtol = max(m, n) · eps (NumPy's matrix_rank)

Singular values come from ``jnp.linalg.svd`` in f32 (f64 for f64 input). The differentiable metrics
only differentiate singular values (never singular vectors), so their gradients stay finite when
singular values repeat; effective_rank treats 0·log 0 as 0 with a zero gradient there.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxla import _checks
from jaxla.spectral import _operator

__all__ = [
    "WeightReport",
    "condition_number",
    "effective_rank",
    "numerical_rank",
    "singular_values",
    "spectral_norm",
    "stable_rank",
    "weight_report",
]


def singular_values(w: Any) -> jax.Array:
    """Singular values ``(..., min(m, n))`` of ``w`` ``(..., m, n)``, descending, in f32 or f64."""
    w = _operator.check_matrix(w, "w", batched=True)
    return _svdvals(w)


def _svdvals(w: jax.Array) -> jax.Array:
    return jnp.linalg.svd(w.astype(_checks.accum_dtype(w.dtype)), compute_uv=False)


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def _spectral_norm(s):
    return s[..., 0]


def _stable_rank(s):
    return _safe_div(jnp.sum(s * s, axis=-1), s[..., 0] ** 2)


def _effective_rank(s):
    p = _safe_div(s, jnp.sum(s, axis=-1, keepdims=True))
    safe = jnp.where(p > 0, p, 1.0)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(safe), 0.0), axis=-1)
    return jnp.where(s[..., 0] > 0, jnp.exp(entropy), 0.0)


def _condition_number(s):
    return s[..., 0] / s[..., -1]


def _default_rtol(shape, dtype) -> float:
    return max(shape[-2:]) * float(jnp.finfo(_checks.accum_dtype(dtype)).eps)


def _numerical_rank(s, rtol):
    return jnp.sum(s > rtol * s[..., :1], axis=-1).astype(jnp.int32)


def spectral_norm(w: Any) -> jax.Array:
    """Largest singular value ``‖W‖₂ = σ_1`` of ``w`` ``(..., m, n)``; returns ``(...)``."""
    return _spectral_norm(singular_values(w))


def stable_rank(w: Any) -> jax.Array:
    """Stable rank ``‖W‖_F² / ‖W‖₂²`` of ``w`` ``(..., m, n)`` (0 for W = 0); returns ``(...)``."""
    return _stable_rank(singular_values(w))


def effective_rank(w: Any) -> jax.Array:
    """Effective rank (Roy & Vetterli 2007) of ``w`` ``(..., m, n)``; returns ``(...)``.

    ``exp(H(p))`` with ``p_i = σ_i / Σ_j σ_j`` and Shannon entropy ``H`` in nats; it lies in
    ``[1, min(m, n)]`` for ``W ≠ 0`` and is 0 for ``W = 0``.
    """
    return _effective_rank(singular_values(w))


def condition_number(w: Any) -> jax.Array:
    """2-norm condition number ``σ_1 / σ_min(m,n)`` of ``w`` ``(..., m, n)``; returns ``(...)``.

    ``inf`` for rank-deficient matrices, ``nan`` for the zero matrix.
    """
    return _condition_number(singular_values(w))


def numerical_rank(w: Any, *, rtol: float | None = None) -> jax.Array:
    """Number of singular values above ``rtol · σ_1`` for ``w`` ``(..., m, n)``; int32 ``(...)``.

    Args:
      w: ``(..., m, n)`` floating matrix.
      rtol: relative threshold; default ``max(m, n) · eps`` of the computation dtype.

    Returns:
      int32 array of shape ``(...)``; 0 for the zero matrix.
    """
    w = _operator.check_matrix(w, "w", batched=True)
    rtol = _default_rtol(w.shape, w.dtype) if rtol is None else float(rtol)
    if not rtol >= 0:
        raise ValueError(f"rtol must be >= 0, got {rtol}")
    return _numerical_rank(_svdvals(w), rtol)


_COLUMNS = (
    "spectral_norm",
    "frobenius_norm",
    "stable_rank",
    "effective_rank",
    "condition_number",
    "numerical_rank",
)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class WeightReport:
    """Metrics of every matrix in a parameter pytree, one row per matrix (per layer when stacked).

    Array fields have shape ``(R,)`` for ``R`` rows; ``names`` and ``shapes`` are static metadata,
    so the report passes through ``jit``. ``str(report)`` (or :meth:`table`) gives a printable
    table.
    """

    spectral_norm: jax.Array
    frobenius_norm: jax.Array
    stable_rank: jax.Array
    effective_rank: jax.Array
    condition_number: jax.Array
    numerical_rank: jax.Array
    names: tuple[str, ...] = dataclasses.field(metadata=dict(static=True))
    shapes: tuple[tuple[int, int], ...] = dataclasses.field(metadata=dict(static=True))

    def rows(self) -> list[dict[str, Any]]:
        """Host-side rows: ``{"name", "shape", <metric>: float | int}``."""
        cols = {c: np.asarray(getattr(self, c)) for c in _COLUMNS}
        out = []
        for i, (name, shape) in enumerate(zip(self.names, self.shapes, strict=True)):
            row: dict[str, Any] = {"name": name, "shape": shape}
            for c in _COLUMNS:
                value = cols[c][i]
                row[c] = int(value) if c == "numerical_rank" else float(value)
            out.append(row)
        return out

    def table(self) -> str:
        """A fixed-width text table of :meth:`rows`."""
        header = ["name", "shape", "σ_max", "‖W‖_F", "stable_rank", "eff_rank", "cond", "rank"]
        lines = []
        for r in self.rows():
            shape = "×".join(str(d) for d in r["shape"])
            metrics = [f"{r[c]:.4g}" for c in _COLUMNS[:-1]] + [str(r["numerical_rank"])]
            lines.append([r["name"], shape, *metrics])
        widths = [max(len(x) for x in col) for col in zip(header, *lines, strict=True)]
        fmt = [f"{h:<{w}}" for h, w in zip(header, widths, strict=True)]
        out = ["  ".join(fmt), "  ".join("-" * w for w in widths)]
        for line in lines:
            out.append("  ".join(f"{x:<{w}}" for x, w in zip(line, widths, strict=True)))
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()


def _path_name(path) -> str:
    parts = []
    for entry in path:
        for attr in ("key", "idx", "name"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts) or "<root>"


def weight_report(params: Any, *, rtol: float | None = None) -> WeightReport:
    """Spectral metrics for every floating leaf of rank >= 2 in ``params``.

    A leaf ``(..., m, n)`` with leading dimensions is a stack of matrices (e.g. scanned layers
    ``(L, d_in, d_out)``): it is decomposed in one batched SVD and gives one row per matrix, named
    ``path[i]``. Leaves of rank < 2 (biases, norm scales) and non-floating leaves are skipped.

    Args:
      params: a pytree of arrays.
      rtol: relative threshold for the numerical rank (see :func:`numerical_rank`).

    Returns:
      :class:`WeightReport`; metrics in f32 (f64 for f64 leaves mixed to f32 unless all are f64).

    Raises:
      ValueError: if ``params`` holds no matrices, or (eagerly) a matrix holds NaN or inf.
    """
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    names: list[str] = []
    shapes: list[tuple[int, int]] = []
    cols: dict[str, list[jax.Array]] = {c: [] for c in _COLUMNS}
    for path, leaf in leaves:
        if not hasattr(leaf, "ndim") or leaf.ndim < 2:
            continue
        if not jnp.issubdtype(leaf.dtype, jnp.floating) or 0 in leaf.shape:
            continue
        name = _path_name(path)
        w = _operator.check_matrix(leaf, name, batched=True)
        mats = w.reshape((-1, *w.shape[-2:]))
        s = _svdvals(mats)
        tol = _default_rtol(w.shape, w.dtype) if rtol is None else float(rtol)
        metrics = {
            "spectral_norm": _spectral_norm(s),
            "frobenius_norm": jnp.sqrt(jnp.sum(s * s, axis=-1)),
            "stable_rank": _stable_rank(s),
            "effective_rank": _effective_rank(s),
            "condition_number": _condition_number(s),
            "numerical_rank": _numerical_rank(s, tol),
        }
        for c in _COLUMNS:
            cols[c].append(metrics[c])
        if w.ndim == 2:
            names.append(name)
        else:
            names.extend(f"{name}[{','.join(map(str, i))}]" for i in np.ndindex(*w.shape[:-2]))
        shapes.extend([tuple(int(d) for d in w.shape[-2:])] * mats.shape[0])
    if not names:
        raise ValueError("params holds no floating matrices (leaves of rank >= 2) to report on")
    dtype = _checks.promote_dtypes(*(c.dtype for c in cols["spectral_norm"]))
    arrays = {
        c: jnp.concatenate([x.astype(jnp.int32 if c == "numerical_rank" else dtype) for x in v])
        for c, v in cols.items()
    }
    return WeightReport(**arrays, names=tuple(names), shapes=tuple(shapes))
