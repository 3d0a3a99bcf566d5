"""Applying adapters: the unmerged linear layer, exact merge/unmerge, model wrapping, accounting."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

from jaxla import _checks, _linear
from jaxla.lora import _targets
from jaxla.lora._adapter import Adapter, Adapters, check_pair, delta

__all__ = ["ParamCount", "check_compatible", "count_params", "linear", "merge", "unmerge", "wrap"]


def check_compatible(params: Any, adapters: Adapters) -> None:
    """Checks that every adapter names a leaf of ``params`` and fits its shape.

    Args:
      params: any parameter pytree.
      adapters: ``{path: Adapter}`` as returned by :func:`jaxla.lora.init`.

    Raises:
      ValueError: an adapter key is not a parameter path (the message lists the available paths), or
        its shapes do not fit the weight (the message names the key and both shapes).
      TypeError: ``adapters`` is not a dict of :class:`Adapter`.
    """
    if not isinstance(adapters, dict):
        raise TypeError(f"adapters must be a dict {{path: Adapter}}, got {type(adapters).__name__}")
    named = _targets.flatten_with_paths(params)
    leaves = dict(named)
    missing = [k for k in adapters if k not in leaves]
    if missing:
        raise ValueError(
            f"adapter keys {missing} are not paths of params; available paths (shape):\n"
            + _targets.describe_paths(named)
        )
    for name, adapter in adapters.items():
        check_pair(name, leaves[name], adapter)
        if not jnp.issubdtype(jnp.result_type(leaves[name]), jnp.floating):
            raise TypeError(f"parameter {name!r} must be floating to be adapted, "
                            f"got {jnp.result_type(leaves[name])}")


def _apply(params: Any, adapters: Adapters, sign: float, with_error: bool):
    check_compatible(params, adapters)
    return _apply_jit(params, adapters, sign, with_error)


# One compiled program per parameter structure: calling merge eagerly would otherwise compile
# every small op separately, which costs far more than the arithmetic.
@functools.partial(jax.jit, static_argnums=(2, 3))
def _apply_jit(params: Any, adapters: Adapters, sign: float, with_error: bool):
    errors = []

    def visit(key_path, w):
        name = _targets.path_str(key_path)
        adapter = adapters.get(name)
        if adapter is None:
            return w
        w = jnp.asarray(w)
        acc = _checks.accum_dtype(_checks.promote_dtypes(w.dtype, jnp.result_type(adapter.a)))
        exact = w.astype(acc) + jnp.asarray(sign, acc) * delta(adapter, acc)
        out = exact.astype(w.dtype)
        if with_error:
            errors.append(jnp.max(jnp.abs(out.astype(acc) - exact)).astype(jnp.float32))
        return out

    new = jax.tree_util.tree_map_with_path(visit, params)
    if not with_error:
        return new
    err = jnp.max(jnp.stack(errors)) if errors else jnp.zeros((), jnp.float32)
    return new, err


def merge(params: Any, adapters: Adapters) -> tuple[Any, jax.Array]:
    """Folds the adapters into their weights: ``W + scale·(b @ a)ᵀ``.

    Dimension legend: ``...`` stacking axes (layers, experts), I ``d_in``, O ``d_out``, r rank.

    Args:
      params: any parameter pytree; adapted leaves are ``(..., I, O)`` (or ``(..., O, I)`` for
        ``out_in`` adapters).
      adapters: ``{path: Adapter}`` with a ``(..., r, I)`` and b ``(..., O, r)``.

    Returns:
      ``(merged, max_abs_error)``: params of the same structure and dtypes, where each adapted weight
      is accumulated in float32 (float64 for float64) and cast back to its dtype once, and the largest
      absolute rounding error that cast made over all adapted weights (float32 scalar).
    """
    return _apply(params, adapters, 1.0, True)


def unmerge(params: Any, adapters: Adapters) -> tuple[Any, jax.Array]:
    """Removes merged adapters again: ``W − scale·(b @ a)ᵀ``, the exact inverse up to rounding.

    Dimension legend: as :func:`merge`.

    Args:
      params: merged params (or, for PiSSA, the original weights, giving the residual base).
      adapters: the adapters that were merged.

    Returns:
      ``(params, max_abs_error)`` as :func:`merge`. ``unmerge(merge(p)[0])`` differs from ``p`` by at
      most the sum of the two reported errors (zero where b is zero).
    """
    return _apply(params, adapters, -1.0, True)


def wrap(apply_fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turns ``apply_fn(params, *args)`` into ``fn(params, adapters, *args)`` using adapted weights.

    The adapted weights are merged (in float32, cast to each weight's dtype) inside the call, so any
    model works unchanged and the result is differentiable with respect to the adapters. Models built
    from :func:`jaxla.lora.linear` avoid the merged (I, O) temporaries and their (I, O) gradients.

    Args:
      apply_fn: ``apply_fn(params, *args, **kwargs)``, e.g. a Flax ``model.apply``.

    Returns:
      ``fn(params, adapters, *args, **kwargs)`` returning what ``apply_fn`` returns.
    """

    def fn(params: Any, adapters: Adapters, *args: Any, **kwargs: Any) -> Any:
        return apply_fn(_apply(params, adapters, 1.0, False), *args, **kwargs)

    fn.__name__ = f"lora_{getattr(apply_fn, '__name__', 'apply')}"
    fn.__doc__ = f"LoRA-adapted version of {getattr(apply_fn, '__name__', 'apply_fn')}."
    return fn


