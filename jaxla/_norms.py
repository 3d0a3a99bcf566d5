"""Normalisation layers and token embeddings used by transformer blocks.

Dimension legend:
  ``...``  any leading (batch, sequence) dimensions
  D        model features (normalised axis)
  V        vocabulary size

Statistics are computed in float32 (float64 for float64 inputs) and the result is cast back to the
input dtype, so bfloat16 activations are normalised accurately.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from jaxla import _checks, _eager

__all__ = ["embed", "init_embedding", "init_layer_norm", "layer_norm", "rms_norm"]

Params = dict[str, Any]


@_eager.compiled
def init_layer_norm(d: int, *, use_bias: bool = True, dtype: DTypeLike = jnp.float32) -> Params:
    """Parameters of a layer norm over D features: ``{"scale": ones (D,), "bias": zeros (D,)}``."""
    d = _checks.check_positive_int(d, "d")
    _checks.check_floating_dtype(dtype, "dtype")
    params = {"scale": jnp.ones((d,), dtype)}
    if use_bias:
        params["bias"] = jnp.zeros((d,), dtype)
    return params


def _check_norm_inputs(params: Params, x: ArrayLike, fn: str) -> jax.Array:
    x = _checks.as_array(x, "x")
    _checks.check_floating(x, "x")
    _checks.check_min_rank(x, "x", 1, "(..., D)")
    if not isinstance(params, dict) or "scale" not in params:
        raise TypeError(f'{fn}: params must be a dict with "scale" (D,) and optionally "bias" (D,)')
    for name in ("scale", "bias"):
        if name in params and tuple(jnp.shape(params[name])) != (x.shape[-1],):
            raise ValueError(
                f'{fn}: params["{name}"] must have shape (D,) = ({x.shape[-1]},) to match x '
                f"{tuple(x.shape)}, got {tuple(jnp.shape(params[name]))}"
            )
    return x


def _affine(y: jax.Array, params: Params, acc) -> jax.Array:
    lead = (1,) * (y.ndim - 1)
    y = y * params["scale"].astype(acc).reshape((*lead, -1))
    if "bias" in params:
        y = y + params["bias"].astype(acc).reshape((*lead, -1))
    return y


@_eager.compiled
def layer_norm(params: Params, x: ArrayLike, *, eps: float = 1e-6) -> jax.Array:
    """Layer normalisation over the last axis: ``(x - mean) / sqrt(var + eps) * scale + bias``.

    Args:
      params: from :func:`init_layer_norm`.
      x: array of shape ``(..., D)``.
      eps: added to the variance.

    Returns:
      Array with the shape and dtype of ``x``.
    """
    x = _check_norm_inputs(params, x, "layer_norm")
    _checks.check_eps(eps)
    acc = _checks.accum_dtype(x.dtype)
    xf = x.astype(acc)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    centred = xf - mean
    var = jnp.mean(centred * centred, axis=-1, keepdims=True)
    y = centred * jax.lax.rsqrt(var + eps)
    return _affine(y, params, acc).astype(x.dtype)


@_eager.compiled
def rms_norm(params: Params, x: ArrayLike, *, eps: float = 1e-6) -> jax.Array:
    """RMS normalisation over the last axis: ``x / sqrt(mean(x²) + eps) * scale`` (no centring).

    Args:
      params: ``{"scale": (D,)}`` (e.g. ``init_layer_norm(D, use_bias=False)``).
      x: array of shape ``(..., D)``.
      eps: added to the mean square.

    Returns:
      Array with the shape and dtype of ``x``.
    """
    x = _check_norm_inputs(params, x, "rms_norm")
    _checks.check_eps(eps)
    acc = _checks.accum_dtype(x.dtype)
    xf = x.astype(acc)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return _affine(y, params, acc).astype(x.dtype)


@_eager.compiled
def init_embedding(
    key: jax.Array, vocab_size: int, d: int, *, stddev: float = 0.02, dtype: DTypeLike = jnp.float32
) -> Params:
    """Token embedding table ``{"table": (V, D)}`` drawn from N(0, stddev²)."""
    vocab_size = _checks.check_positive_int(vocab_size, "vocab_size")
    d = _checks.check_positive_int(d, "d")
    _checks.check_floating_dtype(dtype, "dtype")
    return {"table": stddev * jax.random.normal(key, (vocab_size, d), dtype)}


@_eager.compiled
def embed(params: Params, tokens: ArrayLike) -> jax.Array:
    """Looks up token embeddings.

    Args:
      params: ``{"table": (V, D)}``.
      tokens: integer array of shape ``(...)`` with values in [0, V).

    Returns:
      Array of shape ``(..., D)``. Out-of-range ids are clamped (JAX's gather semantics); check ids
      before calling when that matters.
    """
    tokens = _checks.as_array(tokens, "tokens")
    _checks.check_integer(tokens, "tokens")
    if not isinstance(params, dict) or "table" not in params:
        raise TypeError('params must be a dict with "table" of shape (vocab_size, d)')
    table = _checks.as_array(params["table"], 'params["table"]')
    _checks.check_rank(table, 'params["table"]', 2, "(vocab_size, d)")
    return jnp.take(table, tokens, axis=0, mode="clip")
