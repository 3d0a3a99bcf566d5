"""Curvature without forming matrices: Hessian eigenvalues, edge-of-stability check, Jacobian SVD.

Dimension legend used in the docstrings:
  P   number of scalar parameters in the ``params`` pytree
  D   number of scalars in the input ``x`` of a function, E in its output
  k   number of eigenvalues / singular values requested

The Hessian is only touched through Hessian-vector products computed forward-over-reverse (``jvp``
of ``grad``), which cost about two gradient evaluations and O(P) memory. Gradient descent with step
size η is unstable along directions with curvature above 2/η (the "edge of stability", Cohen et al.
2021), so :func:`sharpness` compares λ_max(H) with 2/η.

Compilation is the caller's: these functions take the user's ``loss_fn``/``fn`` as an ordinary
argument and compose under the caller's ``jax.jit`` (as optax and equinox leave ``jit`` to the
caller). They keep no jit cache keyed on the callable, so a fresh lambda per call neither grows a
library cache nor stays alive in one. Eagerly, each call compiles one program for itself (with
params and batch as its arguments) and keeps nothing; to compile once for many calls, jit the call
site::

    top = jax.jit(lambda p, b, k: spectral.hessian_top_eigenvalues(loss_fn, p, b, key=k))
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxla import _checks
from jaxla.spectral import _iterative

__all__ = [
    "JacobianSVDResult",
    "SharpnessResult",
    "hessian_top_eigenvalues",
    "hvp",
    "jacobian_singular_values",
    "sharpness",
    "sharpness_callback",
]


def _check_loss(loss_fn: Callable, params: Any, batch: Any) -> None:
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(params, batch), got {type(loss_fn)}")
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves:
        raise ValueError("params has no array leaves; there is no Hessian to analyse")
    for leaf in leaves:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(
                "every params leaf must be floating to differentiate, got dtype "
                f"{jnp.result_type(leaf)}"
            )
    out = jax.eval_shape(loss_fn, params, batch)
    if not hasattr(out, "shape") or out.shape != () or not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(
            "loss_fn(params, batch) must return a floating scalar, got "
            f"{getattr(out, 'shape', type(out))} {getattr(out, 'dtype', '')}"
        )


def hvp(loss_fn: Callable, params: Any, batch: Any, v: Any) -> Any:
    """Hessian-vector product ``H v`` of ``loss_fn(·, batch)`` at ``params``, forward-over-reverse.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: parameter pytree (P scalars).
      batch: data passed through unchanged (any pytree).
      v: tangent pytree with the structure, shapes and dtypes of ``params``.

    Returns:
      ``H v`` as a pytree like ``params``.
    """
    grad_fn = jax.grad(lambda p: loss_fn(p, batch))
    return jax.jvp(grad_fn, (params,), (v,))[1]


def hessian_top_eigenvalues(
    loss_fn: Callable,
    params: Any,
    batch: Any,
    *,
    k: int = 1,
    key: Any,
    method: str = "lanczos",
    num_iters: int | None = None,
    tol: float | None = None,
    which: str = "largest",
) -> _iterative.EigResult:
    """Top-``k`` eigenpairs of the Hessian of ``loss_fn(·, batch)`` via Hessian-vector products.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: parameter pytree (P scalars).
      batch: data (any pytree).
      k: number of eigenpairs, ``1 <= k <= P``.
      key: PRNG key for the random start vector.
      method: ``"lanczos"`` (default; ``which`` selects the end of the spectrum) or ``"power"``
        (block power iteration: eigenvalues of largest magnitude; ``which`` must stay default).
      num_iters: Lanczos steps (default ``min(P, max(2k + 20, 30))``) or power rounds (default 100).
      tol: relative residual tolerance (see :func:`jaxla.spectral.lanczos`).
      which: ``"largest"`` (sharpness), ``"smallest"`` (most negative curvature) or ``"magnitude"``.

    Returns:
      :class:`jaxla.spectral.EigResult` with eigenvectors shaped like ``params`` plus a leading
      ``k`` axis, and the ``converged`` flag (``False`` for NaN losses or gradients).

    No library cache holds ``loss_fn`` (see the module docstring): call it under your own
    ``jax.jit`` to compile once; ``params``, ``batch`` and ``key`` may then be traced, the options
    must stay static.
    """
    _check_loss(loss_fn, params, batch)
    if method not in ("lanczos", "power"):
        raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
    if method == "power" and which != "largest":
        raise ValueError("method='power' finds eigenvalues of largest magnitude; use lanczos "
                         f"for which={which!r}")
    return _this_call_jit(_hessian_eigs, loss_fn, k=k, method=method, num_iters=num_iters,
                          tol=tol, which=which)(params, batch, key)


def _this_call_jit(fn: Callable, user_fn: Callable, **static: Any) -> Callable:
    """``jax.jit`` of ``fn(user_fn, *arrays, **static)``, made for one call and dropped after it.

    The arrays stay arguments of the compiled program (a closure would bake params and batch into
    it as constants); the wrapper is fresh, so no cache keyed on ``user_fn`` outlives the call; and
    under the caller's ``jax.jit`` it is inlined into the caller's program.
    """
    return jax.jit(functools.partial(fn, user_fn, **static))


def _hessian_eigs(loss_fn, params, batch, key, *, k, method, num_iters, tol, which):
    def op(v):
        return hvp(loss_fn, params, batch, v)

    if method == "lanczos":
        return _iterative.lanczos(op, k=k, key=key, like=params, num_iters=num_iters, tol=tol,
                                  which=which)
    rounds = 100 if num_iters is None else num_iters
    return _iterative.power_iteration(op, k=k, key=key, like=params, num_iters=rounds, tol=tol)


def _check_learning_rate(learning_rate: Any) -> None:
    if (isinstance(learning_rate, bool) or not isinstance(learning_rate, int | float)
            or not math.isfinite(learning_rate) or not learning_rate > 0):
        raise ValueError(f"learning_rate must be a finite number > 0, got {learning_rate!r}")


class SharpnessResult(NamedTuple):
    """Largest Hessian eigenvalue against the gradient-descent stability threshold 2/η.

    Attributes:
      sharpness: scalar λ_max(H).
      threshold: scalar 2 / learning_rate.
      ratio: scalar ``sharpness / threshold``; above 1 plain GD at this step size diverges along the
        top eigenvector (adaptive optimisers rescale this; treat it as a diagnostic there).
      unstable: scalar bool ``ratio > 1``.
      converged: scalar bool, whether the eigenvalue estimate converged.
    """

    sharpness: jax.Array
    threshold: jax.Array
    ratio: jax.Array
    unstable: jax.Array
    converged: jax.Array


def sharpness(
    loss_fn: Callable,
    params: Any,
    batch: Any,
    *,
    learning_rate: float,
    key: Any,
    num_iters: int | None = 20,
    tol: float | None = None,
) -> SharpnessResult:
    """Compares the top Hessian eigenvalue with the edge of stability 2/η.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: parameter pytree (P scalars).
      batch: data (any pytree).
      learning_rate: step size η > 0 (a Python float).
      key: PRNG key for the Lanczos start vector.
      num_iters: Lanczos steps (the top eigenvalue usually settles in 10–20).
      tol: relative residual tolerance.

    Returns:
      :class:`SharpnessResult` (scalars).
    """
    _check_learning_rate(learning_rate)
    n_params = sum(int(jnp.size(x)) for x in jax.tree_util.tree_leaves(params))
    steps = None if num_iters is None else min(num_iters, max(n_params, 1))
    res = hessian_top_eigenvalues(loss_fn, params, batch, k=1, key=key, num_iters=steps, tol=tol)
    top = res.eigenvalues[0]
    threshold = jnp.asarray(2.0 / learning_rate, top.dtype)
    ratio = top / threshold
    return SharpnessResult(top, threshold, ratio, ratio > 1.0, res.converged)


def sharpness_callback(
    loss_fn: Callable,
    *,
    learning_rate: float,
    every: int = 100,
    seed: int = 0,
    num_iters: int = 20,
) -> Callable[[int, Any, Any], SharpnessResult | None]:
    """A fine-tune loop callback ``cb(step, params, batch)`` measuring sharpness every few steps.

    The returned function is pure: it returns a :class:`SharpnessResult` on steps divisible by
    ``every`` (``None`` otherwise) and keeps no history; the loop logs or collects the results. The
    Lanczos start vector is drawn from ``fold_in(key(seed), step)`` so runs are reproducible. The
    callback owns one ``jax.jit`` of the measurement, compiled once per parameter structure and
    released with the callback (no global cache holds ``loss_fn``).

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, e.g. the LoRA loss over adapter parameters.
      learning_rate: the optimiser's step size η.
      every: measure on steps with ``step % every == 0``.
      seed: seed of the start-vector keys.
      num_iters: Lanczos steps per measurement.

    Returns:
      The callback.
    """
    every = _checks.check_positive_int(every, "every")
    _check_learning_rate(learning_rate)

    @jax.jit
    def measure(step, params, batch):
        key = jax.random.fold_in(jax.random.key(seed), step)
        return sharpness(loss_fn, params, batch, learning_rate=learning_rate, key=key,
                         num_iters=num_iters)

    def callback(step: int, params: Any, batch: Any) -> SharpnessResult | None:
        if int(step) % every:
            return None
        return measure(jnp.asarray(step, jnp.int32), params, batch)

    return callback


class JacobianSVDResult(NamedTuple):
    """Top singular triplets of a Jacobian ``J = ∂fn/∂x`` (a pytree, so it passes through ``jit``).

    Attributes:
      singular_values: ``(k,)`` descending.
      left: output-space unit vectors ``J v_i / σ_i``, shaped like ``fn(x)`` with a leading ``k``.
      right: input-space unit vectors ``v_i``, shaped like ``x`` with a leading ``k``.
      iterations: Lanczos steps on ``JᵀJ``.
      converged: whether the eigenpairs of ``JᵀJ`` converged (and everything is finite).
    """

    singular_values: jax.Array
    left: Any
    right: Any
    iterations: jax.Array
    converged: jax.Array


def jacobian_singular_values(
    fn: Callable,
    x: Any,
    *,
    k: int = 1,
    key: Any,
    num_iters: int | None = None,
    tol: float | None = None,
) -> JacobianSVDResult:
    """Largest ``k`` singular values of the Jacobian of ``fn`` at ``x``, via Lanczos on ``JᵀJ``.

    ``JᵀJ v`` is one ``jvp`` and one ``vjp``; the Jacobian (E × D) is never formed. σ_i = √λ_i(JᵀJ).
    Values well below ``σ_1 · √eps`` are not resolved (squaring the operator squares its condition
    number), so use this for the top of the spectrum, e.g. gain of a layer in signal propagation.

    Args:
      fn: a function of one pytree argument returning a pytree of floating arrays.
      x: the point (pytree, D scalars).
      k: number of singular values, ``1 <= k <= D``.
      key: PRNG key for the start vector.
      num_iters: Lanczos steps (default ``min(D, max(2k + 20, 30))``).
      tol: relative residual tolerance for the ``JᵀJ`` eigenpairs.

    Returns:
      :class:`JacobianSVDResult`.

    No library cache holds ``fn`` (see the module docstring): call it under your own ``jax.jit`` to
    compile once.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn)}")
    return _this_call_jit(_jacobian_svd, fn, k=k, num_iters=num_iters, tol=tol)(x, key)


def _jacobian_svd(fn, x, key, *, k, num_iters, tol):
    out, vjp_fn = jax.vjp(fn, x)

    def gram(v):
        jv = jax.jvp(fn, (x,), (v,))[1]
        return vjp_fn(jax.tree_util.tree_map(lambda t, o: t.astype(o.dtype), jv, out))[0]

    res = _iterative.lanczos(gram, k=k, key=key, like=x, num_iters=num_iters, tol=tol)
    sigma = jnp.sqrt(jnp.maximum(res.eigenvalues, 0.0))
    left = jax.vmap(lambda v: jax.jvp(fn, (x,), (v,))[1])(res.eigenvectors)
    inv = jnp.where(sigma > 0, 1.0 / jnp.where(sigma > 0, sigma, 1.0), 0.0)

    def scale(leaf):
        factor = inv.reshape((-1,) + (1,) * (leaf.ndim - 1)).astype(leaf.dtype)
        return leaf * factor

    left = jax.tree_util.tree_map(scale, left)
    return JacobianSVDResult(sigma, left, res.eigenvectors, res.iterations, res.converged)

