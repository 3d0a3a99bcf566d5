"""Symmetric linear operators over pytrees, and the eager input checks shared by the spectral tools.

An operator is either an explicit square matrix ``(n, n)`` or a function ``matvec(v) -> A v`` over a
pytree ``v``. Both are reduced to a function on flat vectors so the iterative solvers only ever see
``(n,)`` and ``(k, n)`` arrays; the pytree structure is restored on the way out.

Value checks (symmetry, finiteness) can only run on concrete arrays. They raise eagerly and are
skipped under ``jit``, where the solvers' ``converged`` flag reports non-finite input instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxla import _checks

HIGHEST = jax.lax.Precision.HIGHEST


def concrete(x: Any) -> np.ndarray | None:
    """``x`` as a NumPy array when its values are known, ``None`` when traced under a transform."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check_finite(x: jax.Array, name: str) -> None:
    """Raises ValueError if a concrete ``x`` holds NaN or inf; a no-op under tracing."""
    values = concrete(x)
    if values is not None and not np.all(np.isfinite(values)):
        bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
        raise ValueError(
            f"{name} contains {bad} NaN or inf value(s) (shape {tuple(x.shape)}); spectral "
            "quantities of non-finite input are undefined"
        )


def check_matrix(w: Any, name: str, *, batched: bool = False) -> jax.Array:
    """Converts ``w`` to a floating array of rank 2 (>= 2 when ``batched``) with finite values."""
    w = _checks.as_array(w, name)
    _checks.check_floating(w, name)
    if batched:
        _checks.check_min_rank(w, name, 2, "(..., m, n)")
    else:
        _checks.check_rank(w, name, 2, "(m, n)")
    if 0 in w.shape:
        raise ValueError(f"{name} must not be empty, got shape {tuple(w.shape)}")
    check_finite(w, name)
    return w


def check_k(k: Any, dim: int, name: str = "k", what: str = "the operator dimension") -> int:
    """Returns ``k`` as an int in ``[1, dim]``."""
    k = _checks.check_positive_int(k, name)
    if k > dim:
        raise ValueError(f"{name}={k} is larger than {what} ({dim})")
    return k


@dataclass(frozen=True)
class FlatOperator:
    """A symmetric operator on flat vectors, with maps to and from the caller's pytree layout."""

    matvec: Callable[[jax.Array], jax.Array]
    dim: int
    dtype: Any
    unravel: Callable[[jax.Array], Any]
    matrix: jax.Array | None = None

    @property
    def is_matrix(self) -> bool:
        return self.matrix is not None

    def matmat(self, vs: jax.Array) -> jax.Array:
        """Applies the operator to each row of ``vs`` ``(k, n)``."""
        return jax.vmap(self.matvec)(vs)

    def unravel_rows(self, vs: jax.Array) -> Any:
        """Rows ``(k, n)`` in the caller's layout: an array, or a pytree with leading ``k`` axes."""
        if self.is_matrix:
            return vs
        return jax.vmap(self.unravel)(vs)


