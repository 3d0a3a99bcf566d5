"""Using a QArray where a float kernel is expected."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxla.quant import _fused
from jaxla.quant._qarray import QArray, dequantize


def kernel(w: Any, dtype: Any) -> jax.Array:
    """``w`` as a float kernel in ``dtype``: a QArray is decoded (inside the caller's program, so no
    decoded copy outlives the call) and stop_gradient'ed — its scales are frozen, never trained;
    any other array is cast."""
    if isinstance(w, QArray):
        return jax.lax.stop_gradient(dequantize(w, dtype=dtype))
    return jnp.asarray(w).astype(dtype)


def matmul(x: jax.Array, w: Any, *, compute: Any, acc: Any, precision: Any = None) -> jax.Array:
    """``x (..., I) @ w (I, O)`` accumulated in ``acc``; ``x`` is already in ``compute``.

    A quantized kernel runs in the fused CPU kernel when :func:`jaxla.quant._fused.fused_reason`
    allows it (CPU, a supported format, at most ``MAX_FUSED_ROWS`` rows of x, not float64), which
    computes in float32 whatever ``compute`` is; otherwise it is decoded inside the program, and
    decoded again in the backward pass instead of being kept for it (no gradient to it either way).
    """
    if isinstance(w, QArray) and w.axis == -2:
        return _fused.product(x, w, compute=compute, acc=acc, precision=precision)
    return jax.lax.dot_general(x, kernel(w, compute), (((x.ndim - 1,), (0,)), ((), ())),
                               precision=precision, preferred_element_type=acc)


def tree_nbytes(tree: Any) -> int:
    """Resident bytes of every array leaf of ``tree`` (QArrays count their packed leaves)."""
    return sum(int(np.prod(np.shape(x))) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))
