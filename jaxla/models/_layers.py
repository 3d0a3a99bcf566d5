"""Layer pieces shared by the families: linear layers with optional LoRA adapters, per-layer adapters
for ``lax.scan``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from jaxla import _linear, lora

__all__ = ["dense", "layer_adapters"]


def layer_adapters(adapters: Mapping[str, Any] | None, prefix: str = "layers/") -> dict[str, Any]:
    """The adapters of the stacked layers, keyed by their path below ``prefix``; scanned together
    with ``params["layers"]`` each step sees its layer's slice (a (r, d_in), b (d_out, r))."""
    if not adapters:
        return {}
    return {k[len(prefix):]: v for k, v in adapters.items() if k.startswith(prefix)}


def dense(p: Mapping[str, Any], adapters: Mapping[str, Any], path: str, x: jax.Array, *,
          dtype: Any = None) -> jax.Array:
    """``x·W + b`` for ``p = {"w", "b"?}``, plus the LoRA update of ``adapters[path]`` if present
    (factored: W + ΔW is never formed); float32 accumulation."""
    adapter = adapters.get(path) if adapters else None
    if adapter is None:
        return _linear.linear(p, x, dtype=dtype)
    return lora.linear(p, adapter, x, dtype=dtype)