FORMULATIONS = ("factored", "merged")


def linear(
    params: dict[str, Any],
    adapter: Adapter,
    x: ArrayLike,
    *,
    precision: jax.lax.PrecisionLike = None,
    dtype: DTypeLike | None = None,
    preferred_element_type: DTypeLike | None = None,
    formulation: str = "factored",
) -> jax.Array:
    """The adapted linear layer ``x·W + b + scale·((x·aᵀ)·bᵀ)``.

    Dimension legend: ``...`` leading batch/sequence axes, I ``d_in``, O ``d_out``, r rank.

    Two formulations compute the same function; which one runs is the caller's choice, never the
    input's shape, so a row's output does not depend on how many rows it was computed with:

    * ``"factored"`` (default): ``x·W + scale·((x·aᵀ)·bᵀ)``, two thin products beside the main
      one, never forming an (I, O) update. A small update is added to each output in float32, so it
      survives even when it is far below W's rounding step.
    * ``"merged"``: ``x·(W + scale·aᵀbᵀ)``, with ``W + ΔW`` formed in float32 and rounded to the
      compute dtype once — the forward of :func:`merge` followed by :func:`jaxla.linear`. With many
      rows (rows >= I) it saves a pass over the (rows, O) output, at the price of that rounding (which
      in bfloat16 can erase small updates). Its backward stays factored, so the gradients for a and
      b never form an (I, O) product.

    Args:
      params: ``{"w": (I, O), "b": (O,)}`` as for :func:`jaxla.linear` (``"b"`` optional).
      adapter: an :class:`Adapter` with a ``(r, I)`` and b ``(O, r)`` (not stacked, not ``out_in``).
      x: ``(..., I)``.
      precision: passed to every ``dot_general``.
      dtype: compute dtype (floating); by default the promoted dtype of x and W.
      preferred_element_type: result dtype (floating); the compute dtype by default.
      formulation: ``"factored"`` or ``"merged"`` (static), see above.

    Returns:
      ``(..., O)``. All products accumulate in float32 (float64 for float64) and the sum is rounded
      once.
    """
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")
    w, _ = _linear.check_linear_params(params)
    if not isinstance(adapter, Adapter):
        raise TypeError(f"adapter must be a jaxla.lora.Adapter, got {type(adapter).__name__}")
    if adapter.stack_shape or adapter.out_in:
        raise ValueError(
            "linear takes one (I, O) weight and an unstacked, (I, O)-layout adapter; got an adapter "
            f"with stack axes {adapter.stack_shape} and out_in={adapter.out_in}. Index stacked "
            "adapters per layer first, e.g. jax.tree.map(lambda v: v[i], adapter)."
        )
    check_pair("adapter", w, adapter)
    x, compute, out_dtype = _linear.check_linear_input(w, x, dtype, preferred_element_type)
    return _linear_jit(params, adapter, x, precision, compute, out_dtype, formulation)


# Eager calls compile one program per shape rather than one per primitive; under an outer jit this
# is inlined.
@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _linear_jit(params, adapter, x, precision, compute, out_dtype, formulation):
    acc = _checks.accum_dtype(compute)
    w = jnp.asarray(params["w"]).astype(compute)
    a, b = jnp.asarray(adapter.a).astype(compute), jnp.asarray(adapter.b).astype(compute)
    x = x.astype(compute)
    if formulation == "merged":
        y = _merged_product(x, w, a, b, float(adapter.scale), precision)
    else:
        y = _factored_product(x, w, a, b, float(adapter.scale), precision, acc)
    if params.get("b") is not None:
        bias = jnp.asarray(params["b"]).astype(compute).astype(acc)
        y = y + bias.reshape((1,) * (y.ndim - 1) + bias.shape)
    return y.astype(out_dtype)


