"""Randomized SVD (Halko, Martinsson & Tropp 2011) and optimal low-rank approximation.

Dimension legend used in the docstrings:
  ...  optional leading batch dimensions (stacked layers)
  m    rows of the matrix, n columns
  r    target rank
  l    sketch size r + oversample

Randomized SVD sketches the range of ``w`` with ``l`` Gaussian test vectors, sharpens it with ``q``
power iterations (re-orthonormalised by QR every half-step, HMT Algorithm 4.4) and solves a small
``l × n`` SVD. On a matrix with decaying spectrum its cost is ``O(mnl(2q + 2))`` instead of the
``O(mn min(m, n))`` of a full SVD. All products run at HIGHEST precision and accumulate in f32 (f64
for f64 input).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxla import _checks, _rsvd
from jaxla.spectral import _operator
from jaxla.spectral._operator import HIGHEST

__all__ = ["LowRankResult", "SVDResult", "low_rank_approx", "randomized_svd"]


class SVDResult(NamedTuple):
    """A (truncated) SVD ``w ≈ u @ diag(s) @ vt``.

    Attributes:
      u: ``(..., m, r)`` orthonormal columns.
      s: ``(..., r)`` singular values, descending.
      vt: ``(..., r, n)`` orthonormal rows.
    """

    u: jax.Array
    s: jax.Array
    vt: jax.Array


class LowRankResult(NamedTuple):
    """Best rank-``r`` approximation ``w ≈ u @ diag(s) @ vt`` with its Eckart–Young errors.

    Attributes:
      u: ``(..., m, r)``; s: ``(..., r)``; vt: ``(..., r, n)``.
      spectral_error: ``(...)`` ``‖w − w_r‖₂ = σ_{r+1}`` (0 when ``r = min(m, n)``).
      frobenius_error: ``(...)`` ``‖w − w_r‖_F = √(Σ_{i>r} σ_i²)``.
      relative_frobenius_error: ``(...)`` ``frobenius_error / ‖w‖_F`` (0 for a zero matrix).
    """

    u: jax.Array
    s: jax.Array
    vt: jax.Array
    spectral_error: jax.Array
    frobenius_error: jax.Array
    relative_frobenius_error: jax.Array

    def factors(self) -> tuple[jax.Array, jax.Array]:
        """``(left, right)`` with ``left = u · diag(s)`` ``(..., m, r)`` and ``right = vt``."""
        return self.u * self.s[..., None, :], self.vt

    def reconstruct(self) -> jax.Array:
        """The rank-``r`` matrix ``(..., m, n)``."""
        left, right = self.factors()
        return jnp.matmul(left, right, precision=HIGHEST)


# The sketching core is shared with PiSSA initialisation (jaxla.lora) through jaxla._rsvd.
_range_finder = _rsvd.range_finder
_flip_u = _rsvd.flip_signs


def _check_rank_arg(rank: Any, w: jax.Array, name: str = "rank") -> int:
    limit = min(w.shape[-2:])
    rank = _checks.check_positive_int(rank, name)
    if rank > limit:
        raise ValueError(
            f"{name}={rank} exceeds min(m, n) = {limit} for a matrix of shape {tuple(w.shape)}"
        )
    return rank


def randomized_svd(
    w: Any,
    rank: int,
    *,
    key: Any,
    oversample: int = 10,
    n_iter: int | None = None,
) -> SVDResult:
    """Top-``rank`` singular triplets of ``w`` by randomized range finding (Halko–Martinsson–Tropp).

    With ``l = rank + oversample`` and ``q = n_iter`` the expected spectral error of the sketch
    satisfies (HMT Corollary 10.10)
    ``E‖w − QQᵀw‖ ≤ [(1 + √(r/(p−1))) σ_{r+1}^{2q+1} + e√(r+p)/p · (Σ_{j>r}
    σ_j^{2(2q+1)})^{1/2}]^{1/(2q+1)}`` and the returned rank-``r`` truncation adds at most
    ``σ_{r+1}`` (HMT §9.3). Signs are fixed so the largest-magnitude entry of each column of ``u``
    is positive.

    Args:
      w: ``(..., m, n)`` floating matrix (leading dimensions are batched).
      rank: target rank ``r``, ``1 <= r <= min(m, n)``.
      key: PRNG key for the Gaussian test matrix.
      oversample: extra sketch columns ``p >= 0`` (``l = r + p`` is capped at ``min(m, n)``).
      n_iter: power iterations ``q >= 0``; default 7 when ``r < 0.1 · min(m, n)`` else 4 (the
        scikit-learn heuristic).

    Returns:
      :class:`SVDResult` with ``u (..., m, r)``, ``s (..., r)``, ``vt (..., r, n)`` in f32 (f64 for
      f64 input).
    """
    w = _operator.check_matrix(w, "w", batched=True)
    rank = _check_rank_arg(rank, w)
    oversample = _checks.check_positive_int(oversample, "oversample", allow_zero=True)
    limit = min(w.shape[-2:])
    if n_iter is None:
        n_iter = 7 if rank < 0.1 * limit else 4
    n_iter = _checks.check_positive_int(n_iter, "n_iter", allow_zero=True)
    size = min(rank + oversample, limit)
    return SVDResult(*_rsvd.randomized_svd(w.astype(_checks.accum_dtype(w.dtype)), key, rank=rank,
                                           size=size, n_iter=n_iter))


def low_rank_approx(w: Any, rank: int) -> LowRankResult:
    """Best rank-``rank`` approximation of ``w`` in spectral and Frobenius norm (Eckart–Young).

    Uses a full SVD, so the reported errors are exact: ``σ_{r+1}`` and ``√(Σ_{i>r} σ_i²)``. For
    large matrices where only the factors matter use :func:`randomized_svd`.

    Args:
      w: ``(..., m, n)`` floating matrix.
      rank: ``1 <= r <= min(m, n)``.

    Returns:
      :class:`LowRankResult`; signs follow :func:`randomized_svd` (largest entry of each ``u``
      column positive).
    """
    w = _operator.check_matrix(w, "w", batched=True)
    rank = _check_rank_arg(rank, w)
    return _low_rank(w.astype(_checks.accum_dtype(w.dtype)), rank=rank)


@functools.partial(jax.jit, static_argnames=("rank",))
def _low_rank(w, *, rank):
    u, s, vt = jnp.linalg.svd(w, full_matrices=False)
    tail = s[..., rank:]
    spectral = tail[..., 0] if tail.shape[-1] else jnp.zeros(s.shape[:-1], s.dtype)
    frob = jnp.sqrt(jnp.sum(tail * tail, axis=-1))
    total = jnp.sqrt(jnp.sum(s * s, axis=-1))
    rel = jnp.where(total > 0, frob / jnp.where(total > 0, total, 1.0), 0.0)
    u, vt = _flip_u(u[..., :rank], vt[..., :rank, :])
    return LowRankResult(u, s[..., :rank], vt, spectral, frob, rel)
