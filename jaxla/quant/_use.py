"""Using a QArray where a float kernel is expected."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxla.quant._qarray import QArray, dequantize


def kernel(w: Any, dtype: Any) -> jax.Array:
    """``w`` as a float kernel in ``dtype``: a QArray is decoded (inside the caller's program, so no
    decoded copy outlives the call) and stop_gradient'ed — its scales are frozen, never trained;
    any other array is cast."""
    if isinstance(w, QArray):
        return jax.lax.stop_gradient(dequantize(w, dtype=dtype))
    return jnp.asarray(w).astype(dtype)


def tree_nbytes(tree: Any) -> int:
    """Resident bytes of every array leaf of ``tree`` (QArrays count their packed leaves)."""
    return sum(int(np.prod(np.shape(x))) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))
