"""Heavy-tailed spectral metrics per weight matrix (as weightwatcher reports them), with exact estimators.

Dimension legend used in the docstrings:
  ...   optional leading dimensions (stacked layers); every metric is computed per matrix
  N, M  the larger and the smaller dimension of a matrix W (N >= M; W may be stored either way)
  n     number of eigenvalues fitted (M for a matrix, r for a rank-r LoRA update from factors)
  r     LoRA rank

Empirical spectral density (ESD): the eigenvalues ``λ_i = σ_i² / N`` of ``X = WᵀW / N`` (of the
smaller Gram matrix, so there are M of them), computed from the singular values of W (f32, or f64
for f64 input). From LoRA factors ``ΔW = scale · (b @ a)ᵀ`` only the r non-zero eigenvalues are
computed (QR of the factors, then an r × r SVD); the other ``M − r`` are exactly zero.

Power-law fit of the tail (Clauset, Shalizi & Newman 2009, "Power-law distributions in empirical
data", §3): for each candidate ``xmin`` among the distinct positive eigenvalues (with at least
``min_tail`` eigenvalues ``x_i >= xmin``), the continuous maximum-likelihood exponent is
``α̂ = 1 + n_tail / Σ_{x_i >= xmin} ln(x_i / xmin)`` (density ``p(x) ∝ x^−α``), and the KS distance
``D = sup_{x >= xmin} |S(x) − P(x)|`` between the empirical CDF S of the tail and the fitted
``P(x) = 1 − (x / xmin)^(1−α̂)`` is evaluated exactly (both sides of every step of S). The reported
fit is the candidate of smallest D (the largest tail among ties). Its standard error is
``(α̂ − 1) / √n_tail`` (Clauset et al. eq. 3.2). No finite-size correction ``(n−1)/n`` is applied.
Eigenvalues ``<= rtol · λ_max`` are treated as zero and never enter the fit.

Marchenko–Pastur bulk: for W with i.i.d. entries of variance σ², the ESD of ``WᵀW / N`` follows the
Marchenko–Pastur law with aspect ratio ``Q = N / M`` and bulk edge ``λ+ = σ² (1 + 1/√Q)²``.
weightwatcher fits σ by matching the MP density to a histogram; here σ² is the fixed point of
``σ² ← mean{λ_i : λ_i <= λ+(σ²)}`` (the bulk's mean, which is σ² for a pure MP spectrum), started
from ``σ² = mean_i λ_i = ‖W‖_F² / (N M)`` and iterated 16 times, so a few large outliers do not
inflate σ². Spikes are the eigenvalues above ``λ+`` (Tracy–Widom fluctuations of order ``M^−2/3``
mean a purely random matrix may show one or two; eigenvalues treated as zero never count).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxla import _checks
from jaxla.spectral import _metrics, _operator
from jaxla.spectral._operator import HIGHEST

__all__ = [
    "HeavyTailReport",
    "PowerLawFit",
    "esd",
    "heavy_tail_report",
    "marchenko_pastur_edge",
    "power_law_fit",
]

_MP_ITERS = 16


class PowerLawFit(NamedTuple):
    """A continuous power-law fit ``p(x) ∝ x^−α`` of the tail ``x >= xmin`` (see the module doc).

    Attributes:
      alpha: scalar exponent α̂ (NaN when no candidate tail had ``min_tail`` distinct points).
      alpha_stderr: scalar ``(α̂ − 1) / √n_tail``.
      xmin: scalar start of the tail.
      ks_distance: scalar KS distance D of the chosen fit.
      num_tail: int32 scalar, eigenvalues in the tail.
    """

    alpha: jax.Array
    alpha_stderr: jax.Array
    xmin: jax.Array
    ks_distance: jax.Array
    num_tail: jax.Array


def _check_min_tail(min_tail: Any) -> int:
    min_tail = _checks.check_positive_int(min_tail, "min_tail")
    if min_tail < 2:
        raise ValueError(f"min_tail must be >= 2 (a one-point tail has no exponent), got {min_tail}")
    return min_tail


def _check_rtol(rtol: Any, n: int, dtype) -> float:
    if rtol is None:
        return max(n, 1) * float(jnp.finfo(dtype).eps)
    if isinstance(rtol, bool) or not isinstance(rtol, int | float) or not 0 <= rtol < 1:
        raise ValueError(f"rtol must be a number in [0, 1), got {rtol!r}")
    return float(rtol)


def power_law_fit(
    eigenvalues: Any, *, min_tail: int = 5, rtol: float | None = None
) -> PowerLawFit:
    """Clauset–Shalizi–Newman power-law fit of the tail of ``eigenvalues`` ``(n,)``.

    Args:
      eigenvalues: ``(n,)`` non-negative values (any order), e.g. :func:`esd` of a matrix.
      min_tail: fewest points a candidate tail may have (>= 2).
      rtol: values ``<= rtol · max`` are treated as zero and excluded; default ``n · eps``.

    Returns:
      :class:`PowerLawFit` (f32, or f64 for f64 input). Cost O(n²) time, O(n · 128) memory.
    """
    x = _checks.as_array(eigenvalues, "eigenvalues")
    _checks.check_floating(x, "eigenvalues")
    _checks.check_rank(x, "eigenvalues", 1, "(n,)")
    if x.shape[0] == 0:
        raise ValueError("eigenvalues must not be empty")
    _operator.check_finite(x, "eigenvalues")
    min_tail = _check_min_tail(min_tail)
    dtype = _checks.accum_dtype(x.dtype)
    rtol = _check_rtol(rtol, x.shape[0], dtype)
    return _fit_jit(x.astype(dtype), min_tail=min_tail, rtol=rtol)


def _fit(x, *, min_tail, rtol):
    """The fit on ``(n,)`` values, traceable (see :func:`power_law_fit`)."""
    n = x.shape[0]
    x = jnp.sort(x)
    valid = x > rtol * x[-1]
    logx = jnp.log(jnp.where(valid, x, 1.0))
    idx = jnp.arange(n, dtype=jnp.int32)
    tail_n = (n - idx).astype(x.dtype)
    suffix = jnp.cumsum(jnp.where(valid, logx, 0.0)[::-1])[::-1]
    spread = suffix - tail_n * logx  # Σ_{i >= j} ln(x_i / x_j)
    distinct = jnp.concatenate([jnp.ones((1,), bool), x[1:] > x[:-1]])
    candidate = valid & distinct & (n - idx >= min_tail) & (spread > 0)
    alpha = 1.0 + tail_n / jnp.where(candidate, spread, 1.0)

    def ks(j):
        a, lj, nj = alpha[j], logx[j], tail_n[j]
        in_tail = idx >= j
        cdf = -jnp.expm1((1.0 - a) * (logx - lj))
        rank = (idx - j + 1).astype(x.dtype)
        gap = jnp.maximum(jnp.abs(rank / nj - cdf), jnp.abs((rank - 1.0) / nj - cdf))
        return jnp.max(jnp.where(in_tail, gap, 0.0))

    dist = lax.map(ks, idx, batch_size=min(n, 128))
    dist = jnp.where(candidate, dist, jnp.inf)
    best = jnp.argmin(dist)
    found = candidate[best]
    nan = jnp.asarray(jnp.nan, x.dtype)
    a = jnp.where(found, alpha[best], nan)
    count = jnp.where(found, n - best, 0).astype(jnp.int32)
    return PowerLawFit(
        alpha=a,
        alpha_stderr=jnp.where(found, (a - 1.0) / jnp.sqrt(tail_n[best]), nan),
        xmin=jnp.where(found, x[best], nan),
        ks_distance=jnp.where(found, dist[best], nan),
        num_tail=count,
    )


_fit_jit = jax.jit(_fit, static_argnames=("min_tail", "rtol"))


def marchenko_pastur_edge(sigma2: Any, aspect: float) -> jax.Array:
    """Upper bulk edge ``λ+ = σ² (1 + 1/√Q)²`` of the MP law of ``WᵀW / N``, ``Q = N / M >= 1``.

    Args:
      sigma2: element variance σ² (scalar or array).
      aspect: ``Q = N / M`` (larger over smaller dimension), a number >= 1.
    """
    if isinstance(aspect, bool) or not isinstance(aspect, int | float) or not aspect >= 1:
        raise ValueError(f"aspect must be N / M >= 1 (larger over smaller dimension), got {aspect!r}")
    return jnp.asarray(sigma2) * (1.0 + 1.0 / np.sqrt(float(aspect))) ** 2


def _mp_fit(lam, num_zeros, aspect, rtol):
    """Fixed-point σ² (module doc), λ+ and the spike count, for ``(n,)`` eigenvalues + zeros.

    Eigenvalues ``<= rtol · λ_max`` count as zeros (rounding noise of a rank-deficient matrix).
    """
    lam = jnp.where(lam > rtol * jnp.max(lam), lam, 0.0)
    total = lam.shape[0] + num_zeros
    factor = (1.0 + 1.0 / np.sqrt(aspect)) ** 2

    def step(_, sigma2):
        bulk = lam <= sigma2 * factor
        count = (jnp.sum(bulk) + num_zeros).astype(lam.dtype)
        return jnp.sum(jnp.where(bulk, lam, 0.0)) / jnp.maximum(count, 1.0)

    sigma2 = lax.fori_loop(0, _MP_ITERS, step, jnp.sum(lam) / jnp.asarray(total, lam.dtype))
    edge = sigma2 * factor
    return sigma2, edge, jnp.sum((lam > edge) & (lam > 0)).astype(jnp.int32)


def _update_eigs(a, b, scale, n_big):
    """The r eigenvalues ``σ_i² / N`` of ΔW = scale · aᵀ bᵀ, from QR of the factors."""
    dtype = a.dtype
    _, ra = jnp.linalg.qr(a.T)
    _, rb = jnp.linalg.qr(b)
    core = jnp.asarray(scale, dtype) * jnp.matmul(ra, rb.T, precision=HIGHEST)
    s = jnp.linalg.svd(core, compute_uv=False)
    return s * s / n_big


def esd(w: Any = None, *, a: Any = None, b: Any = None, scale: float = 1.0) -> jax.Array:
    """Eigenvalues of ``X = WᵀW / N``, descending: ``(..., M)`` for ``w`` ``(..., m, n)``.

    Args:
      w: ``(..., m, n)`` matrix (stack); ``N = max(m, n)``, ``M = min(m, n)``.
      a: instead of ``w``, LoRA factors: ``a`` ``(r, d_in)``,
      b: ``(d_out, r)``, with
      scale: the adapter scale; ΔW = ``scale · (b @ a)ᵀ`` ``(d_in, d_out)``. Returns the
        ``min(r, d_in, d_out)`` largest eigenvalues (the rest are zero).
    """
    if w is not None:
        if a is not None or b is not None:
            raise ValueError("pass either w or the factors (a, b, scale), not both")
        s = _metrics.singular_values(w)
        return s * s / max(w.shape[-2:])
    a, b, _ = _check_factors(a, b, scale, "")
    return _update_eigs(a, b, scale, max(a.shape[1], b.shape[0]))


def _check_factors(a, b, scale, name):
    where = f" for {name!r}" if name else ""
    if a is None or b is None:
        raise ValueError(f"pass w, or both adapter factors a (r, d_in) and b (d_out, r){where}")
    a = _operator.check_matrix(a, f"a{where}")
    b = _operator.check_matrix(b, f"b{where}")
    if b.shape[1] != a.shape[0]:
        raise ValueError(
            f"adapter factors{where} must be a (r, d_in) and b (d_out, r) with the same r; got a "
            f"{tuple(a.shape)} and b {tuple(b.shape)}"
        )
    if isinstance(scale, bool) or not isinstance(scale, int | float | np.floating | jax.Array):
        raise TypeError(f"scale{where} must be a number, got {type(scale).__name__}")
    if jnp.shape(scale) != ():
        raise ValueError(f"scale{where} must be a scalar, got shape {jnp.shape(scale)}")
    dtype = _checks.accum_dtype(jnp.promote_types(a.dtype, b.dtype))
    return a.astype(dtype), b.astype(dtype), (a.shape[1], b.shape[0])


_COLUMNS = ("alpha", "alpha_stderr", "xmin", "ks_distance", "num_tail", "lambda_max",
            "mp_sigma2", "mp_edge", "num_spikes")
_INT_COLUMNS = ("num_tail", "num_spikes")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HeavyTailReport:
    """Heavy-tail metrics of every matrix (one row per matrix; per layer when stacked).

    Array fields are ``(R,)`` for R rows: the power-law fit (``alpha``, ``alpha_stderr``, ``xmin``,
    ``ks_distance``, ``num_tail``) of the ESD, its largest eigenvalue ``lambda_max``, the
    Marchenko–Pastur variance ``mp_sigma2`` and edge ``mp_edge`` and the number of eigenvalues above
    it, ``num_spikes`` (definitions in the module docstring). ``names``, ``shapes`` and
    ``num_eigenvalues`` (M per row) are static, so the report passes through ``jit``.
    ``str(report)`` (or :meth:`table`) is a printable table.
    """

    alpha: jax.Array
    alpha_stderr: jax.Array
    xmin: jax.Array
    ks_distance: jax.Array
    num_tail: jax.Array
    lambda_max: jax.Array
    mp_sigma2: jax.Array
    mp_edge: jax.Array
    num_spikes: jax.Array
    names: tuple[str, ...] = dataclasses.field(metadata=dict(static=True))
    shapes: tuple[tuple[int, int], ...] = dataclasses.field(metadata=dict(static=True))
    num_eigenvalues: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))

    def rows(self) -> list[dict[str, Any]]:
        """Host-side rows: ``{"name", "shape", "num_eigenvalues", <metric>: float | int}``."""
        cols = {c: np.asarray(getattr(self, c)) for c in _COLUMNS}
        out = []
        for i, (name, shape, m) in enumerate(
                zip(self.names, self.shapes, self.num_eigenvalues, strict=True)):
            row: dict[str, Any] = {"name": name, "shape": shape, "num_eigenvalues": m}
            for c in _COLUMNS:
                row[c] = int(cols[c][i]) if c in _INT_COLUMNS else float(cols[c][i])
            out.append(row)
        return out

    def table(self) -> str:
        """A fixed-width text table of :meth:`rows`."""
        header = ["name", "shape", "alpha", "±", "xmin", "KS", "tail", "λ_max", "MP λ+", "spikes"]
        lines = []
        for r in self.rows():
            lines.append([
                r["name"], "×".join(str(d) for d in r["shape"]), f"{r['alpha']:.3f}",
                f"{r['alpha_stderr']:.2g}", f"{r['xmin']:.4g}", f"{r['ks_distance']:.3f}",
                f"{r['num_tail']}/{r['num_eigenvalues']}", f"{r['lambda_max']:.4g}",
                f"{r['mp_edge']:.4g}", str(r["num_spikes"]),
            ])
        widths = [max(len(x) for x in col) for col in zip(header, *lines, strict=True)]
        out = ["  ".join(f"{h:<{w}}" for h, w in zip(header, widths, strict=True)),
               "  ".join("-" * w for w in widths)]
        out += ["  ".join(f"{x:<{w}}" for x, w in zip(line, widths, strict=True)) for line in lines]
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()


def _metrics_of(lam_desc, num_zeros, aspect, min_tail, rtol):
    """One row's metrics from ``(n,)`` eigenvalues (plus ``num_zeros`` implicit zeros)."""
    fit = _fit(lam_desc, min_tail=min_tail, rtol=rtol)
    sigma2, edge, spikes = _mp_fit(lam_desc, num_zeros, aspect, rtol)
    return dict(alpha=fit.alpha, alpha_stderr=fit.alpha_stderr, xmin=fit.xmin,
                ks_distance=fit.ks_distance, num_tail=fit.num_tail,
                lambda_max=jnp.max(lam_desc), mp_sigma2=sigma2, mp_edge=edge, num_spikes=spikes)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _metrics_batch(lam, num_zeros, aspect, min_tail, rtol):
    """:func:`_metrics_of` over ``(R, n)`` rows, one compiled program per shape and option set."""
    return jax.vmap(lambda x: _metrics_of(x, num_zeros, aspect, min_tail, rtol))(lam)