def make_operator(op: Any, like: Any, *, name: str = "op", check_symmetric: bool = True):
    """Builds a :class:`FlatOperator` from a square symmetric matrix or a matvec function.

    Args:
      op: a symmetric ``(n, n)`` floating matrix, or a function mapping a pytree like ``like`` to a
        pytree of the same structure.
      like: an example vector (pytree) fixing the structure, shapes and dtype; required for
        functions, ignored for matrices.
      name: the argument name used in error messages.
      check_symmetric: whether to check a concrete matrix for symmetry.

    Returns:
      The flat operator.
    """
    if callable(op) and not isinstance(op, jax.Array | np.ndarray):
        if like is None:
            raise ValueError(
                f"{name} is a function, so `like` (an example vector pytree) or `v0` is needed "
                "to know the shape of the vectors it acts on"
            )
        flat_like, unravel = ravel_pytree(like)
        if flat_like.size == 0:
            raise ValueError(f"`like` has no elements; the operator {name} acts on an empty space")
        if not jnp.issubdtype(flat_like.dtype, jnp.floating):
            raise TypeError(f"`like` must hold floating arrays, got dtype {flat_like.dtype}")
        dtype = _checks.accum_dtype(flat_like.dtype)
        out_struct = jax.eval_shape(op, like)
        in_def = jax.tree_util.tree_structure(like)
        out_def = jax.tree_util.tree_structure(out_struct)
        in_shapes = [tuple(x.shape) for x in jax.tree_util.tree_leaves(like)]
        out_shapes = [tuple(x.shape) for x in jax.tree_util.tree_leaves(out_struct)]
        if in_def != out_def or in_shapes != out_shapes:
            raise ValueError(
                f"{name} must map a vector to a vector of the same structure and shapes (a square "
                f"operator); it maps {in_shapes} to {out_shapes}"
            )

        def matvec(v: jax.Array) -> jax.Array:
            out, _ = ravel_pytree(op(unravel(v.astype(flat_like.dtype))))
            return out.astype(dtype)

        return FlatOperator(matvec, int(flat_like.size), dtype, unravel)

    a = check_matrix(op, name)
    if a.shape[0] != a.shape[1]:
        raise ValueError(
            f"{name} must be a square symmetric matrix (n, n) for an eigenvalue problem, got "
            f"shape {tuple(a.shape)}; use randomized_svd or the singular value tools for "
            "rectangular matrices"
        )
    values = concrete(a) if check_symmetric else None
    if values is not None:
        values = values.astype(np.float64)
        asym = float(np.max(np.abs(values - values.T)))
        scale = float(np.max(np.abs(values)))
        if asym > 1e3 * np.finfo(np.dtype(a.dtype)).eps * max(scale, 1e-30) * a.shape[0] ** 0.5:
            raise ValueError(
                f"{name} must be symmetric (these solvers assume A = Aᵀ), but max |A - Aᵀ| = "
                f"{asym:.3g} for max |A| = {scale:.3g}; use (A + A.T) / 2 or an SVD tool for "
                "non-symmetric input"
            )
    return dense_operator(a)


def dense_operator(a: jax.Array) -> FlatOperator:
    """The operator of a square matrix, without value checks (usable on traced arrays)."""
    dtype = _checks.accum_dtype(a.dtype)
    a = a.astype(dtype)

    def matvec(v: jax.Array) -> jax.Array:
        return jnp.matmul(a, v, precision=HIGHEST)

    return FlatOperator(matvec, int(a.shape[0]), dtype, lambda v: v, a)


def start_block(fop: FlatOperator, k: int, *, key: Any, v0: Any, name: str = "v0") -> jax.Array:
    """The ``(k, n)`` start block: ``v0`` (a vector or ``k`` stacked vectors) or Gaussian rows."""
    if v0 is not None:
        if fop.is_matrix:
            v = _checks.as_array(v0, name)
            v = v.reshape(1, -1) if v.ndim == 1 else v
        else:
            leaves = jax.tree_util.tree_leaves(v0)
            like_leaves = jax.tree_util.tree_leaves(fop.unravel(jnp.zeros((fop.dim,), fop.dtype)))
            stacked = bool(leaves) and leaves[0].ndim == like_leaves[0].ndim + 1
            flat = jax.vmap(lambda t: ravel_pytree(t)[0]) if stacked else None
            v = flat(v0) if stacked else ravel_pytree(v0)[0].reshape(1, -1)
        if v.shape[-1] != fop.dim or v.shape[0] not in (1, k):
            raise ValueError(
                f"{name} must hold one start vector or k={k} of them, each with {fop.dim} "
                f"elements; got {v.shape[0]} vector(s) of {v.shape[-1]} elements"
            )
        check_finite(v, name)
        v = v.astype(fop.dtype)
        if v.shape[0] < k:
            if key is None:
                raise ValueError(f"{name} holds one vector but k={k}; pass `key` for the other k-1")
            extra = jax.random.normal(key, (k - 1, fop.dim), fop.dtype)
            v = jnp.concatenate([v, extra], axis=0)
        return v
    if key is None:
        raise ValueError("pass `key` (a jax.random key) or a start vector `v0`")
    return jax.random.normal(key, (k, fop.dim), fop.dtype)
