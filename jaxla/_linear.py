"""Linear layers ``Y = X·W + b`` and the transformer feed-forward block built from them.

Dimension legend:
  ``...``  any leading (batch, sequence) dimensions
  I        input features ``d_in`` (e.g. 768)
  O        output features ``d_out`` (e.g. 3072)
  F        hidden features of the feed-forward block ``d_hidden``

Parameters are plain dicts: ``{"w": (I, O), "b": (O,)}`` (no ``"b"`` without bias). W is stored as
(d_in, d_out), so ``linear`` is a single ``x @ w`` with no transpose. Products accumulate in float32 (or
float64 for float64 inputs) whatever the compute dtype, and the result is rounded once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from jaxla import _checks, _eager
from jaxla.quant import _qarray, _use

__all__ = ["init_linear", "init_mlp", "linear", "mlp"]

Params = dict[str, Any]
Initializer = Callable[..., jax.Array]


@_eager.compiled
def init_linear(
    key: jax.Array,
    d_in: int,
    d_out: int,
    *,
    use_bias: bool = True,
    kernel_init: Initializer | None = None,
    bias_init: Initializer | None = None,
    dtype: DTypeLike = jnp.float32,
) -> Params:
    """Initialises the parameters of a linear layer.

    Args:
      key: a PRNG key.
      d_in: input features I (> 0).
      d_out: output features O (> 0).
      use_bias: whether to create ``"b"``.
      kernel_init: any ``jax.nn.initializers`` initializer ``(key, shape, dtype) -> array``;
        LeCun normal (variance 1/d_in, truncated normal as in Flax) by default.
      bias_init: initializer for ``"b"``; zeros by default.
      dtype: parameter dtype (the compute dtype is chosen separately in :func:`linear`).

    Returns:
      ``{"w": (I, O)}`` plus ``"b": (O,)`` when ``use_bias``.
    """
    d_in = _checks.check_positive_int(d_in, "d_in")
    d_out = _checks.check_positive_int(d_out, "d_out")
    _checks.check_floating_dtype(dtype, "dtype")
    kernel_init = kernel_init or jax.nn.initializers.lecun_normal()
    bias_init = bias_init or jax.nn.initializers.zeros
    w_key, b_key = jax.random.split(key)
    params = {"w": kernel_init(w_key, (d_in, d_out), dtype)}
    if use_bias:
        params["b"] = bias_init(b_key, (d_out,), dtype)
    return params


_accum = _checks.accum_dtype


def check_linear_params(params: Params, name: str = "params") -> tuple[jax.Array, jax.Array | None]:
    """Validates a linear layer's parameter dict and returns ``(w, b)``."""
    if not isinstance(params, dict) or "w" not in params:
        raise TypeError(
            f'{name} must be a dict with "w" (d_in, d_out) and optionally "b" (d_out,), got '
            f"{type(params).__name__}" + (f" with keys {sorted(params)}" if isinstance(params, dict)
                                          else "")
        )
    w = params["w"]
    if isinstance(w, _qarray.QArray):  # a quantized kernel: its logical shape and dtype are checked
        if w.ndim != 2 or w.axis != -2:
            raise ValueError(f'{name}["w"] must be a quantized (d_in, d_out) kernel (axis=-2, no '
                             f"stacking axes), got {w!r}; index stacked layers first")
    else:
        w = _checks.as_array(w, f'{name}["w"]')
        _checks.check_floating(w, f'{name}["w"]')
        _checks.check_rank(w, f'{name}["w"]', 2, "(d_in, d_out)")
    b = params.get("b")
    if b is not None:
        b = _checks.as_array(b, f'{name}["b"]')
        _checks.check_floating(b, f'{name}["b"]')
        if tuple(b.shape) != (w.shape[1],):
            raise ValueError(
                f'{name}["b"] must have shape (d_out,) = ({w.shape[1]},) to match {name}["w"] '
                f"{tuple(w.shape)}, got {tuple(b.shape)}"
            )
    return w, b


def check_linear_input(w: jax.Array, x: ArrayLike, dtype, preferred_element_type):
    """Validates ``x`` (..., d_in) against W (d_in, d_out); returns ``(x, compute dtype, output dtype)``."""
    x = _checks.as_array(x, "x")
    _checks.check_floating(x, "x")
    _checks.check_min_rank(x, "x", 1, "(..., d_in)")
    if x.shape[-1] != w.shape[0]:
        raise ValueError(
            f"x's last dimension {x.shape[-1]} does not match W's d_in {w.shape[0]}: "
            f"x has shape {tuple(x.shape)}, W has shape {tuple(w.shape)} (d_in, d_out)"
        )
    # An integer compute or result dtype would silently truncate the inputs or wrap the sums.
    compute = (_checks.check_floating_dtype(dtype, "dtype") if dtype is not None
               else _checks.promote_dtypes(x.dtype, w.dtype))
    out_dtype = (_checks.check_floating_dtype(preferred_element_type, "preferred_element_type")
                 if preferred_element_type is not None else compute)
    return x, compute, out_dtype


