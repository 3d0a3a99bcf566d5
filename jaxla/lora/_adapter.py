"""The adapter container, its scale convention, the weight update it stands for, and shape checks.

An :class:`Adapter` is a registered pytree whose children are the arrays ``a`` and ``b`` (plus the
DoRA magnitude ``m`` and the traced scale ``gain`` when set; both are ``None`` — no leaf — for a plain
adapter) and whose static (treedef) data is ``alpha``, ``rslora`` and ``out_in``: for a plain adapter
jit, grad, vmap and Optax see only the two arrays, so the scale can never be trained, decayed or
traced. A hot-swappable adapter (:func:`jaxla.lora.pad_rank`) carries its scale as the array
``gain`` instead, which :func:`jaxla.lora.train_step` never updates.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxla import _checks

__all__ = ["Adapter", "Adapters", "check_pair", "delta", "is_adapter", "is_dora", "scale_of"]


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
      m: DoRA's trainable magnitude ``(..., d_out)`` (PEFT's ``lora_magnitude_vector``), or ``None``
        for plain LoRA. With ``m`` the adapted weight is ``m · (W + ΔW) / ‖W + ΔW‖`` per output
        column (the norm over d_in), see :func:`jaxla.lora.init` with ``dora=True``.
      gain: the scale as an array (``()`` or the stacking shape ``(...)``), or ``None`` for the
        static ``alpha / r``. Set by :func:`jaxla.lora.pad_rank` so that adapters of other ranks and
        alphas share one compiled program; never trained.
    """

    a: Any
    b: Any
    alpha: float
    rslora: bool = False
    out_in: bool = False
    m: Any = None
    gain: Any = None

    @property
    def rank(self) -> int:
        """r, the adapter's rank."""
        return int(np.shape(self.a)[-2])

    @property
    def scale(self) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (the concrete ``gain`` when one is set).

        Raises:
          TypeError: the adapter carries a traced or per-stack ``gain``; use
            :func:`jaxla.lora.scale_of` inside traced code.
        """
        if self.gain is not None:
            try:
                g = np.asarray(self.gain)
            except jax.errors.TracerArrayConversionError:
                raise TypeError("this adapter's scale is a traced array (gain); use "
                                "jaxla.lora.scale_of(adapter) inside jitted code") from None
            if g.ndim:
                raise TypeError(f"this adapter's scale is a per-stack array of shape {g.shape}; "
                                "use jaxla.lora.scale_of(adapter)")
            return float(g)
        r = self.rank
        return float(self.alpha) / (math.sqrt(r) if self.rslora else r)

    @property
    def dora(self) -> bool:
        """Whether this is a DoRA adapter (it has a magnitude ``m``)."""
        return self.m is not None

    @property
    def stack_shape(self) -> tuple[int, ...]:
        """The leading (per-layer / per-expert) axes shared with the adapted weight."""
        return tuple(np.shape(self.a)[:-2])


jax.tree_util.register_dataclass(
    Adapter, data_fields=["a", "b", "m", "gain"], meta_fields=["alpha", "rslora", "out_in"]
)

Adapters = dict[str, Adapter]


def is_adapter(x: Any) -> bool:
    return isinstance(x, Adapter)


def is_dora(x: Any) -> bool:
    return isinstance(x, Adapter) and x.m is not None


def scale_of(adapter: Adapter, dtype: Any = jnp.float32) -> jax.Array:
    """The adapter's scale as an array in ``dtype``: shape ``()``, or the stacking shape ``(...)``
    for a per-stack ``gain``. Works on traced (hot-swap) scales, unlike :attr:`Adapter.scale`."""
    if adapter.gain is None:
        return jnp.asarray(adapter.scale, dtype)
    return jnp.asarray(adapter.gain).astype(dtype)


def _scale_bcast(adapter: Adapter, dtype: Any, trailing: int) -> jax.Array:
    """:func:`scale_of` with ``trailing`` unit axes appended (for broadcasting against arrays)."""
    s = scale_of(adapter, dtype)
    return s.reshape(s.shape + (1,) * trailing) if s.ndim else s


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
    lead, d_out = a_shape[:-2], b_shape[-2]
    if adapter.m is not None:
        m_shape = tuple(np.shape(adapter.m))
        if m_shape != (*lead, d_out):
            raise ValueError(f"adapter {name!r}: the DoRA magnitude m has shape {m_shape}; expected "
                             f"(..., d_out) = {(*lead, d_out)} for a {a_shape} and b {b_shape}")
        if not jnp.issubdtype(jnp.result_type(adapter.m), jnp.floating):
            raise TypeError(f"adapter {name!r}: m must be floating, got {jnp.result_type(adapter.m)}")
    if adapter.gain is not None:
        g_shape = tuple(np.shape(adapter.gain))
        if g_shape not in ((), lead):
            raise ValueError(f"adapter {name!r}: gain (the traced scale) has shape {g_shape}; "
                             f"expected () or the stacking shape {lead}")
        if not jnp.issubdtype(jnp.result_type(adapter.gain), jnp.floating):
            raise TypeError(f"adapter {name!r}: gain must be floating, got "
                            f"{jnp.result_type(adapter.gain)}")
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
    adapter is float64). For a DoRA adapter this is the low-rank part only (the weight becomes
    ``m · (W + delta) / ‖W + delta‖``, see :func:`jaxla.lora.merge`).
    """
    a, b = jnp.asarray(adapter.a), jnp.asarray(adapter.b)
    acc = jnp.dtype(dtype) if dtype is not None else _checks.accum_dtype(
        _checks.promote_dtypes(a.dtype, b.dtype))
    spec = "...or,...ri->...oi" if adapter.out_in else "...or,...ri->...io"
    d = jnp.einsum(spec, b.astype(acc), a.astype(acc), preferred_element_type=acc,
                   precision=jax.lax.Precision.HIGHEST)
    return d * _scale_bcast(adapter, acc, 2)
