"""Principal component analysis with scikit-learn's definitions, as pure functions on a pytree.

Dimension legend used in the docstrings:
  N  number of samples (e.g. embeddings), D number of features (embedding width)
  C  number of components kept

Definitions (those of ``sklearn.decomposition.PCA``, checked against scikit-learn 1.9):
  mean                      column means of x
  components                top-C right singular vectors of the centred data, as rows (C, D);
                            signs flipped so the largest-|·| entry of each row is positive
                            (``svd_flip(u_based_decision=False)``)
  singular_values           top-C singular values of the centred data
  explained_variance        singular_values² / (N − 1)
  explained_variance_ratio  explained_variance / total variance (over all min(N, D) components; for
                            the randomized solver Σ‖x − mean‖² / (N − 1))
  noise_variance            mean of the discarded explained variances (0 if none are discarded)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxla import _checks
from jaxla.spectral import _operator, _svd
from jaxla.spectral._operator import HIGHEST

__all__ = ["PCAResult", "pca", "pca_inverse_transform", "pca_transform"]

_SOLVERS = ("auto", "full", "randomized")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PCAResult:
    """A fitted PCA (arrays are pytree leaves; ``whiten`` is static metadata).

    Attributes:
      mean: ``(D,)``.
      components: ``(C, D)`` principal axes as rows.
      explained_variance: ``(C,)``.
      explained_variance_ratio: ``(C,)``.
      singular_values: ``(C,)``.
      noise_variance: scalar, the probabilistic-PCA noise variance.
      whiten: whether :func:`pca_transform` scales components to unit variance.
    """

    mean: jax.Array
    components: jax.Array
    explained_variance: jax.Array
    explained_variance_ratio: jax.Array
    singular_values: jax.Array
    noise_variance: jax.Array
    whiten: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])


def _flip_rows(u: jax.Array, vt: jax.Array) -> tuple[jax.Array, jax.Array]:
    idx = jnp.argmax(jnp.abs(vt), axis=1)
    signs = jnp.sign(jnp.take_along_axis(vt, idx[:, None], axis=1))[:, 0]
    signs = jnp.where(signs == 0, 1.0, signs).astype(vt.dtype)
    return u * signs[None, :], vt * signs[:, None]


def _resolve_n_components(n_components: Any, limit: int) -> tuple[int | None, float | None]:
    """``(count, fraction)``: exactly one is set."""
    if n_components is None:
        return limit, None
    if isinstance(n_components, bool):
        raise TypeError(
            f"n_components must be an int, a float in (0, 1) or None, got {n_components}"
        )
    if isinstance(n_components, int | np.integer):
        if not 1 <= n_components <= limit:
            raise ValueError(
                f"n_components={n_components} must be between 1 and min(n_samples, n_features)="
                f"{limit}"
            )
        return int(n_components), None
    if isinstance(n_components, float | np.floating):
        if not 0.0 < n_components < 1.0:
            raise ValueError(
                f"a float n_components is the fraction of variance to keep and must lie in (0, 1), "
                f"got {n_components}"
            )
        return None, float(n_components)
    raise TypeError(f"n_components must be an int, a float in (0, 1) or None, got {n_components!r}")


def pca(
    x: Any,
    n_components: int | float | None = None,
    *,
    whiten: bool = False,
    solver: str = "auto",
    key: Any = None,
    oversample: int = 10,
    n_iter: int | None = None,
) -> PCAResult:
    """Fits PCA to ``x`` ``(N, D)`` with scikit-learn's semantics.

    Args:
      x: ``(N, D)`` floating data, ``N >= 2``.
      n_components: ``None`` (all ``min(N, D)``), an int ``C`` in ``[1, min(N, D)]``, or a float in
        ``(0, 1)``: the smallest ``C`` whose cumulative explained variance ratio exceeds it
        (strictly, as scikit-learn). A fraction makes ``C`` depend on the data, so ``x`` must be
        concrete (not traced under ``jit``) and the ``"full"`` solver is used.
      whiten: store that :func:`pca_transform` divides by √explained_variance.
      solver: ``"full"`` (exact SVD), ``"randomized"`` (:func:`randomized_svd`, needs ``key``) or
        ``"auto"``: randomized when ``max(N, D) > 500`` and ``C < 0.8 · min(N, D)`` and a key is
        given, else full (scikit-learn's rule, with its covariance solver mapped to full).
      key: PRNG key for the randomized solver.
      oversample: randomized solver oversampling.
      n_iter: randomized solver power iterations (default as :func:`randomized_svd`).

    Returns:
      :class:`PCAResult` in f32 (f64 for f64 input).
    """
    x = _operator.check_matrix(x, "x")
    n, d = x.shape
    if n < 2:
        raise ValueError(
            f"pca needs at least 2 samples to estimate variance, got x of shape {(n, d)}"
        )
    if solver not in _SOLVERS:
        raise ValueError(f"solver must be one of {_SOLVERS}, got {solver!r}")
    limit = min(n, d)
    count, fraction = _resolve_n_components(n_components, limit)
    if fraction is not None and solver == "randomized":
        raise ValueError("a fractional n_components needs the full spectrum: use solver='full'")
    if solver == "auto":
        big = max(n, d) > 500 and count is not None and count < 0.8 * limit
        solver = "randomized" if big and key is not None else "full"
    if solver == "randomized" and key is None:
        raise ValueError("solver='randomized' needs a PRNG `key`")

    x = x.astype(_checks.accum_dtype(x.dtype))
    mean = jnp.mean(x, axis=0)
    xc = x - mean[None, :]
    dof = jnp.asarray(n - 1, x.dtype)
    if solver == "randomized":
        u, s, vt = _svd.randomized_svd(xc, count, key=key, oversample=oversample, n_iter=n_iter)
        _, vt = _flip_rows(u, vt)
        ev = s * s / dof
        total = jnp.sum(xc * xc) / dof
        noise = (total - jnp.sum(ev)) / max(limit - count, 1) if count < limit else 0.0
        return PCAResult(mean, vt, ev, ev / total, s, jnp.asarray(noise, x.dtype), whiten)

    u, s, vt = jnp.linalg.svd(xc, full_matrices=False)
    _, vt = _flip_rows(u, vt)
    ev = s * s / dof
    ratio = ev / jnp.sum(ev)
    if fraction is not None:
        values = _operator.concrete(ratio)
        if values is None:
            raise ValueError(
                "a fractional n_components chooses the number of components from the data, which "
                "is not possible under jit; pass an int n_components inside jit"
            )
        count = min(int(np.searchsorted(np.cumsum(values), fraction, side="right")) + 1, limit)
    noise = jnp.mean(ev[count:]) if count < limit else jnp.zeros((), x.dtype)
    return PCAResult(mean, vt[:count], ev[:count], ratio[:count], s[:count], noise, whiten)


def _check_fit(fit: Any) -> None:
    if not isinstance(fit, PCAResult):
        raise TypeError(
            f"fit must be a PCAResult from jaxla.spectral.pca, got {type(fit).__name__}"
        )


def _matrix_input(x, name, layout, width, what):
    """``x`` as a floating (rows, width) array, or a ValueError/TypeError naming ``name``."""
    x = _checks.as_array(x, name)
    _checks.check_floating(x, name)
    _checks.check_rank(x, name, 2, layout)
    _checks.check_axis_size(x, name, 1, width, what)
    return x


def _whiten_scale(fit):
    """√explained_variance, clipped below at eps: what whitening divides by (and its inverse undoes)."""
    scale = jnp.sqrt(fit.explained_variance)
    return jnp.maximum(scale, jnp.finfo(scale.dtype).eps)


def pca_transform(fit: PCAResult, x: Any) -> jax.Array:
    """Projects ``x`` ``(N, D)`` onto the principal axes: ``(x − mean) @ componentsᵀ`` ``(N, C)``.

    With ``whiten`` the result is divided by √explained_variance (clipped below at eps, as
    scikit-learn, so rank-deficient data gives finite values).

    Args:
      fit: a :class:`PCAResult`.
      x: ``(N, D)`` floating data.

    Returns:
      ``(N, C)`` in the fit's dtype.
    """
    _check_fit(fit)
    x = _matrix_input(x, "x", "(N, D)", fit.mean.shape[0], "the number of features seen by pca")
    x = x.astype(fit.components.dtype)
    z = jnp.matmul(x - fit.mean[None, :], fit.components.T, precision=HIGHEST)
    if fit.whiten:
        z = z / _whiten_scale(fit)[None, :]
    return z


def pca_inverse_transform(fit: PCAResult, z: Any) -> jax.Array:
    """Maps component scores ``z`` ``(N, C)`` back to feature space ``(N, D)``.

    ``z @ components + mean``; with ``whiten`` the components are first scaled by
    √explained_variance (clipped below at eps, as in :func:`pca_transform`), the exact inverse of
    :func:`pca_transform` on the kept subspace.

    Args:
      fit: a :class:`PCAResult`.
      z: ``(N, C)`` floating scores.

    Returns:
      ``(N, D)`` in the fit's dtype.
    """
    _check_fit(fit)
    z = _matrix_input(z, "z", "(N, C)", fit.n_components, "the number of components of the fit")
    comps = fit.components
    if fit.whiten:
        comps = _whiten_scale(fit)[:, None] * comps
    return jnp.matmul(z.astype(comps.dtype), comps, precision=HIGHEST) + fit.mean[None, :]
