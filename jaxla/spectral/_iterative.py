"""Matrix-free symmetric eigensolvers: block power iteration, Lanczos with full reorthogonalisation.

Dimension legend used in the docstrings:
  n   the operator dimension (number of scalars in a vector pytree)
  k   the number of eigenpairs requested
  m   the Krylov subspace size (Lanczos steps)

Both solvers run as one ``lax.while_loop`` (no Python loop per step), so they trace once and can be
wrapped in ``jax.jit``. The operator is a symmetric ``(n, n)`` matrix or a matvec function over
pytrees (e.g. a Hessian-vector product). Every result carries the true residual norms
``‖A v − λ v‖`` and a ``converged`` flag that is ``False`` whenever the residuals exceed
``tol · ‖A‖`` or anything was non-finite, so NaN input under ``jit`` gives a flagged result
rather than a silently wrong one. Eagerly, non-finite or non-symmetric matrices raise
``ValueError``.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxla import _checks
from jaxla.spectral import _operator
from jaxla.spectral._operator import HIGHEST

__all__ = ["EigResult", "lanczos", "power_iteration"]

_WHICH = ("largest", "smallest", "magnitude")


class EigResult(NamedTuple):
    """Eigenpairs from an iterative solver (a pytree, so it passes through ``jit``).

    Attributes:
      eigenvalues: ``(k,)`` in the solver's order (see ``which``), in the accumulation dtype.
      eigenvectors: unit eigenvectors; ``(k, n)`` rows for a matrix operator, else a pytree shaped
        like the vectors with a leading ``k`` axis (``eigenvectors[i]`` is the i-th vector either
        way).
      residuals: ``(k,)`` true residual norms ``‖A v_i − λ_i v_i‖``.
      iterations: scalar int32, the matvec rounds (power) or Krylov steps (Lanczos) used.
      converged: scalar bool, all residuals ``<= tol · ‖A‖`` (``‖A‖`` estimated by the largest
        magnitude Ritz value) and everything finite.
    """

    eigenvalues: jax.Array
    eigenvectors: Any
    residuals: jax.Array
    iterations: jax.Array
    converged: jax.Array


def default_tol(dtype) -> float:
    """Relative residual tolerance the dtype can reach: 1e-4 for float32, 1e-8 for float64."""
    return 1e-8 if jnp.dtype(dtype) == jnp.float64 else 1e-4


def _orthonormal_rows(v: jax.Array) -> jax.Array:
    q, _ = jnp.linalg.qr(v.T)
    return q.T


def _row_norms(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(x * x, axis=-1))


def _check_tol(tol: Any, dtype) -> float:
    tol = default_tol(dtype) if tol is None else float(tol)
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    return tol


def _finish(fop, values, vectors, tol, iterations, ok):
    """True residuals with one more block matvec, and the converged flag."""
    vectors = vectors / jnp.maximum(_row_norms(vectors), jnp.finfo(fop.dtype).tiny)[:, None]
    residuals = _row_norms(fop.matmat(vectors) - values[:, None] * vectors)
    scale = jnp.max(jnp.abs(values))
    finite = jnp.all(jnp.isfinite(values)) & jnp.all(jnp.isfinite(residuals))
    converged = ok & finite & jnp.all(residuals <= tol * scale)
    return EigResult(values, fop.unravel_rows(vectors), residuals, iterations, converged)


def _jit_once(core, fop, **static):
    """A jit of ``core`` bound to a function operator, made for one call and dropped after it.

    Under the caller's ``jax.jit`` it is inlined into the caller's program. Eagerly it compiles the
    loop once for this call. Being a fresh function, it sits in no cache keyed on the user's
    callable, so neither the callable nor the arrays it closes over outlive the call (running the
    ``while_loop`` eagerly instead would cache its body, constants included, by primitive).
    """
    return jax.jit(functools.partial(core, fop, **static))


def power_iteration(
    op: Any,
    *,
    k: int = 1,
    key: Any = None,
    v0: Any = None,
    like: Any = None,
    num_iters: int = 100,
    tol: float | None = None,
) -> EigResult:
    """Top-``k`` eigenpairs by magnitude via block power (subspace) iteration with Rayleigh–Ritz.

    Each round applies the operator to an orthonormal block of ``k`` vectors, diagonalises the
    projected ``k × k`` matrix and stops once every Ritz pair has residual ``<= tol · |λ_1|``. The
    convergence rate is ``|λ_{k+1} / λ_k|`` per round; prefer :func:`lanczos` for clustered spectra.

    Args:
      op: a symmetric ``(n, n)`` matrix or a function ``v -> A v`` over pytrees.
      k: number of eigenpairs, ``1 <= k <= n``.
      key: PRNG key for a Gaussian start block (needed unless ``v0`` gives all ``k`` vectors).
      v0: optional start vector(s): ``(n,)``/``(k, n)`` for matrices, a pytree (optionally with a
        leading ``k`` axis) for functions.
      like: example vector pytree for function operators (defaults to ``v0``).
      num_iters: maximum number of rounds (each costs ``k`` matvecs).
      tol: relative residual tolerance; ``None`` picks 1e-4 (float32) or 1e-8 (float64).

    Returns:
      :class:`EigResult` with eigenvalues ordered by decreasing ``|λ|``.
    """
    fop = _operator.make_operator(op, v0 if like is None else like)
    k = _operator.check_k(k, fop.dim)
    num_iters = _checks.check_positive_int(num_iters, "num_iters")
    tol = _check_tol(tol, fop.dtype)
    v0_block = _operator.start_block(fop, k, key=key, v0=v0)
    # Iteration count and tolerance are traced, so one compiled program serves every setting.
    limits = (jnp.asarray(num_iters, jnp.int32), jnp.asarray(tol, fop.dtype))
    if fop.is_matrix:
        return _power_dense(fop.matrix, v0_block, *limits)
    return _jit_once(_power_core, fop)(v0_block, *limits)


def _power_core(fop, v, num_iters, tol):
    k = v.shape[0]
    v = _orthonormal_rows(v)

    def ritz(v):
        w = fop.matmat(v)
        h = jnp.matmul(v, w.T, precision=HIGHEST)
        theta, s = jnp.linalg.eigh(0.5 * (h + h.T))
        order = jnp.argsort(-jnp.abs(theta))
        theta, s = theta[order], s[:, order]
        vr = jnp.matmul(s.T, v, precision=HIGHEST)
        wr = jnp.matmul(s.T, w, precision=HIGHEST)
        res = _row_norms(wr - theta[:, None] * vr)
        finite = jnp.all(jnp.isfinite(theta)) & jnp.all(jnp.isfinite(res))
        done = jnp.all(res <= tol * jnp.max(jnp.abs(theta))) | ~finite
        return theta, vr, _orthonormal_rows(wr), done

    def cond(state):
        i, _, _, _, done = state
        return (i < num_iters) & ~done

    def body(state):
        i, _, _, v_next, _ = state
        theta, vr, v_next, done = ritz(v_next)
        return i + 1, theta, vr, v_next, done

    init = (jnp.int32(0), jnp.zeros((k,), fop.dtype), v, v, jnp.bool_(False))
    iters, theta, vr, _, done = lax.while_loop(cond, body, init)
    return _finish(fop, theta, vr, tol, iters, done)


@jax.jit
def _power_dense(a, v, num_iters, tol):
    # One compiled program per shape and option set, reused across calls on explicit matrices.
    return _power_core(_operator.dense_operator(a), v, num_iters, tol)


def _tridiag_ritz(alpha, beta, j, m):
    """Eigenpairs of the leading ``(j+1) × (j+1)`` block of the ``m × m`` Lanczos matrix.

    The unused trailing block gets a diagonal sentinel strictly below the Gershgorin interval of the
    used block, so ``eigh`` of the fixed-size matrix decouples the two; ``real`` marks the Ritz
    pairs of the used block (their eigenvectors live on its rows).
    """
    idx = jnp.arange(m, dtype=jnp.int32)
    used = idx <= j
    coupling = jnp.where(idx < j, jnp.abs(beta), 0.0)
    left = jnp.concatenate([jnp.zeros((1,), beta.dtype), coupling[:-1]])
    radius = coupling + left
    lo = jnp.min(jnp.where(used, alpha - radius, jnp.inf))
    hi = jnp.max(jnp.where(used, alpha + radius, -jnp.inf))
    sentinel = lo - (hi - lo) - 1.0
    diag = jnp.where(used, alpha, sentinel)
    off = jnp.where(idx[:-1] < j, beta[:-1], 0.0)
    t = jnp.diag(diag) + jnp.diag(off, 1) + jnp.diag(off, -1)
    theta, s = jnp.linalg.eigh(t)
    mass = jnp.sum(jnp.where(used[:, None], s * s, 0.0), axis=0)
    return theta, s, mass > 0.5


def _select(theta, real, which_id, k):
    """Indices of the ``k`` wanted Ritz values; ``which_id`` indexes ``_WHICH`` (may be traced)."""
    score = jnp.where(which_id == 0, theta, jnp.where(which_id == 1, -theta, jnp.abs(theta)))
    score = jnp.where(real, score, -jnp.inf)
    _, top = lax.top_k(score, k)
    return top


def lanczos(
    op: Any,
    *,
    k: int = 1,
    key: Any = None,
    v0: Any = None,
    like: Any = None,
    num_iters: int | None = None,
    tol: float | None = None,
    which: str = "largest",
) -> EigResult:
    """Extreme eigenpairs of a symmetric operator by Lanczos with full reorthogonalisation.

    Builds an orthonormal Krylov basis ``Q`` (``m × n``, each new vector orthogonalised twice
    against all previous ones so no spurious copies of converged eigenvalues appear) and the
    tridiagonal ``T = Q A Qᵀ``. After every step the Ritz pairs of ``T`` are checked; the loop stops
    when the wanted ``k`` have residual estimates ``β_j |s_{j,i}| <= tol · ‖A‖``, when an invariant
    subspace is found (``β_j ≈ 0``: the Ritz values are then exact), or after ``num_iters`` steps.
    Memory is ``(m + 1) · n`` scalars for the basis.

    Args:
      op: a symmetric ``(n, n)`` matrix or a function ``v -> A v`` over pytrees.
      k: number of eigenpairs, ``1 <= k <= num_iters <= n``.
      key: PRNG key for a Gaussian start vector (unless ``v0`` is given).
      v0: optional start vector: ``(n,)`` for matrices, a pytree like the vectors for functions.
      like: example vector pytree for function operators (defaults to ``v0``).
      num_iters: Krylov steps ``m``; default ``min(n, max(2k + 20, 30))``.
      tol: relative residual tolerance; ``None`` picks 1e-4 (float32) or 1e-8 (float64).
      which: ``"largest"`` (algebraic, e.g. Hessian sharpness), ``"smallest"`` or ``"magnitude"``.

    Returns:
      :class:`EigResult`, eigenvalues in ``which`` order (largest first, smallest first, or by
      decreasing magnitude).
    """
    if which not in _WHICH:
        raise ValueError(f"which must be one of {_WHICH}, got {which!r}")
    fop = _operator.make_operator(op, v0 if like is None else like)
    k = _operator.check_k(k, fop.dim)
    m = min(fop.dim, max(2 * k + 20, 30)) if num_iters is None else num_iters
    m = _checks.check_positive_int(m, "num_iters")
    if m < k or m > fop.dim:
        raise ValueError(
            f"num_iters={m} must be between k={k} and the operator dimension n={fop.dim} "
            "(Lanczos can build at most n orthogonal vectors)"
        )
    tol = _check_tol(tol, fop.dtype)
    q0 = _operator.start_block(fop, 1, key=key, v0=v0)[0]
    # Only k and m fix shapes; tolerance and `which` are traced so compiled programs are shared.
    opts = (jnp.asarray(tol, fop.dtype), jnp.asarray(_WHICH.index(which), jnp.int32))
    if fop.is_matrix:
        return _lanczos_dense(fop.matrix, q0, *opts, k=k, m=m)
    return _jit_once(_lanczos_core, fop, k=k, m=m)(q0, *opts)


@functools.partial(jax.jit, static_argnames=("k", "m"))
def _lanczos_dense(a, q0, tol, which_id, *, k, m):
    return _lanczos_core(_operator.dense_operator(a), q0, tol, which_id, k=k, m=m)


def _lanczos_core(fop, q0, tol, which_id, *, k, m):
    q0 = q0 / jnp.linalg.norm(q0)
    eps = jnp.finfo(fop.dtype).eps
    basis = jnp.zeros((m + 1, fop.dim), fop.dtype).at[0].set(q0)
    zeros = jnp.zeros((m,), fop.dtype)

    def cond(state):
        *_, done = state
        return ~done

    def body(state):
        j, basis, alpha, beta, anorm, _ = state
        q = basis[j]
        w = fop.matvec(q)
        a = jnp.dot(q, w, precision=HIGHEST)
        # Classical Gram–Schmidt against the whole basis, twice ("twice is enough"); the rows
        # past j are still zero.
        for _ in range(2):
            w = w - jnp.matmul(jnp.matmul(basis, w, precision=HIGHEST), basis, precision=HIGHEST)
        b = jnp.linalg.norm(w)
        alpha, beta = alpha.at[j].set(a), beta.at[j].set(b)
        anorm = jnp.maximum(anorm, jnp.abs(a) + b)
        breakdown = b <= 100.0 * eps * anorm
        basis = basis.at[j + 1].set(jnp.where(breakdown, 0.0, w / jnp.where(breakdown, 1.0, b)))
        theta, s, real = _tridiag_ritz(alpha, beta, j, m)
        top = _select(theta, real, which_id, k)
        est = b * jnp.abs(s[j, top])
        scale = jnp.max(jnp.where(real, jnp.abs(theta), 0.0))
        conv = (j + 1 >= k) & jnp.all(est <= tol * scale)
        finite = jnp.isfinite(a) & jnp.isfinite(b)
        done = breakdown | conv | (j + 1 >= m) | ~finite
        return j + 1, basis, alpha, beta, anorm, done

    init = (jnp.int32(0), basis, zeros, zeros, jnp.zeros((), fop.dtype), jnp.bool_(False))
    steps, basis, alpha, beta, _, _ = lax.while_loop(cond, body, init)
    theta, s, real = _tridiag_ritz(alpha, beta, steps - 1, m)
    top = _select(theta, real, which_id, k)
    vectors = jnp.matmul(s[:, top].T, basis[:m], precision=HIGHEST)
    enough = jnp.all(real[top])
    return _finish(fop, theta[top], vectors, tol, steps, enough)
