"""Layer pieces shared by the families: linear layers with optional LoRA adapters, per-layer adapters
for ``lax.scan``, and stacked quantized kernels that a loop over layers reads in place."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxla import _linear, lora
from jaxla.quant import _fused
from jaxla.quant._qarray import QArray

__all__ = ["LayerSlice", "dense", "join_layer", "layer_adapters", "split_in_place"]


def layer_adapters(adapters: Mapping[str, Any] | None, prefix: str = "layers/") -> dict[str, Any]:
    """The adapters of the stacked layers, keyed by their path below ``prefix``; scanned together
    with ``params["layers"]`` each step sees its layer's slice (a (r, d_in), b (d_out, r))."""
    if not adapters:
        return {}
    return {k[len(prefix):]: v for k, v in adapters.items() if k.startswith(prefix)}


class LayerSlice(NamedTuple):
    """Layer ``index`` of a stacked quantized kernel ``stack`` (L, ...), in place of its slice.

    Inside ``lax.scan`` over layers XLA:CPU copies each layer's slice of a scanned operand into a
    buffer of its own before the fused kernel's custom call reads it: for a decoded token that is
    every kernel written and read once more. A loop passes the whole stack and its layer index
    instead (:func:`split_in_place`, :func:`join_layer`) and :func:`dense` hands both to
    :func:`jaxla.quant._fused.layer_product`, which reads the layer where it lies.
    """

    stack: QArray
    index: jax.Array

    def take(self) -> QArray:
        """The layer's slice (a copy), for the paths that need one."""
        return jax.tree.map(
            lambda leaf: jax.lax.dynamic_index_in_dim(leaf, self.index, 0, keepdims=False),
            self.stack)


def split_in_place(layers: Mapping[str, Any], rows: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(scanned, kept)``: the stacked layer params to slice per layer, and the stacked quantized
    kernels (axis -2) that the fused kernel reads in place for ``rows`` rows of x (same nesting; a
    leaf is in exactly one of them). Outside CPU, or without the kernel, ``kept`` is empty."""
    scanned: dict[str, Any] = {}
    kept: dict[str, Any] = {}
    for name, value in layers.items():
        if isinstance(value, Mapping):
            s, k = split_in_place(value, rows)
            scanned[name] = s
            if k:
                kept[name] = k
        elif isinstance(value, QArray) and value.axis == -2 and _fused.layer_reason(
                value, rows) is None:
            kept[name] = value
        else:
            scanned[name] = value
    return scanned, kept


def join_layer(scanned: Mapping[str, Any], kept: Mapping[str, Any], index: jax.Array
               ) -> dict[str, Any]:
    """One layer's params: the scanned slice with every kept stack as a :class:`LayerSlice`."""
    out = dict(scanned)
    for name, value in kept.items():
        if isinstance(value, Mapping):
            out[name] = join_layer(scanned.get(name, {}), value, index)
        else:
            out[name] = LayerSlice(value, index)
    return out


def dense(p: Mapping[str, Any], adapters: Mapping[str, Any], path: str, x: jax.Array, *,
          dtype: Any = None) -> jax.Array:
    """``x·W + b`` for ``p = {"w", "b"?}``, plus the LoRA update of ``adapters[path]`` if present
    (factored: W + ΔW is never formed); float32 accumulation. ``W`` may be a :class:`LayerSlice`."""
    adapter = adapters.get(path) if adapters else None
    w = p.get("w")
    if isinstance(w, LayerSlice):
        rows = int(np.prod(x.shape[:-1]))
        if (adapter is None and dtype is None and x.dtype == jnp.float32
                and jnp.dtype(w.stack.dtype) == jnp.float32
                and _fused.layer_reason(w.stack, rows) is None):
            # What jaxla.linear computes for this slice in f32 (the fused product, then + b), on
            # the stack in place.
            if x.shape[-1] != w.stack.columns:
                raise ValueError(f"x must be (..., {w.stack.columns}) for {path}, got {x.shape}")
            y = _fused.layer_product(x, w.stack, w.index)
            b = p.get("b")
            if b is not None:
                y = y + b.astype(jnp.float32).reshape((1,) * (y.ndim - 1) + b.shape)
            return y
        p = {**p, "w": w.take()}
    if adapter is None:
        return _linear.linear(p, x, dtype=dtype)
    return lora.linear(p, adapter, x, dtype=dtype)
