"""Trace-time argument checks shared by every public function.

All checks read only static information (shapes, dtypes), so they run once while tracing and cost
nothing inside `jit`. Shape checks go through chex with ``exception_type=ValueError`` and a message that
names the argument; dtype checks raise ``TypeError``.
"""

from __future__ import annotations

from collections.abc import Iterable

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike


def as_array(x: ArrayLike, name: str) -> jax.Array:
    """Converts ``x`` to a JAX array, with an error that names the argument on failure."""
    if isinstance(x, jax.Array):
        return x
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be an array-like of numbers, got {type(x).__name__}: {e}") from e


def check_floating(x: jax.Array, name: str) -> None:
    """Raises TypeError unless ``x`` has a floating dtype."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), "
            f"got {x.dtype} with shape {tuple(x.shape)}"
        )


def check_floating_dtype(dtype: object, name: str) -> jnp.dtype:
    """Returns ``dtype`` as a NumPy dtype, raising TypeError unless it is a floating dtype."""
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name} must be a floating dtype, got {dtype!r}") from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(
            f"{name} must be a floating dtype (float16, bfloat16, float32 or float64), got {dt}: "
            "an integer or complex compute dtype would truncate or wrap the results"
        )
    return dt


def check_eps(eps: object, name: str = "eps") -> None:
    """Raises unless a Python/NumPy number ``eps`` is finite and >= 0 (traced values pass through).

    A NaN or negative floor would turn every result into NaN (or a wrong sign) without an error.
    """
    if isinstance(eps, bool) or (not isinstance(eps, int | float | np.number)
                                 and not isinstance(eps, jax.Array)):
        raise TypeError(f"{name} must be a number, got {type(eps).__name__} {eps!r}")
    if isinstance(eps, jax.Array):
        return
    if not np.isfinite(eps) or eps < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {eps}")


def check_axis(axis: object, ndim: int, name: str = "axis", what: str = "") -> int:
    """Returns ``axis`` normalised to ``[0, ndim)``, raising ValueError if it is out of range."""
    if isinstance(axis, bool) or not isinstance(axis, int | np.integer):
        raise TypeError(f"{name} must be an int, got {type(axis).__name__} {axis!r}")
    if not -ndim <= axis < ndim:
        of = f" of {what}" if what else ""
        raise ValueError(f"{name}={axis} is out of range for rank {ndim}{of} "
                         f"(valid: {-ndim} to {ndim - 1})")
    return int(axis) % ndim


def check_integer(x: jax.Array, name: str) -> None:
    """Raises TypeError unless ``x`` has an integer dtype."""
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must have an integer dtype, got {x.dtype} with shape {tuple(x.shape)}")


def check_rank(x: jax.Array, name: str, ranks: int | Iterable[int], what: str = "") -> None:
    """Raises ValueError unless ``x.ndim`` is one of ``ranks``; ``what`` describes the layout."""
    expected = {ranks} if isinstance(ranks, int) else set(ranks)
    layout = f" ({what})" if what else ""
    chex.assert_rank(
        x,
        expected,
        custom_message=f"{name} must have rank {_fmt_set(expected)}{layout}, got shape {tuple(x.shape)}",
        include_default_message=False,
        exception_type=ValueError,
    )


def check_min_rank(x: jax.Array, name: str, min_rank: int, what: str = "") -> None:
    """Raises ValueError unless ``x.ndim >= min_rank``."""
    if x.ndim < min_rank:
        layout = f" ({what})" if what else ""
        raise ValueError(
            f"{name} must have rank >= {min_rank}{layout}, got shape {tuple(x.shape)}"
        )


def check_axis_size(x: jax.Array, name: str, axis: int, size: int, reason: str) -> None:
    """Raises ValueError unless ``x.shape[axis] == size``; ``reason`` says where ``size`` comes from."""
    chex.assert_axis_dimension(
        x,
        axis,
        size,
        custom_message=(
            f"{name} has size {x.shape[axis]} on axis {axis} (shape {tuple(x.shape)}) "
            f"but {size} was expected: {reason}"
        ),
        include_default_message=False,
        exception_type=ValueError,
    )


def check_broadcastable(shape_a: tuple[int, ...], name: str, shape_b: tuple[int, ...], what: str):
    """Raises ValueError unless ``shape_a`` broadcasts against ``shape_b``."""
    try:
        np.broadcast_shapes(tuple(shape_a), tuple(shape_b))
    except ValueError:
        raise ValueError(
            f"{name} with shape {tuple(shape_a)} does not broadcast against {what} {tuple(shape_b)}"
        ) from None


def check_positive_int(value: object, name: str, *, allow_zero: bool = False) -> int:
    """Returns ``value`` as an int, raising ValueError/TypeError unless it is a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return int(value)


def _fmt_set(values: set[int]) -> str:
    items = sorted(values)
    if len(items) == 1:
        return str(items[0])
    return " or ".join(str(v) for v in items)


def promote_dtypes(*dtypes) -> jnp.dtype:
    """JAX's standard promotion of floating dtypes, also when the user runs with strict promotion.

    jaxla chooses compute dtypes explicitly (e.g. bfloat16 parameters with float32 inputs compute in
    float32), so its own choice must not depend on the caller's ``jax_numpy_dtype_promotion`` setting.
    """
    with jax.numpy_dtype_promotion("standard"):
        out = jnp.dtype(dtypes[0])
        for d in dtypes[1:]:
            out = jnp.promote_types(out, d)
    return out


def accum_dtype(dtype) -> jnp.dtype:
    """The dtype reductions accumulate in: float64 for float64 inputs, else float32."""
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)
