"""Varying-manual-axes typing for the attention backends' values inside ``jax.shard_map``.

Under ``shard_map(..., check_vma=True)`` (its default) every value's type records the manual mesh
axes it varies over (its "vma"): ``q`` sharded over ``"sp"`` varies over ``{"sp"}``, a fresh
``jnp.zeros`` varies over nothing, and so does the result of an opaque call (``jax.ffi.ffi_call``).
A ``lax.scan`` carry must keep its type through the loop, and a ``custom_vjp`` backward rule must
return cotangents typed like the primal inputs. The backends therefore type their fresh loop
carries and their kernels' results with :func:`like` (vary wherever the operands vary) and their
cotangents with :func:`cotangent`. Outside ``shard_map`` every value varies over nothing and both
are the identity.

Feature-guarded, not version-guarded: ``lax.pcast(x, axes, to="varying")`` where it exists
(jax ≥ 0.8, including 0.10 and 0.11), ``lax.pvary`` on the releases that only had that, and no
cast at all on a jax without vma types.
"""

from __future__ import annotations

import jax
from jax import lax

__all__ = ["axes", "cotangent", "like", "vary"]

_PCAST = getattr(lax, "pcast", None)
_PVARY = getattr(lax, "pvary", None)


def axes(x) -> frozenset:
    """The manual mesh axes ``x`` is typed as varying over (empty outside shard_map or when
    ``check_vma`` is off)."""
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)
    if vma is None:  # jax 0.10 spells it aval.manual_axis_type.varying
        vma = getattr(getattr(aval, "manual_axis_type", None), "varying", None)
    return frozenset(vma or ())


def _to_varying(x, names: tuple):
    if _PCAST is not None:
        return _PCAST(x, names, to="varying")
    if _PVARY is not None:
        return _PVARY(x, names)
    return x


def vary(x, names):
    """``x`` typed to vary over the manual axes ``names`` too; the values are unchanged."""
    if not isinstance(names, (tuple, list, set, frozenset)):
        names = (names,)
    want = frozenset(names) - axes(x)
    return _to_varying(x, tuple(sorted(want, key=str))) if want else x


def like(x, *refs):
    """``x`` typed to vary over every manual axis that any of ``refs`` (arrays or None) varies
    over; the values are unchanged."""
    want = frozenset().union(*(axes(r) for r in refs if r is not None)) - axes(x)
    return _to_varying(x, tuple(sorted(want, key=str))) if want else x


def cotangent(g, primal):
    """A cotangent ``g`` typed like its ``primal``: summed over the axes only ``g`` varies over (the
    transpose of using an invariant value in per-device work), cast up to the primal's others."""
    if g is None:
        return None
    extra = axes(g) - axes(primal)
    if extra:
        g = lax.psum(g, tuple(sorted(extra, key=str)))
    return like(g, primal)
