"""The adapter container, its scale convention, the weight update it stands for, and shape checks.

An :class:`Adapter` is a registered pytree whose children are the arrays ``a`` and ``b`` and whose
static (treedef) data is ``alpha``, ``rslora`` and ``out_in``: jit, grad, vmap and Optax see only the
two arrays, so the scale can never be trained, decayed or traced.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxla import _checks

__all__ = ["Adapter", "Adapters", "check_pair", "delta", "is_adapter"]


@dataclasses.dataclass(frozen=True)
class Adapter:
    """A low-rank update for one weight (or one stack of weights).

    Attributes:
      a: ``(..., r, d_in)`` — PEFT's ``lora_A.weight``.
      b: ``(..., d_out, r)`` — PEFT's ``lora_B.weight``; zero at initialisation.
      alpha: the LoRA alpha (static).
      rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r`` (static).
      out_in: the adapted weight is stored ``(..., d_out, d_in)`` (Equinox, PyTorch) rather than
        jaxla's ``(..., d_in, d_out)`` (static).
    """

    a: Any
    b: Any
    alpha: float
    rslora: bool = False
    out_in: bool = False

    @property
    def rank(self) -> int:
        """r, the adapter's rank."""
        return int(np.shape(self.a)[-2])

    @property
    def scale(self) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        r = self.rank
        return float(self.alpha) / (math.sqrt(r) if self.rslora else r)

    @property
    def stack_shape(self) -> tuple[int, ...]:
        """The leading (per-layer / per-expert) axes shared with the adapted weight."""
        return tuple(np.shape(self.a)[:-2])


jax.tree_util.register_dataclass(
    Adapter, data_fields=["a", "b"], meta_fields=["alpha", "rslora", "out_in"]
)

Adapters = dict[str, Adapter]


def is_adapter(x: Any) -> bool:
    return isinstance(x, Adapter)


def weight_shape(adapter: Adapter) -> tuple[int, ...]:
    """The shape of the weight ``adapter`` fits, in that weight's own layout."""
    lead = adapter.stack_shape
    d_in, d_out = np.shape(adapter.a)[-1], np.shape(adapter.b)[-2]
    return (*lead, d_out, d_in) if adapter.out_in else (*lead, d_in, d_out)


def check_pair(name: str, w: Any, adapter: Any) -> None:
    """Raises ValueError/TypeError unless ``adapter`` fits the weight ``w`` at path ``name``."""
    if not isinstance(adapter, Adapter):
        raise TypeError(
            f"adapters[{name!r}] must be a jaxla.lora.Adapter, got {type(adapter).__name__}"
        )
    a_shape, b_shape = tuple(np.shape(adapter.a)), tuple(np.shape(adapter.b))
    if len(a_shape) < 2 or len(b_shape) != len(a_shape):
        raise ValueError(
            f"adapter {name!r}: a must be (..., r, d_in) and b (..., d_out, r) with the same leading "
            f"axes, got a {a_shape} and b {b_shape}"
        )
    if a_shape[:-2] != b_shape[:-2] or a_shape[-2] != b_shape[-1]:
        raise ValueError(
            f"adapter {name!r}: a {a_shape} and b {b_shape} disagree; expected a (..., r, d_in) and "
            "b (..., d_out, r) with the same leading axes and the same r"
        )
    for field in ("a", "b"):
        arr = getattr(adapter, field)
        if not jnp.issubdtype(jnp.result_type(arr), jnp.floating):
            raise TypeError(f"adapter {name!r}: {field} must be floating, got {jnp.result_type(arr)}")
    w_shape = tuple(w.shape) if hasattr(w, "shape") else tuple(np.shape(w))
    expected = weight_shape(adapter)
    if w_shape != expected:
        layout = "(..., d_out, d_in)" if adapter.out_in else "(..., d_in, d_out)"
        raise ValueError(
            f"adapter {name!r} does not fit its weight: the parameter has shape {w_shape} but the "
            f"adapter (a {a_shape}, b {b_shape}) needs a weight of shape {expected} {layout}"
        )


def delta(adapter: Adapter, dtype: Any = None) -> jax.Array:
    """The update ``adapter`` adds to its weight, in the weight's layout.

    Dimension legend: ``...`` stacking axes, I ``d_in``, O ``d_out``, r rank.

    ``scale · (b @ a)ᵀ`` of shape ``(..., d_in, d_out)`` (or ``scale · b @ a``, ``(..., d_out, d_in)``,
    for ``out_in`` weights), computed and returned in ``dtype`` (float32 by default; float64 when the
    adapter is float64).
    """
    a, b = jnp.asarray(adapter.a), jnp.asarray(adapter.b)
    acc = jnp.dtype(dtype) if dtype is not None else _checks.accum_dtype(
        _checks.promote_dtypes(a.dtype, b.dtype))
    spec = "...or,...ri->...oi" if adapter.out_in else "...or,...ri->...io"
    d = jnp.einsum(spec, b.astype(acc), a.astype(acc), preferred_element_type=acc,
                   precision=jax.lax.Precision.HIGHEST)
    return d * jnp.asarray(adapter.scale, acc)
