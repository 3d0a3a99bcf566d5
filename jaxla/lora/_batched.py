"""Per-example adapters: several adapters stacked on a leading axis, one chosen per example by index.

The stacked adapters are ordinary arrays and the indices a traced ``int32`` vector, so one compiled
function serves every choice of adapters; switching adapters never recompiles.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

from jaxla import _checks, _linear
from jaxla.lora._adapter import Adapter, Adapters, check_pair, scale_of, weight_shape
from jaxla.lora._core import wrap

__all__ = ["linear_batched", "stack", "wrap_batched"]


def stack(adapter_sets: Sequence[Adapters]) -> Adapters:
    """Stacks E adapter sets for the same params on a new leading axis.

    Sets may differ in rank and alpha: each ``b`` is multiplied by its own scale (static, or the
    traced ``gain`` of :func:`jaxla.lora.pad_rank`) and zero-padded to the largest rank, and the
    result has scale 1 (``alpha = r_max``), so every update is unchanged. Stacking sets padded to
    one rank gives the same static structure every time: swapping them never recompiles.

    Dimension legend: E adapter sets, ``...`` stacking axes, I ``d_in``, O ``d_out``, r rank.

    Args:
      adapter_sets: E dicts ``{path: Adapter}`` with the same keys, layouts and weight shapes.

    Returns:
      ``{path: Adapter}`` with a ``(E, ..., r_max, I)`` and b ``(E, ..., O, r_max)``.
    """
    if not isinstance(adapter_sets, Sequence) or not adapter_sets:
        raise ValueError("stack needs a non-empty sequence of adapter dicts")
    keys = list(adapter_sets[0])
    for i, s in enumerate(adapter_sets):
        if not isinstance(s, dict) or sorted(s) != sorted(keys):
            raise ValueError(f"adapter set {i} has keys {sorted(s) if isinstance(s, dict) else s!r}"
                             f", set 0 has {sorted(keys)}; stacked sets must adapt the same paths")
    out = {}
    for name in keys:
        ads = [s[name] for s in adapter_sets]
        for i, ad in enumerate(ads):
            check_pair(f"{name} (set {i})", _shape_only(weight_shape(ads[0])), ad)
            if ad.m is not None:
                raise ValueError(f"adapter {name!r} (set {i}) is DoRA; per-example stacks take plain "
                                 "LoRA adapters (merge DoRA adapters into the weights instead)")
        r_max = max(ad.rank for ad in ads)
        dt = _checks.promote_dtypes(*(jnp.result_type(ad.a) for ad in ads))

        def pad(x, axis, r_max=r_max):
            widths = [(0, 0)] * x.ndim
            widths[axis] = (0, r_max - x.shape[axis])
            return jnp.pad(x, widths)

        a = jnp.stack([pad(jnp.asarray(ad.a, dt), -2) for ad in ads])
        lead = len(ads[0].stack_shape)
        b = jnp.stack([pad(jnp.asarray(ad.b, dt) * _trailing(scale_of(ad, dt), lead), -1)
                       for ad in ads])
        out[name] = Adapter(a, b, float(r_max), False, ads[0].out_in)
    return out


def _trailing(s: jax.Array, lead: int) -> jax.Array:
    """A ``()`` or ``(...)`` scale shaped to broadcast against b ``(..., O, r)``."""
    return s.reshape(s.shape + (1,) * (lead + 2 - s.ndim)) if s.ndim else s


def _shape_only(shape: tuple[int, ...]) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.float32)


def _check_indices(indices: ArrayLike, batch: int, n_adapters: int) -> jax.Array:
    idx = _checks.as_array(indices, "indices")
    _checks.check_integer(idx, "indices")
    _checks.check_rank(idx, "indices", 1, "(B,), one adapter index per example")
    _checks.check_axis_size(idx, "indices", 0, batch, "one index per example of x")
    try:
        concrete = np.asarray(idx)
    except jax.errors.TracerArrayConversionError:
        concrete = None  # traced: out-of-range rows become NaN instead (see _gather)
    if concrete is not None:
        bad = concrete[(concrete < -1) | (concrete >= n_adapters)]
        if bad.size:
            raise ValueError(f"indices must lie in [-1, {n_adapters}) (-1 = base model), "
                             f"got {bad.tolist()}")
    return idx.astype(jnp.int32)


def _gather(x: jax.Array, idx: jax.Array) -> jax.Array:
    # Out-of-range indices under jit give NaN rows rather than silently reusing another adapter.
    safe = jnp.maximum(idx, 0)
    return jnp.take(x, safe, axis=0, mode="fill", fill_value=jnp.nan)


def linear_batched(
    params: dict[str, Any],
    adapters: Adapter,
    x: ArrayLike,
    indices: ArrayLike,
    *,
    precision: jax.lax.PrecisionLike = None,
    dtype: DTypeLike | None = None,
) -> jax.Array:
    """A linear layer where example ``i`` uses adapter ``indices[i]`` of a stack (-1: no adapter).

    Dimension legend: B batch, ``...`` other leading axes (e.g. T), E adapters, I ``d_in``,
    O ``d_out``, r rank.

    Args:
      params: ``{"w": (I, O), "b": (O,)}``.
      adapters: one stacked :class:`Adapter` (from :func:`stack`) with a ``(E, r, I)``, b ``(E, O, r)``.
      x: ``(B, ..., I)``.
      indices: ``(B,)`` integers in ``[-1, E)``; checked when concrete, NaN rows when out of range
        under jit.
      precision: passed to every product.
      dtype: compute dtype (floating); by default the promoted dtype of x and W.

    Returns:
      ``(B, ..., O)``, accumulated in float32 and rounded once.
    """
    w, _ = _linear.check_linear_params(params)
    if not isinstance(adapters, Adapter) or np.ndim(adapters.a) != 3 or adapters.out_in:
        raise ValueError("adapters must be one stacked (I, O)-layout Adapter with a (E, r, I) and "
                         "b (E, O, r); build it with jaxla.lora.stack([...])[path]")
    check_pair("adapters", _shape_only((np.shape(adapters.a)[0], *w.shape)), adapters)
    x = _checks.as_array(x, "x")
    _checks.check_floating(x, "x")
    _checks.check_min_rank(x, "x", 2, "(B, ..., d_in)")
    if x.shape[-1] != w.shape[0]:
        raise ValueError(f"x's last dimension {x.shape[-1]} does not match W's d_in {w.shape[0]}: "
                         f"x has shape {tuple(x.shape)}, W has shape {tuple(w.shape)}")
    idx = _check_indices(indices, x.shape[0], np.shape(adapters.a)[0])
    compute = (_checks.check_floating_dtype(dtype, "dtype") if dtype is not None
               else _checks.promote_dtypes(x.dtype, w.dtype))
    return _linear_batched_jit(params, adapters, x, idx, precision, compute)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _linear_batched_jit(params, adapters, x, idx, precision, compute):
    acc = _checks.accum_dtype(compute)
    y = _linear.linear(params, x, precision=precision, preferred_element_type=acc, dtype=compute)
    a = _gather(jnp.asarray(adapters.a, acc), idx).astype(compute)  # (B, r, I)
    b = _gather(jnp.asarray(adapters.b, acc), idx).astype(compute)  # (B, O, r)
    xb = x.astype(compute).reshape(x.shape[0], -1, x.shape[-1])
    xa = jnp.einsum("bti,bri->btr", xb, a, precision=precision, preferred_element_type=acc)
    if adapters.gain is not None and np.ndim(adapters.gain):  # a per-set traced scale (E,)
        scale = _gather(scale_of(adapters, acc), idx)
    else:
        scale = scale_of(adapters, acc)
    on = (idx >= 0).astype(acc) * scale
    xa = (xa * on[:, None, None]).astype(compute)
    low = jnp.einsum("btr,bor->bto", xa, b, precision=precision, preferred_element_type=acc)
    return (y + low.reshape(y.shape)).astype(compute)


def wrap_batched(apply_fn: Callable[..., Any]) -> Callable[..., Any]:
    """Per-example adapters for any model: ``fn(params, stacked, indices, *args)``.

    Example ``i`` of every argument in ``args`` (leading axis B) runs ``apply_fn`` with adapter set
    ``indices[i]`` merged in (or the base model for -1), all in one vmapped call. This merges one
    weight copy per example (memory B·I·O per adapted weight), so prefer :func:`linear_batched`
    inside the model for large batches.

    Dimension legend: B batch, E adapter sets.

    Args:
      apply_fn: ``apply_fn(params, *args)`` for a batch of examples.

    Returns:
      ``fn(params, stacked, indices, *args)`` with ``stacked`` from :func:`stack` (leading axis E) and
      ``indices`` ``(B,)``; returns ``apply_fn``'s output for the batch.
    """
    adapted = wrap(apply_fn)

    def fn(params: Any, stacked: Adapters, indices: ArrayLike, *args: Any) -> Any:
        if not stacked:
            raise ValueError("stacked adapters are empty")
        n = {int(np.shape(ad.a)[0]) for ad in stacked.values()}
        if len(n) != 1:
            raise ValueError(f"stacked adapters disagree on the number of sets: {sorted(n)}")
        batch = {int(np.shape(leaf)[0]) for leaf in jax.tree_util.tree_leaves(args)}
        if len(batch) != 1:
            raise ValueError(f"every argument needs the same leading batch axis, got sizes {batch}")
        idx = _check_indices(indices, batch.pop(), n.pop())

        def one(i, *example):
            ads = {k: Adapter(_gather(ad.a, i[None])[0],
                              _gather(ad.b, i[None])[0] * (i >= 0).astype(jnp.result_type(ad.b)),
                              ad.alpha, ad.rslora, ad.out_in,
                              gain=None if ad.gain is None or not np.ndim(ad.gain)
                              else _gather(ad.gain, i[None])[0])
                   for k, ad in stacked.items()}
            ex = jax.tree_util.tree_map(lambda v: v[None], example)
            out = adapted(params, ads, *ex)
            return jax.tree_util.tree_map(lambda v: v[0], out)

        return jax.vmap(one)(idx, *args)

    return fn
