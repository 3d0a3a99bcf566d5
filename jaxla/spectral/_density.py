"""Eigenvalue density of the Hessian by stochastic Lanczos quadrature (SLQ), matrix-free.

Dimension legend used in the docstrings:
  P   number of scalar parameters in the ``params`` pytree
  S   number of random probe vectors (``num_probes``)
  m   Lanczos steps per probe (``num_steps``)
  G   number of grid points of the density (``grid_size``)

Stochastic Lanczos quadrature (Lin, Saad & Yang 2016; Ghorbani, Krishnan & Xiao 2019, the method of
PyHessian): for each probe ``v`` (Rademacher, normalised) m Lanczos steps with full
reorthogonalisation give the tridiagonal ``T``; its eigenvalues ``θ_k`` (nodes) and squared first
eigenvector components ``τ_k`` (weights, summing to 1) form the Gauss quadrature rule of the measure
``Σ_i (u_iᵀ v)² δ(t − λ_i)``, exact for polynomials of degree ≤ 2m − 1. Averaged over probes this
estimates the spectral density ``(1/P) Σ_i δ(t − λ_i)``; the returned density replaces each node by
a Gaussian of width σ. Its mean and variance are exact per probe (``vᵀHv / P`` and
``vᵀH²v / P − mean²``), so they carry only the Hutchinson sampling error.

The Hessian is only touched through Hessian-vector products (:func:`jaxla.spectral.hvp`), memory is
O(m · P) for one probe at a time, and, as for the other Hessian tools, compilation is the caller's:
no cache is keyed on ``loss_fn`` (see :mod:`jaxla.spectral._hessian`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

from jaxla import _checks
from jaxla.spectral import _hessian, _iterative
from jaxla.spectral._operator import HIGHEST

__all__ = ["HessianDensity", "hessian_density"]


def _check_int(value: Any, name: str, minimum: int) -> int:
    value = _checks.check_positive_int(value, name)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


class HessianDensity(NamedTuple):
    """Stochastic Lanczos quadrature estimate of the Hessian's eigenvalue density.

    Attributes:
      grid: ``(G,)`` evaluation points, ascending.
      density: ``(G,)`` the Gaussian-broadened density on ``grid`` (integrates to ≈ 1 when the grid
        covers the spectrum plus a few σ, as the default grid does).
      nodes: ``(S, m)`` Gauss quadrature nodes (Ritz values) per probe.
      weights: ``(S, m)`` their weights; each row sums to 1 (0 for unused nodes after an early
        invariant subspace).
      sigma: scalar, the Gaussian width used.
    """

    grid: jax.Array
    density: jax.Array
    nodes: jax.Array
    weights: jax.Array
    sigma: jax.Array

    def moments(self) -> tuple[jax.Array, jax.Array]:
        """``(mean, variance)`` of the estimated spectral measure, from the quadrature rule.

        The mean estimates ``tr(H) / P``, the variance ``tr(H²) / P − (tr(H) / P)²``; the
        broadening (which adds σ² to the variance of the density curve) is not included.
        """
        s = self.nodes.shape[0]
        mean = jnp.sum(self.weights * self.nodes) / s
        second = jnp.sum(self.weights * self.nodes * self.nodes) / s
        return mean, second - mean * mean


def hessian_density(
    loss_fn: Callable,
    params: Any,
    batch: Any,
    *,
    key: Any,
    num_probes: int = 8,
    num_steps: int = 64,
    grid_size: int = 512,
    sigma: float | None = None,
    grid_range: tuple[float, float] | None = None,
) -> HessianDensity:
    """Eigenvalue density of the Hessian of ``loss_fn(·, batch)`` by stochastic Lanczos quadrature.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: parameter pytree (P scalars).
      batch: data (any pytree).
      key: PRNG key of the Rademacher start vectors (probe s uses ``fold_in(key, s)``).
      num_probes: S start vectors, run one after another (memory ``(m + 1) · P`` at a time).
      num_steps: Lanczos steps ``m`` per probe, ``1 <= m <= P`` (one product each).
      grid_size: G points of the returned grid.
      sigma: Gaussian broadening width (absolute, in eigenvalue units); default 1% of the spread
        of the nodes (``max θ − min θ``, or of ``max |θ|`` when they coincide).
      grid_range: ``(lo, hi)`` of the grid; default the node range extended by 4σ each side.

    Returns:
      :class:`HessianDensity`; ``density[g] = (1/S) Σ_s Σ_k τ_sk N(grid[g]; θ_sk, σ²)``.

    No library cache holds ``loss_fn``: call it under your own ``jax.jit`` to compile once.
    """
    _hessian._check_loss(loss_fn, params, batch)
    num_probes = _check_int(num_probes, "num_probes", 1)
    grid_size = _check_int(grid_size, "grid_size", 2)
    dim = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(params))
    num_steps = _check_int(num_steps, "num_steps", 1)
    if num_steps > dim:
        raise ValueError(
            f"num_steps={num_steps} exceeds the number of parameters P={dim} (Lanczos builds at "
            "most P orthogonal vectors)"
        )
    if sigma is not None and not (isinstance(sigma, int | float) and np.isfinite(sigma)
                                  and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    if grid_range is not None:
        lo_hi = tuple(grid_range) if isinstance(grid_range, tuple | list) else ()
        if (len(lo_hi) != 2 or not all(isinstance(x, int | float) for x in lo_hi)
                or not np.all(np.isfinite(lo_hi)) or not lo_hi[0] < lo_hi[1]):
            raise ValueError(f"grid_range must be a pair (lo, hi) of finite lo < hi, got "
                             f"{grid_range!r}")
        grid_range = (float(lo_hi[0]), float(lo_hi[1]))
    return _hessian._this_call_jit(
        _density_core, loss_fn, num_probes=num_probes, num_steps=num_steps, grid_size=grid_size,
        sigma=None if sigma is None else float(sigma), grid_range=grid_range)(params, batch, key)


class _LanczosState(NamedTuple):
    basis: jax.Array    # (m + 1, P) orthonormal vectors so far, zero past the last
    alpha: jax.Array    # (m,) the tridiagonal's diagonal
    beta: jax.Array     # (m,) its off-diagonal
    anorm: jax.Array    # running estimate of ‖A‖ (for the breakdown test)
    used: jax.Array     # index of the last step taken before an invariant subspace was found
    stopped: jax.Array  # an invariant subspace was found: later steps are zeroed


def _lanczos_start(q0, m) -> _LanczosState:
    dtype = q0.dtype
    basis = jnp.zeros((m + 1, q0.shape[0]), dtype).at[0].set(q0 / jnp.linalg.norm(q0))
    zeros = jnp.zeros((m,), dtype)
    return _LanczosState(basis, zeros, zeros, jnp.zeros((), dtype), jnp.int32(0), jnp.bool_(False))


def _lanczos_step(state: _LanczosState, j, w) -> _LanczosState:
    """Step j given ``w = A q_j``: full reorthogonalisation (twice), α_j, β_j and q_{j+1}."""
    eps = jnp.finfo(w.dtype).eps
    q = state.basis[j]
    a = jnp.dot(q, w, precision=HIGHEST)
    for _ in range(2):
        w = w - jnp.matmul(jnp.matmul(state.basis, w, precision=HIGHEST), state.basis,
                           precision=HIGHEST)
    b = jnp.linalg.norm(w)
    anorm = jnp.maximum(state.anorm, jnp.abs(a) + b)
    live = ~state.stopped
    breakdown = b <= 100.0 * eps * anorm
    nxt = jnp.where(breakdown | state.stopped, 0.0, w / jnp.where(breakdown, 1.0, b))
    return _LanczosState(state.basis.at[j + 1].set(nxt),
                         state.alpha.at[j].set(jnp.where(live, a, 0.0)),
                         state.beta.at[j].set(jnp.where(live, b, 0.0)), anorm,
                         jnp.where(live, j, state.used), state.stopped | breakdown)


def _lanczos_tridiag(matvec, q0, m):
    """m Lanczos steps from ``q0`` with full reorthogonalisation (a ``fori_loop``).

    Returns ``(alpha (m,), beta (m,), used)``: the tridiagonal's diagonal and off-diagonal and the
    index of the last step taken before an invariant subspace was found (steps after it are
    zeroed, so they decouple from the used block).
    """
    state = lax.fori_loop(0, m, lambda j, st: _lanczos_step(st, j, matvec(st.basis[j])),
                          _lanczos_start(q0, m))
    return state.alpha, state.beta, state.used


def _lanczos_tridiag_and_probes(matvec, q0, m, probe, num_probes):
    """:func:`_lanczos_tridiag`, then the quadratic forms ``z_i · A z_i`` of ``num_probes`` probe
    vectors ``z_i = probe(i)``, all in one loop of ``m + num_probes`` iterations around one
    ``matvec``: the program holds one copy of it (an HVP costs seconds of XLA compile) instead of
    one per loop. Returns ``(alpha, beta, used, forms (num_probes,))``.
    """
    def body(i, carry):
        state, forms = carry
        lanczos, j, k = i < m, jnp.minimum(i, m - 1), jnp.maximum(i - m, 0)
        z = jnp.where(lanczos, state.basis[j], probe(k))
        w = matvec(z)
        stepped = _lanczos_step(state, j, w)
        state = jax.tree_util.tree_map(lambda new, old: jnp.where(lanczos, new, old), stepped, state)
        form = jnp.dot(z, w, precision=HIGHEST)
        return state, jnp.where(lanczos, forms, forms.at[k].set(form))

    state, forms = lax.fori_loop(0, m + num_probes, body,
                                 (_lanczos_start(q0, m), jnp.zeros((num_probes,), q0.dtype)))
    return state.alpha, state.beta, state.used, forms


def _lanczos_quadrature(matvec, q0, m):
    """Nodes and weights ``(m,)`` of the m-step Lanczos quadrature rule of ``q0`` (normalised)."""
    alpha, beta, used = _lanczos_tridiag(matvec, q0, m)
    theta, s, real = _iterative._tridiag_ritz(alpha, beta, used, m)
    weights = jnp.where(real, s[0] * s[0], 0.0)
    return theta, weights / jnp.sum(weights)


def _lanczos_top(matvec, q0, m, tol):
    """Largest Ritz value after m steps and whether its residual estimate is ``<= tol · ‖A‖``."""
    return _top_ritz(*_lanczos_tridiag(matvec, q0, m), m, tol)


def _top_ritz(alpha, beta, used, m, tol):
    """:func:`_lanczos_top` from the tridiagonal of m steps."""
    theta, s, real = _iterative._tridiag_ritz(alpha, beta, used, m)
    top = jnp.argmax(jnp.where(real, theta, -jnp.inf))
    resid = jnp.abs(beta[used] * s[used, top])
    scale = jnp.max(jnp.where(real, jnp.abs(theta), 0.0))
    ok = jnp.isfinite(theta[top]) & jnp.isfinite(resid) & (resid <= tol * scale)
    return theta[top], ok


def _density_core(loss_fn, params, batch, key, *, num_probes, num_steps, grid_size, sigma,
                  grid_range):
    flat, unravel = ravel_pytree(params)
    acc = _checks.accum_dtype(flat.dtype)

    def matvec(v):
        hv = _hessian.hvp(loss_fn, params, batch, unravel(v.astype(flat.dtype)))
        return ravel_pytree(hv)[0].astype(acc)

    def one(i):
        q0 = jax.random.rademacher(jax.random.fold_in(key, i), flat.shape, acc)
        return _lanczos_quadrature(matvec, q0, num_steps)

    nodes, weights = lax.map(one, jnp.arange(num_probes, dtype=jnp.int32))
    return _broaden(nodes, weights, grid_size=grid_size, sigma=sigma, grid_range=grid_range)


def _broaden(nodes, weights, *, grid_size, sigma, grid_range):
    used = weights > 0
    lo_n = jnp.min(jnp.where(used, nodes, jnp.inf))
    hi_n = jnp.max(jnp.where(used, nodes, -jnp.inf))
    spread = hi_n - lo_n
    spread = jnp.where(spread > 0, spread, jnp.maximum(jnp.abs(hi_n), 1.0))
    width = 0.01 * spread if sigma is None else jnp.asarray(sigma, nodes.dtype)
    if grid_range is None:
        lo, hi = lo_n - 4.0 * width, hi_n + 4.0 * width
    else:
        lo, hi = (jnp.asarray(x, nodes.dtype) for x in grid_range)
    grid = jnp.linspace(0.0, 1.0, grid_size, dtype=nodes.dtype) * (hi - lo) + lo
    z = (grid[:, None, None] - nodes[None]) / width
    gauss = jnp.exp(-0.5 * z * z) / (width * jnp.sqrt(2.0 * jnp.pi).astype(nodes.dtype))
    density = jnp.sum(gauss * weights[None], axis=(1, 2)) / nodes.shape[0]
    return HessianDensity(grid, density, nodes, weights, width)
