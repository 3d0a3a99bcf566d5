"""Hot-swapping adapters without recompiling: one shared rank, the scale carried as an array.

A jitted function is specialised on its arguments' shapes and static data. A plain adapter's rank is
a shape and its ``alpha`` / ``rslora`` are static, so loading an adapter of another rank or alpha
into a compiled forward recompiles it (peft#2120, #2177 report the same for PEFT). :func:`pad_rank`
zero-pads every adapter to one rank and moves its scale into the array field ``gain``: adapters of
any rank up to that maximum and any alpha then have the same treedef and shapes, and one compiled
program serves them all. The zero rows of ``a`` and columns of ``b`` change nothing, so the update
is exactly the original one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxla import _checks
from jaxla.lora._adapter import Adapter, Adapters, scale_of

__all__ = ["pad_rank"]


def _pad_one(name: str, ad: Any, rank: int) -> Adapter:
    if not isinstance(ad, Adapter):
        raise TypeError(f"adapters[{name!r}] must be a jaxla.lora.Adapter, got {type(ad).__name__}")
    if ad.rank > rank:
        raise ValueError(f"adapter {name!r} has rank {ad.rank}, more than the padded rank {rank}; "
                         f"pad to at least {ad.rank}")
    a, b = jnp.asarray(ad.a), jnp.asarray(ad.b)
    extra = rank - ad.rank
    a = jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, extra), (0, 0)])
    b = jnp.pad(b, [(0, 0)] * (b.ndim - 1) + [(0, extra)])
    # One scale per stacked matrix, so slicing the stack per layer (lax.scan, tree.map(v[i]))
    # slices the scale with it.
    gain = jnp.broadcast_to(scale_of(ad, jnp.float32), ad.stack_shape) if ad.stack_shape \
        else scale_of(ad, jnp.float32)
    # alpha/rslora get fixed values (the scale lives in gain): every padded adapter of this rank has
    # the same static data, whatever its original rank and alpha.
    return dataclasses.replace(ad, a=a, b=b, alpha=float(rank), rslora=False, gain=gain)


def pad_rank(adapters: Adapters | Adapter, rank: int) -> Adapters | Adapter:
    """Adapters padded with zeros to rank ``rank``, their scale carried as the traced array ``gain``.

    Dimension legend: ``...`` stacking axes, I ``d_in``, O ``d_out``, r an adapter's rank,
    R = ``rank`` (the shared maximum).

    Every adapter's ``a (..., r, I)`` becomes ``(..., R, I)`` and ``b (..., O, r)`` becomes
    ``(..., O, R)`` (zero padding: ΔW unchanged), and its scale ``alpha / r`` (or ``alpha / √r``)
    becomes ``gain``, a float32 array leaf of the stacking shape (``()`` for a matrix, so a stack
    sliced per layer carries each layer's scale); the static ``alpha`` / ``rslora`` are set to fixed values
    (``R``, False) so that adapters of any rank ≤ R and any alpha share one treedef. A function jitted
    on one padded adapter set therefore runs another (other ranks, other alphas, same paths and
    weight shapes) without recompiling. :func:`jaxla.lora.linear`, :func:`jaxla.lora.merge`,
    :func:`jaxla.lora.wrap`, :func:`jaxla.lora.stack` and :func:`jaxla.lora.linear_batched` all read
    ``gain``; :func:`jaxla.lora.train_step` never updates it. DoRA magnitudes are kept.

    Args:
      adapters: ``{path: Adapter}`` (or one :class:`Adapter`).
      rank: R, at least every adapter's rank.

    Returns:
      The padded adapters, same structure as ``adapters``.

    Raises:
      ValueError: ``rank`` smaller than an adapter's rank.
    """
    rank = _checks.check_positive_int(rank, "rank")
    if isinstance(adapters, Adapter):
        return _pad_one("adapter", adapters, rank)
    if not isinstance(adapters, dict):
        raise TypeError(f"adapters must be a dict {{path: Adapter}} or one Adapter, got "
                        f"{type(adapters).__name__}")
    too_big = {k: ad.rank for k, ad in adapters.items() if isinstance(ad, Adapter) and ad.rank > rank}
    if too_big:
        raise ValueError(f"pad_rank({rank}) is smaller than the ranks of adapters {too_big}; the "
                         f"padded rank must be at least {max(too_big.values())}")
    return {k: _pad_one(k, ad, rank) for k, ad in adapters.items()}


def _concrete_scale(ad: Adapter, name: str) -> float:
    """The scale of an adapter whose gain (if any) is a concrete scalar (for arithmetic)."""
    if ad.gain is not None and np.ndim(ad.gain):
        raise ValueError(f"adapter {name!r} has a per-stack scale (gain of shape "
                         f"{np.shape(ad.gain)}); combine unpadded adapters")
    return float(ad.scale)
