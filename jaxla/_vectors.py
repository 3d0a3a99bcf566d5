"""Vectors: dot products as projection, cosine similarity and nearest-neighbour search over embeddings.

Dimension legend used in the docstrings:
  ``...``  any leading (batch) dimensions, broadcast between arguments
  D        the vector (embedding) dimension, e.g. 768
  N        number of query vectors
  M        number of key (database) vectors
  k        number of neighbours returned

Reductions accumulate in at least float32 and the result is cast back to the inputs' dtype, so bfloat16
embeddings get float32-accurate similarities rounded once. Norms are taken of each vector divided by a
power of two near its largest entry, so no sum of squares overflows or underflows; NaN and inf inputs
give NaN (never a plausible number), and a NaN score never wins in :func:`top_k_similar`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxla import _checks, _eager

__all__ = [
    "cosine_similarity",
    "dot",
    "normalize",
    "pairwise_cosine",
    "project",
    "top_k_similar",
]


_accum_dtype = _checks.accum_dtype


def _float_pair(a: ArrayLike, b: ArrayLike, name_a: str, name_b: str, axis: int):
    a = _checks.as_array(a, name_a)
    b = _checks.as_array(b, name_b)
    _checks.check_floating(a, name_a)
    _checks.check_floating(b, name_b)
    _checks.check_min_rank(a, name_a, 1, "(..., D)")
    _checks.check_min_rank(b, name_b, 1, "(..., D)")
    for arr, name in ((a, name_a), (b, name_b)):
        _checks.check_axis(axis, arr.ndim, "axis", f"{name} with shape {tuple(arr.shape)}")
    if a.shape[axis] != b.shape[axis]:
        raise ValueError(
            f"{name_a} and {name_b} must have the same vector dimension on axis {axis}: "
            f"{name_a} has shape {tuple(a.shape)}, {name_b} has shape {tuple(b.shape)}"
        )
    try:
        shape = jnp.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ValueError(
            f"the leading dimensions of {name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} "
            "do not broadcast"
        ) from None
    # Broadcast explicitly so that callers running with jax_numpy_rank_promotion='raise' can still
    # compare one vector against a batch.
    out_dtype = _checks.promote_dtypes(a.dtype, b.dtype)
    return jnp.broadcast_to(a, shape), jnp.broadcast_to(b, shape), out_dtype


def _rescaled(x: jax.Array, axis: int, acc) -> tuple[jax.Array, jax.Array]:
    """``(x / s, s)`` with ``s`` the power of two at or below ``max |x|`` along ``axis`` (kept dims).

    Norms and cosines are scale invariant, so computing them on ``x / s`` (entries in (-2, 2)) gives
    the same result without overflowing the sum of squares (``1e30² = inf`` in float32) or
    underflowing it. A power of two makes the division exact. ``s`` is 1 for zero vectors and for
    non-finite ones (whose NaN/inf then propagates), and it is a constant for differentiation: the
    function of ``x`` does not depend on it, so its gradient is exact without differentiating ``s``.
    """
    x = x.astype(acc)
    peak = jax.lax.stop_gradient(jnp.max(jnp.abs(x), axis=axis, keepdims=True))
    _, exponent = jnp.frexp(jnp.where(jnp.isfinite(peak) & (peak > 0), peak, 1.0))
    s = jnp.ldexp(jnp.ones_like(peak), exponent - 1)
    return x / s, s


def _safe_norm_scaled(xs: jax.Array, s: jax.Array, axis: int, eps: float, acc) -> jax.Array:
    """``max(||x||, eps) / s`` for ``xs = x / s``, keeping ``axis``; finite gradient at ``x = 0``."""
    # max(||x||, eps) = s · max(||xs||, eps / s), written under the square root so that the gradient
    # at x = 0 is finite. (eps / s)² may overflow to inf for subnormal x: the norm is then treated as
    # infinite and the (negligible) cosine as 0.
    floor = jnp.asarray(eps, acc) / s
    return jnp.sqrt(jnp.maximum(jnp.sum(xs * xs, axis=axis, keepdims=True), floor * floor))


@_eager.compiled
def dot(a: ArrayLike, b: ArrayLike, *, axis: int = -1) -> jax.Array:
    """Dot product of vectors along ``axis``, with leading dimensions broadcast.

    Args:
      a: array of shape ``(..., D)`` (the vector axis is ``axis``).
      b: array of shape ``(..., D)``, broadcastable against ``a``.
      axis: the vector axis.

    Returns:
      Array of shape ``broadcast(...)`` in the promoted dtype of ``a`` and ``b``, accumulated in f32.

    Example:
      >>> jaxla.dot(jnp.array([1., 2.]), jnp.array([3., 4.]))
      Array(11., dtype=float32)
    """
    a, b, out_dtype = _float_pair(a, b, "a", "b", axis)
    acc = _accum_dtype(out_dtype)
    return jnp.sum(a.astype(acc) * b.astype(acc), axis=axis).astype(out_dtype)


@_eager.compiled
def normalize(x: ArrayLike, *, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """Scales vectors to unit L2 norm: ``x / max(||x||, eps)``; a zero vector stays zero.

    Args:
      x: array of shape ``(..., D)``.
      axis: the vector axis.
      eps: lower bound on the norm, which keeps zero vectors at zero with finite gradients.

    Returns:
      Array with the shape and dtype of ``x``.
    """
    x = _checks.as_array(x, "x")
    _checks.check_floating(x, "x")
    _checks.check_min_rank(x, "x", 1, "(..., D)")
    _checks.check_eps(eps)
    axis = _checks.check_axis(axis, x.ndim, "axis", f"x with shape {tuple(x.shape)}")
    acc = _accum_dtype(x.dtype)
    xs, s = _rescaled(x, axis, acc)
    return (xs / _safe_norm_scaled(xs, s, axis, eps, acc)).astype(x.dtype)


@_eager.compiled
def cosine_similarity(
    a: ArrayLike, b: ArrayLike, *, axis: int = -1, eps: float = 1e-8
) -> jax.Array:
    """Cosine of the angle between vectors: ``a·b / (max(||a||, eps) · max(||b||, eps))``.

    A zero vector has similarity 0 with everything (never NaN) and finite gradients; this matches
    ``torch.nn.functional.cosine_similarity``.

    Args:
      a: array of shape ``(..., D)``.
      b: array of shape ``(..., D)``, broadcastable against ``a``.
      axis: the vector axis.
      eps: lower bound on each norm.

    Returns:
      Array of shape ``broadcast(...)`` with values in [-1, 1].
    """
    a, b, out_dtype = _float_pair(a, b, "a", "b", axis)
    _checks.check_eps(eps)
    acc = _accum_dtype(out_dtype)
    a_s, sa = _rescaled(a, axis, acc)
    b_s, sb = _rescaled(b, axis, acc)
    num = jnp.sum(a_s * b_s, axis=axis)
    den = (_safe_norm_scaled(a_s, sa, axis, eps, acc)
           * _safe_norm_scaled(b_s, sb, axis, eps, acc)).squeeze(axis)
    return jnp.clip(num / den, -1.0, 1.0).astype(out_dtype)


@_eager.compiled
def project(u: ArrayLike, onto: ArrayLike, *, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """Vector projection of ``u`` onto ``onto``: ``(u·v / v·v) v``; projecting onto zero gives zero.

    This is the seed's "dot product as projection": the scalar ``u·v / ||v||`` is how far ``u`` reaches
    along ``v``, and this function returns that component as a vector.

    Args:
      u: array of shape ``(..., D)``.
      onto: array of shape ``(..., D)``, broadcastable against ``u``.
      axis: the vector axis.
      eps: lower bound on ``v·v``.

    Returns:
      Array of shape ``broadcast(u, onto)``.
    """
    u, v, out_dtype = _float_pair(u, onto, "u", "onto", axis)
    _checks.check_eps(eps)
    acc = _accum_dtype(out_dtype)
    # (u·v / max(v·v, eps)) v = (u·v̂ / max(v̂·v̂, (√eps / s)²)) v̂ for v = s v̂, without overflowing
    # v·v. The floor is squared after the division: XLA rewrites eps / s / s into eps / (s · s),
    # which is 0 / 0 = NaN under jit once s² underflows.
    v_s, s = _rescaled(v, axis, acc)
    uv = jnp.sum(u.astype(acc) * v_s, axis=axis, keepdims=True)
    root = jnp.sqrt(jnp.asarray(eps, acc)) / s
    vv = jnp.maximum(jnp.sum(v_s * v_s, axis=axis, keepdims=True), root * root)
    return (uv / vv * v_s).astype(out_dtype)


def _matrix_pair(x: ArrayLike, y: ArrayLike, name_x: str, name_y: str):
    x = _checks.as_array(x, name_x)
    y = _checks.as_array(y, name_y)
    for arr, name in ((x, name_x), (y, name_y)):
        _checks.check_floating(arr, name)
        _checks.check_min_rank(arr, name, 2, "(..., rows, D)")
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(
            f"{name_x} and {name_y} must have the same vector dimension D (last axis): "
            f"{name_x} has shape {tuple(x.shape)}, {name_y} has shape {tuple(y.shape)}"
        )
    try:
        jnp.broadcast_shapes(x.shape[:-2], y.shape[:-2])
    except ValueError:
        raise ValueError(
            f"the batch dimensions of {name_x} {tuple(x.shape)} and {name_y} {tuple(y.shape)} "
            "do not broadcast"
        ) from None
    return x, y, _checks.promote_dtypes(x.dtype, y.dtype)


def _scores(x: jax.Array, y: jax.Array, acc, *, cosine: bool, eps: float) -> jax.Array:
    _checks.check_eps(eps)
    x = x.astype(acc)
    y = y.astype(acc)
    if cosine:
        xs, sx = _rescaled(x, -1, acc)
        ys, sy = _rescaled(y, -1, acc)
        x = xs / _safe_norm_scaled(xs, sx, -1, eps, acc)
        y = ys / _safe_norm_scaled(ys, sy, -1, eps, acc)
    batch = jnp.broadcast_shapes(x.shape[:-2], y.shape[:-2])
    x = jnp.broadcast_to(x, batch + x.shape[-2:])
    y = jnp.broadcast_to(y, batch + y.shape[-2:])
    scores = jnp.einsum("...nd,...md->...nm", x, y, precision=jax.lax.Precision.HIGHEST)
    return jnp.clip(scores, -1.0, 1.0) if cosine else scores


def _rank_key(scores: jax.Array) -> jax.Array:
    """Integers ordered like ``scores`` with every NaN below ``-inf`` (``lax.top_k`` ranks NaN first).

    A float's bits read as a signed integer are ordered like the float for non-negative values and
    reversed for negative ones; flipping the non-sign bits of negatives makes the order total and
    monotone. ``-0.0`` is folded into ``+0.0`` first so that the two still tie.
    """
    int_dtype = jnp.int64 if scores.dtype == jnp.float64 else jnp.int32
    # A where, not `scores + 0.0`, which an algebraic simplifier may drop.
    positive_zero = jnp.where(scores == 0, jnp.zeros((), scores.dtype), scores)
    bits = jax.lax.bitcast_convert_type(positive_zero, int_dtype)
    info = jnp.iinfo(int_dtype)
    ordered = jnp.where(bits < 0, bits ^ jnp.asarray(info.max, int_dtype), bits)
    return jnp.where(jnp.isnan(scores), jnp.asarray(info.min, int_dtype), ordered)


@_eager.compiled
def pairwise_cosine(x: ArrayLike, y: ArrayLike, *, eps: float = 1e-8) -> jax.Array:
    """All-pairs cosine similarity between two sets of vectors.

    Args:
      x: array of shape ``(..., N, D)``.
      y: array of shape ``(..., M, D)``; leading dimensions broadcast against ``x``'s.
      eps: lower bound on each norm; zero vectors give similarity 0.

    Returns:
      Array of shape ``(..., N, M)``; entry ``[i, j]`` is ``cosine_similarity(x[i], y[j])``.
    """
    x, y, out_dtype = _matrix_pair(x, y, "x", "y")
    return _scores(x, y, _accum_dtype(out_dtype), cosine=True, eps=eps).astype(out_dtype)


@_eager.compiled
def top_k_similar(
    queries: ArrayLike,
    keys: ArrayLike,
    k: int,
    *,
    metric: str = "cosine",
    eps: float = 1e-8,
) -> tuple[jax.Array, jax.Array]:
    """Nearest neighbours among embeddings: the ``k`` keys most similar to each query.

    Args:
      queries: array of shape ``(..., N, D)``, or ``(D,)`` for a single query.
      keys: array of shape ``(..., M, D)``; leading dimensions broadcast against ``queries``'s.
      k: number of neighbours, ``1 <= k <= M`` (static).
      metric: ``"cosine"`` (default) or ``"dot"`` (inner product, e.g. for normalised embeddings).
      eps: lower bound on each norm for the cosine metric.

    Returns:
      ``(scores, indices)``, each of shape ``(..., N, k)`` (``(k,)`` for a single query), sorted by
      decreasing score; ``indices`` are int32 positions along keys' M axis. Ties keep the lower index.

    NaN: a NaN score never outranks a number. Keys whose score is NaN (a key holding NaN, or inf
    with the cosine metric) come after every other key, even ``-inf`` dot products, in index order,
    and their returned score stays NaN. A query holding NaN scores NaN against every key, so it gets
    NaN scores and the indices ``0 … k-1``.
    """
    q = _checks.as_array(queries, "queries")
    single = q.ndim == 1
    if single:
        q = q[None, :]
    q, keys_arr, out_dtype = _matrix_pair(q, keys, "queries", "keys")
    if metric not in ("cosine", "dot"):
        raise ValueError(f"metric must be 'cosine' or 'dot', got {metric!r}")
    k = _checks.check_positive_int(k, "k")
    num_keys = keys_arr.shape[-2]
    if k > num_keys:
        raise ValueError(f"k={k} is larger than the number of keys M={num_keys} (keys shape "
                         f"{tuple(keys_arr.shape)})")
    scores = _scores(q, keys_arr, _accum_dtype(out_dtype), cosine=metric == "cosine", eps=eps)
    _, top_idx = jax.lax.top_k(_rank_key(scores), k)
    top_scores = jnp.take_along_axis(scores, top_idx, axis=-1).astype(out_dtype)
    top_idx = top_idx.astype(jnp.int32)
    if single:
        return top_scores[0], top_idx[0]
    return top_scores, top_idx