def _dot(x, y, contract_x, contract_y, precision, acc):
    return jax.lax.dot_general(x, y, (((contract_x,), (contract_y,)), ((), ())), precision=precision,
                               preferred_element_type=acc)


def _factored_product(x, w, a, b, scale, precision, acc):
    """``x·W + scale·((x·aᵀ)·bᵀ)``: two thin products beside the main one."""
    last = x.ndim - 1
    y = _dot(x, w, last, 0, precision, acc)
    # Scale the thin (..., r) intermediate: r multiplies per row instead of O.
    xa = (_dot(x, a, last, 1, precision, acc) * jnp.asarray(scale, acc)).astype(x.dtype)
    return y + _dot(xa, b, last, 1, precision, acc)


# With many rows, adding the (rows, O) low-rank product costs a full extra pass over the output, while
# folding the update into W costs one pass over the (I, O) weight: the forward multiplies by
# W + scale·aᵀbᵀ (formed in f32, rounded to the compute dtype). The backward stays factored, so
# gradients for a and b never form an (I, O) product and W's gradient is only computed when
# something uses it (XLA removes it otherwise).
@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _merged_product(x, w, a, b, scale, precision):
    acc = _checks.accum_dtype(x.dtype)
    update = _dot(a, b, 0, 1, precision, acc) * jnp.asarray(scale, acc)  # (I, O)
    w_eff = (w.astype(acc) + update).astype(x.dtype)
    return _dot(x, w_eff, x.ndim - 1, 0, precision, acc)


def _merged_product_fwd(x, w, a, b, scale, precision):
    return _merged_product(x, w, a, b, scale, precision), (x, w, a, b)


def _merged_product_bwd(scale, precision, residuals, g):
    x, w, a, b = residuals
    acc = _checks.accum_dtype(x.dtype)
    g = g.astype(x.dtype)
    last = x.ndim - 1
    batch_axes = tuple(range(last))
    s = jnp.asarray(scale, acc)
    g_b = _dot(g, b, last, 0, precision, acc) * s  # (..., r) = scale · g·b
    x_a = _dot(x, a, last, 1, precision, acc) * s  # (..., r) = scale · x·aᵀ
    dx = _dot(g, w, last, 1, precision, acc) + _dot(g_b.astype(x.dtype), a, last, 0, precision, acc)
    dw = jax.lax.dot_general(x, g, ((batch_axes, batch_axes), ((), ())), precision=precision,
                             preferred_element_type=acc)
    da = jax.lax.dot_general(g_b.astype(x.dtype), x, ((batch_axes, batch_axes), ((), ())),
                             precision=precision, preferred_element_type=acc)
    db = jax.lax.dot_general(g, x_a.astype(x.dtype), ((batch_axes, batch_axes), ((), ())),
                             precision=precision, preferred_element_type=acc)
    return (dx.astype(x.dtype), dw.astype(w.dtype), da.astype(a.dtype), db.astype(b.dtype))


_merged_product.defvjp(_merged_product_fwd, _merged_product_bwd)


@dataclasses.dataclass(frozen=True)
class ParamCount:
    """Parameter accounting for a set of adapters.

    Attributes:
      trainable: adapter parameters, ``r·(d_in + d_out)`` per adapted matrix.
      frozen: parameters of the base model.
      total: ``trainable + frozen``.
      fraction: ``trainable / total`` (PEFT's "trainable%" divided by 100).
      adapted: base parameters that the adapters update.
    """

    trainable: int
    frozen: int
    total: int
    fraction: float
    adapted: int

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                f"trainable%: {100 * self.fraction:.4f}")


def count_params(params: Any, adapters: Adapters) -> ParamCount:
    """Counts trainable (adapter) and frozen (base) parameters.

    Args:
      params: the base parameter pytree.
      adapters: ``{path: Adapter}`` for ``params``.

    Returns:
      A :class:`ParamCount`.
    """
    check_compatible(params, adapters)
    frozen = sum(int(np.size(leaf)) for _, leaf in _targets.flatten_with_paths(params))
    trainable = sum(int(np.size(ad.a)) + int(np.size(ad.b)) for ad in adapters.values())
    leaves = dict(_targets.flatten_with_paths(params))
    adapted = sum(int(np.size(leaves[k])) for k in adapters)
    total = frozen + trainable
    return ParamCount(trainable, frozen, total, trainable / total if total else 0.0, adapted)