@_eager.compiled
def linear(
    params: Params,
    x: ArrayLike,
    *,
    precision: jax.lax.PrecisionLike = None,
    preferred_element_type: DTypeLike | None = None,
    dtype: DTypeLike | None = None,
) -> jax.Array:
    """Applies ``Y = X·W + b``.

    Args:
      params: ``{"w": (I, O), "b": (O,)}`` from :func:`init_linear` (``"b"`` optional); ``"w"`` may
        be a :class:`jaxla.quant.QArray` (no gradient to it): on CPU a fused kernel multiplies its
        blocks directly for up to ``jaxla.quant.MAX_FUSED_ROWS`` rows of x, otherwise it is decoded
        inside the product.
      x: input of shape ``(..., I)``.
      precision: passed to ``lax.dot_general`` (e.g. ``jax.lax.Precision.HIGHEST``).
      preferred_element_type: dtype of the result; by default the compute dtype. Accumulation is in
        float32 (float64 for float64 compute) regardless.
      dtype: compute dtype that ``x``, W and b are cast to; by default the promoted dtype of ``x`` and W.

    Returns:
      Array of shape ``(..., O)``.

    Example (the seed's fragment A.1.3):
      >>> params = jaxla.init_linear(jax.random.key(0), 768, 3072)
      >>> jaxla.linear(params, jnp.ones((4, 768))).shape
      (4, 3072)
    """
    w, b = check_linear_params(params)
    x, compute, out_dtype = check_linear_input(w, x, dtype, preferred_element_type)
    acc = _accum(compute)
    # A QArray runs in the fused CPU kernel, or is decoded here, inside the caller's program.
    y = _use.matmul(x.astype(compute), w, compute=compute, acc=acc, precision=precision)
    if b is not None:
        # Reshape rather than rely on rank promotion, which users may have set to 'raise'.
        y = y + b.astype(compute).astype(acc).reshape((1,) * (y.ndim - 1) + b.shape)
    return y.astype(out_dtype)


@_eager.compiled
def init_mlp(
    key: jax.Array,
    d_model: int,
    d_hidden: int,
    *,
    d_out: int | None = None,
    gated: bool = False,
    use_bias: bool = True,
    kernel_init: Initializer | None = None,
    dtype: DTypeLike = jnp.float32,
) -> Params:
    """Initialises a transformer feed-forward block (e.g. 768 → 3072 → 768).

    Args:
      key: a PRNG key.
      d_model: input features I.
      d_hidden: hidden features F.
      d_out: output features; ``d_model`` by default.
      gated: if True, a gated block (SwiGLU with the default activation) with an extra ``"gate"``
        projection.
      use_bias: whether the projections have biases.
      kernel_init: initializer for every kernel (LeCun normal by default).
      dtype: parameter dtype.

    Returns:
      ``{"up": linear(I→F), "down": linear(F→O)}``, plus ``"gate": linear(I→F)`` when ``gated``.
    """
    # Checked here so that errors name init_mlp's arguments, not the inner layers' d_in/d_out.
    d_model = _checks.check_positive_int(d_model, "d_model")
    d_hidden = _checks.check_positive_int(d_hidden, "d_hidden")
    d_out = d_model if d_out is None else _checks.check_positive_int(d_out, "d_out")
    _checks.check_floating_dtype(dtype, "dtype")
    k_up, k_down, k_gate = jax.random.split(key, 3)
    kw = dict(use_bias=use_bias, kernel_init=kernel_init, dtype=dtype)
    params = {
        "up": init_linear(k_up, d_model, d_hidden, **kw),
        "down": init_linear(k_down, d_hidden, d_out, **kw),
    }
    if gated:
        params["gate"] = init_linear(k_gate, d_model, d_hidden, **kw)
    return params


def _check_mlp_widths(params: Params, gated: bool) -> None:
    """The hidden width F must agree between up (I, F), gate (I, F) and down (F, O)."""
    names = ("up", "gate", "down") if gated else ("up", "down")
    w = {n: check_linear_params(params[n], f'params["{n}"]')[0] for n in names}
    shapes = ", ".join(f'{n} {tuple(w[n].shape)}' for n in names)
    if gated and w["gate"].shape != w["up"].shape:
        raise ValueError(
            'params["gate"]["w"] and params["up"]["w"] must both be (d_model, d_hidden) with the same '
            f"shape, got {shapes}"
        )
    if w["down"].shape[0] != w["up"].shape[1]:
        raise ValueError(
            f'params["down"]["w"] must be (d_hidden, d_out) with d_hidden = {w["up"].shape[1]} '
            f'(the width of params["up"]), got {shapes}'
        )


@_eager.compiled
def mlp(
    params: Params,
    x: ArrayLike,
    *,
    activation: Callable[[jax.Array], jax.Array] | None = None,
    precision: jax.lax.PrecisionLike = None,
    dtype: DTypeLike | None = None,
) -> jax.Array:
    """Applies the feed-forward block: ``down(act(up(x)))``, or ``down(act(gate(x)) * up(x))`` if gated.

    Args:
      params: from :func:`init_mlp`.
      x: input of shape ``(..., I)``.
      activation: elementwise nonlinearity; ``jax.nn.gelu`` (tanh approximation, as Flax) for the plain
        block and ``jax.nn.silu`` (SwiGLU) for the gated one by default.
      precision: passed to every :func:`linear`.
      dtype: compute dtype of every :func:`linear`.

    Returns:
      Array of shape ``(..., O)``.
    """
    if not isinstance(params, dict) or "up" not in params or "down" not in params:
        raise TypeError(
            'params must be a dict with "up" and "down" linear layers (and "gate" when gated), got '
            + (f"keys {sorted(params)}" if isinstance(params, dict) else type(params).__name__)
        )
    gated = "gate" in params
    _check_mlp_widths(params, gated)
    if activation is None:
        activation = jax.nn.silu if gated else jax.nn.gelu
    kw = dict(precision=precision, dtype=dtype)
    h = linear(params["up"], x, **kw)
    if gated:
        h = activation(linear(params["gate"], x, **kw)) * h
    else:
        h = activation(h)
    return linear(params["down"], h, **kw)