def _factor_rows(name, value):
    """``[(row name, (a, b, scale))]`` of one factors entry, one row per matrix of a stack."""
    if all(hasattr(value, f) for f in ("a", "b", "scale")):
        value = (value.a, value.b, value.scale)
    if not isinstance(value, tuple | list) or len(value) != 3:
        raise ValueError(f"factors[{name!r}] must be a triple (a, b, scale) or an adapter with "
                         f".a, .b and .scale, got {type(value).__name__}")
    a, b, scale = value
    stack = tuple(np.shape(a)[:-2])
    if len(stack) == 0 or np.ndim(a) != np.ndim(b):
        return [(name, (a, b, scale))]
    if tuple(np.shape(b)[:-2]) != stack:
        raise ValueError(f"factors[{name!r}]: a {np.shape(a)} and b {np.shape(b)} must have the "
                         "same leading (stack) dimensions")
    return [(f"{name}[{','.join(map(str, i))}]", (a[i], b[i], scale)) for i in np.ndindex(*stack)]


def heavy_tail_report(
    params: Any = None,
    *,
    factors: Any = None,
    min_tail: int = 5,
    rtol: float | None = None,
) -> HeavyTailReport:
    """Heavy-tail metrics (power-law α, MP edge, spikes) for every matrix in ``params``.

    Args:
      params: a pytree of arrays; every floating leaf of rank >= 2 ``(..., m, n)`` is a matrix
        (a stack of matrices with leading dimensions, one row each, named ``path[i]``); other
        leaves are skipped. May be None when ``factors`` is given.
      factors: optional LoRA updates from their factors: a mapping ``name -> (a (..., r, d_in),
        b (..., d_out, r), scale)`` with ``ΔW = scale · (b @ a)ᵀ``, or ``name -> adapter`` for
        any object with ``.a``, ``.b`` and ``.scale`` (a ``jaxla.lora`` adapters dict works as
        is; the layout flag does not matter, the ESD of ΔWᵀ is that of ΔW). Stacked factors give
        one row per matrix, ``name[i]``. ΔW is never formed (its r non-zero eigenvalues come
        from an r × r SVD, the other ``M − r`` are zero for the MP fit).
      min_tail: fewest eigenvalues a fitted tail may have (>= 2).
      rtol: eigenvalues ``<= rtol · λ_max`` are treated as zero in the fit; default ``n · eps``.

    Returns:
      :class:`HeavyTailReport`, params rows first, then factor rows; f32 (f64 if all inputs are).

    Raises:
      ValueError: if there is no matrix, or (eagerly) a matrix holds NaN or inf.
    """
    min_tail = _check_min_tail(min_tail)
    names: list[str] = []
    shapes: list[tuple[int, int]] = []
    counts: list[int] = []
    cols: dict[str, list[jax.Array]] = {c: [] for c in _COLUMNS}

    def add(name, shape, stacked_metrics, index_names, m):
        for c in _COLUMNS:
            cols[c].append(jnp.atleast_1d(stacked_metrics[c]))
        names.extend(index_names)
        shapes.extend([shape] * len(index_names))
        counts.extend([m] * len(index_names))

    if params is not None:
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
            if not hasattr(leaf, "ndim") or leaf.ndim < 2:
                continue
            if not jnp.issubdtype(leaf.dtype, jnp.floating) or 0 in leaf.shape:
                continue
            name = _metrics._path_name(path)
            w = _operator.check_matrix(leaf, name, batched=True)
            shape = tuple(int(d) for d in w.shape[-2:])
            big, small = max(shape), min(shape)
            s = _metrics._svdvals(w.reshape((-1, *shape)))
            lam = s * s / big
            tol = _check_rtol(rtol, small, lam.dtype)
            index_names = ([name] if w.ndim == 2 else
                           [f"{name}[{','.join(map(str, i))}]" for i in np.ndindex(*w.shape[:-2])])
            add(name, shape, _metrics_batch(lam, 0, big / small, min_tail, tol), index_names,
                small)
    if factors is not None:
        if not isinstance(factors, Mapping) or not factors:
            raise TypeError("factors must be a non-empty mapping name -> (a, b, scale) or an "
                            "adapter with .a, .b and .scale (e.g. jaxla.lora adapters)")
        for name, value in factors.items():
            for row_name, triple in _factor_rows(str(name), value):
                a, b, shape = _check_factors(*triple, row_name)
                big, small = max(shape), min(shape)
                lam = _update_eigs(a, b, triple[2], big)
                tol = _check_rtol(rtol, small, lam.dtype)
                row = _metrics_batch(lam[None], small - lam.shape[0], big / small, min_tail, tol)
                add(row_name, shape, row, [row_name], small)
    if not names:
        raise ValueError("no matrices to report on: params holds no floating leaves of rank >= 2 "
                         "and no factors were given")
    dtype = _checks.promote_dtypes(*(c.dtype for c in cols["alpha"]))
    arrays = {c: jnp.concatenate([x.astype(jnp.int32 if c in _INT_COLUMNS else dtype) for x in v])
              for c, v in cols.items()}
    return HeavyTailReport(**arrays, names=tuple(names), shapes=tuple(shapes),
                           num_eigenvalues=tuple(counts))
