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
from jaxla.lora._adapter import Adapter, Adapters, check_pair, delta, scale_of
from jaxla.quant import _qarray, _use

__all__ = ["ParamCount", "check_compatible", "count_params", "dora_norms", "linear", "merge",
           "unmerge", "wrap"]


def _io_view(w: jax.Array, out_in: bool) -> jax.Array:
    return jnp.swapaxes(w, -1, -2) if out_in else w


def _column_norms(w_io: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array, acc) -> jax.Array:
    """``‖(W + s·aᵀbᵀ)_c‖`` per output column c, from W's column norms and r-sized terms.

    ``‖W_c‖² + 2s·(a·W)_c·b_c + s²·b_cᵀ(a·aᵀ)b_c``: the only products touching W are ``W ⊙ W``
    summed over I and ``a·W`` (r rows), so no (I, O) update is formed. Shapes: w_io ``(..., I, O)``,
    a ``(..., r, I)``, b ``(..., O, r)``, scale ``()`` or ``(...)``; result ``(..., O)`` in ``acc``.
    """
    hi = jax.lax.Precision.HIGHEST
    w, a, b = w_io.astype(acc), a.astype(acc), b.astype(acc)
    s = scale.astype(acc)
    s = s.reshape((*s.shape, 1)) if s.ndim else s  # (...) → (..., 1) against (..., O)
    w2 = jnp.sum(w * w, axis=-2)                                            # (..., O)
    aw = jnp.einsum("...ri,...io->...ro", a, w, precision=hi, preferred_element_type=acc)
    cross = jnp.einsum("...ro,...or->...o", aw, b, precision=hi, preferred_element_type=acc)
    gram = jnp.einsum("...ri,...qi->...rq", a, a, precision=hi, preferred_element_type=acc)
    quad = jnp.einsum("...or,...rq,...oq->...o", b, gram, b, precision=hi,
                      preferred_element_type=acc)
    two = jnp.asarray(2.0, acc)
    sq = w2 + two * s * cross + s * s * quad
    # Rounding can push an exactly-zero column slightly below 0; a NaN stays NaN.
    return jnp.sqrt(jnp.where(sq < 0, jnp.zeros_like(sq), sq))


def _safe_ratio(m: jax.Array, n: jax.Array) -> jax.Array:
    """``m / n`` with a zero column norm (the column of W + ΔW is zero) giving factor m; NaN kept."""
    return m / jnp.where(n == 0, jnp.ones_like(n), n)


def dora_norms(w: ArrayLike, adapter: Adapter) -> jax.Array:
    """DoRA's column norms ``‖W + ΔW‖`` per output column (the norm over I), without forming ΔW.

    Dimension legend: ``...`` stacking axes, I ``d_in``, O ``d_out``, r rank.

    Args:
      w: the base weight ``(..., I, O)`` (``(..., O, I)`` for ``out_in`` adapters).
      adapter: any :class:`Adapter` fitting ``w`` (DoRA or not; ``m`` is not used).

    Returns:
      ``(..., O)`` in float32 (float64 for float64 inputs).
    """
    if not isinstance(adapter, Adapter):
        raise TypeError(f"adapter must be a jaxla.lora.Adapter, got {type(adapter).__name__}")
    w = _checks.as_array(w, "w")
    check_pair("adapter", w, adapter)
    acc = _checks.accum_dtype(_checks.promote_dtypes(w.dtype, jnp.result_type(adapter.a)))
    return _column_norms(_io_view(w, adapter.out_in), jnp.asarray(adapter.a),
                         jnp.asarray(adapter.b), scale_of(adapter, acc), acc)


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


def _apply(params: Any, adapters: Adapters, sign: float, with_error: bool, base: Any = None,
           requantize: bool = False):
    check_compatible(params, adapters)
    if base is not None:
        check_compatible(base, adapters)
        if (jax.tree_util.tree_structure(base) != jax.tree_util.tree_structure(params)):
            raise ValueError("base must have the same tree structure as params")
    if requantize:
        leaves = dict(_targets.flatten_with_paths(params))
        gguf = sorted(k for k in adapters if isinstance(leaves[k], _qarray.QArray)
                      and leaves[k].format in _qarray.GGUF_FORMATS)
        if gguf:
            raise ValueError(f"requantize=True cannot re-encode GGUF blocks inside jit ({gguf}); "
                             "merge with requantize=False and call jaxla.quant.quantize on the result")
    return _apply_jit(params, adapters, sign, with_error, base, requantize)


# One compiled program per parameter structure: calling merge eagerly would otherwise compile
# every small op separately, which costs far more than the arithmetic.
@functools.partial(jax.jit, static_argnums=(2, 3, 5))
def _apply_jit(params: Any, adapters: Adapters, sign: float, with_error: bool, base: Any,
               requantize: bool = False):
    errors = []
    bases = dict(_targets.flatten_with_paths(base)) if base is not None else {}

    def visit(key_path, w):
        name = _targets.path_str(key_path)
        adapter = adapters.get(name)
        if adapter is None:
            return w
        quantized = w if isinstance(w, _qarray.QArray) else None
        if quantized is not None:
            w = _qarray.dequantize(quantized)
        w = jnp.asarray(w)
        acc = _checks.accum_dtype(_checks.promote_dtypes(w.dtype, jnp.result_type(adapter.a)))
        if adapter.m is None:
            exact = w.astype(acc) + jnp.asarray(sign, acc) * delta(adapter, acc)
        elif sign > 0:
            # Training through wrap: the norm is a constant in the backward (DoRA §4.3, PEFT).
            exact = _dora_merge_detached(w, adapter, acc)
        else:
            # W' = f ⊙ (W + ΔW) with f = m / ‖W + ΔW‖ from the original W: W = W' / f − ΔW.
            w0 = jnp.asarray(bases[name])
            n = _column_norms(_io_view(w0, adapter.out_in), jnp.asarray(adapter.a),
                              jnp.asarray(adapter.b), scale_of(adapter, acc), acc)
            f = _safe_ratio(jnp.asarray(adapter.m).astype(acc), n)
            f = f[..., :, None] if adapter.out_in else f[..., None, :]
            exact = w.astype(acc) / jnp.where(f == 0, jnp.ones_like(f), f) - delta(adapter, acc)
        out = exact.astype(w.dtype)
        if quantized is not None and requantize:
            # Requantized in the base's own format and layout; the error below is then the full
            # difference to the unmerged layer's weight, not just a cast.
            out = _requantize(out, quantized)
            if with_error:
                errors.append(jnp.max(jnp.abs(_qarray.dequantize(out, dtype=acc) - exact)
                                      ).astype(jnp.float32))
            return out
        if with_error:
            errors.append(jnp.max(jnp.abs(out.astype(acc) - exact)).astype(jnp.float32))
        return out

    new = jax.tree_util.tree_map_with_path(visit, params, is_leaf=_qarray.is_qarray)
    if not with_error:
        return new
    err = jnp.max(jnp.stack(errors)) if errors else jnp.zeros((), jnp.float32)
    return new, err


def _requantize(w: jax.Array, like: _qarray.QArray) -> _qarray.QArray:
    stack = len(like.stack_shape)
    return _qarray.quantize(w, format=like.format, stack_axes=stack, axis=like.axis,
                            block_size=None if like.format == "int8" else like.block_size,
                            double_quant=like.scale_scales is not None)


def _dora_merge_detached(w: jax.Array, adapter: Adapter, acc) -> jax.Array:
    """``(m / sg(‖W + ΔW‖)) ⊙ (W + ΔW)``: the DoRA weight, norm detached for the backward."""
    d = w.astype(acc) + delta(adapter, acc)
    n = jax.lax.stop_gradient(_column_norms(
        _io_view(w, adapter.out_in), jnp.asarray(adapter.a), jnp.asarray(adapter.b),
        scale_of(adapter, acc), acc))
    f = _safe_ratio(jnp.asarray(adapter.m).astype(acc), n)
    return d * (f[..., :, None] if adapter.out_in else f[..., None, :])


def merge(params: Any, adapters: Adapters, *, requantize: bool = False) -> tuple[Any, jax.Array]:
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

    A DoRA adapter (``m`` set) merges to ``m · (W + ΔW) / ‖W + ΔW‖`` per output column (the norm over
    I, from :func:`dora_norms`), computed in float32 and cast once like the plain update.

    A quantized kernel (:class:`jaxla.quant.QArray`) merges to the dequantized-and-merged kernel in
    its logical dtype; with ``requantize=True`` (int8/nf4/int4 only) it is quantized again in the
    same format, and the reported error is the largest difference between the requantized kernel
    and the exact unmerged one ``dequantize(W) + ΔW`` (what separates merged from unmerged outputs).
    """
    if not isinstance(requantize, bool):
        raise TypeError(f"requantize must be a bool, got {requantize!r}")
    return _apply(params, adapters, 1.0, True, requantize=requantize)


def unmerge(params: Any, adapters: Adapters, *, base: Any = None) -> tuple[Any, jax.Array]:
    """Removes merged adapters again: ``W − scale·(b @ a)ᵀ``, the exact inverse up to rounding.

    Dimension legend: as :func:`merge`.

    A merged DoRA weight ``W' = m ⊙ (W + ΔW) / ‖W + ΔW‖`` has column norms ``|m|``: the norms
    ``‖W + ΔW‖`` it was divided by are lost, so undoing it needs the original weights. Pass them as
    ``base`` (the column norms are recomputed from them; PEFT caches the same norms at merge time);
    the result is ``W' · ‖W + ΔW‖ / m − ΔW``.

    Args:
      params: merged params (or, for PiSSA, the original weights, giving the residual base).
      adapters: the adapters that were merged.
      base: the params before merging (same structure); required when an adapter is DoRA, unused
        otherwise.

    Returns:
      ``(params, max_abs_error)`` as :func:`merge`. ``unmerge(merge(p)[0])`` differs from ``p`` by at
      most the sum of the two reported errors (zero where b is zero).

    Raises:
      ValueError: a DoRA adapter without ``base``.
    """
    if base is None and isinstance(adapters, dict):
        dora = sorted(k for k, ad in adapters.items() if isinstance(ad, Adapter) and ad.m is not None)
        if dora:
            raise ValueError(
                f"unmerge of DoRA adapters {dora} needs the original weights: a merged DoRA column "
                "has norm |m|, so the norms ‖W + ΔW‖ it was divided by are lost; pass "
                "base=<params before merge>")
    return _apply(params, adapters, -1.0, True, base)


def wrap(apply_fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turns ``apply_fn(params, *args)`` into ``fn(params, adapters, *args)`` using adapted weights.

    The adapted weights are merged (in float32, cast to each weight's dtype) inside the call, so any
    model works unchanged and the result is differentiable with respect to the adapters. Models built
    from :func:`jaxla.lora.linear` avoid the merged (I, O) temporaries and their (I, O) gradients.
    DoRA adapters merge to ``m · (W + ΔW) / ‖W + ΔW‖`` with the norm detached in the backward, as in
    :func:`linear`; LoRA dropout needs :func:`linear` (a merged weight has no separate adapter input).

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
    dropout: float = 0.0,
    dropout_key: jax.Array | None = None,
) -> jax.Array:
    """The adapted linear layer ``x·W + b + scale·((x·aᵀ)·bᵀ)`` (LoRA) or its DoRA form.

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
      dropout: LoRA dropout rate in ``[0, 1)`` on the adapter's input (PEFT semantics: only the
        ``x·aᵀ`` branch sees the dropped-out x, rescaled by ``1/(1 − dropout)``; the base product
        uses x itself).
      dropout_key: the PRNG key of the dropout mask; without it (evaluation) no dropout is applied.

    DoRA (``adapter.m`` set, factored only): with ``f = m / sg(‖W + ΔW‖)`` per output column
    (:func:`dora_norms`, ``sg`` = stop_gradient: the norm is a constant in the backward, DoRA §4.3
    and PEFT), the output is ``f ⊙ (x·W + scale·(x·aᵀ)·bᵀ) + b`` — equal to ``x·W' + b`` with the
    merged DoRA weight. Under dropout it is PEFT's ``x·W + (f − 1) ⊙ (x̃·W) + f ⊙ scale·(x̃·aᵀ)·bᵀ + b``
    with x̃ the dropped-out input.

    Returns:
      ``(..., O)``. All products accumulate in float32 (float64 for float64) and the sum is rounded
      once.
    """
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")
    if (isinstance(dropout, bool) or not isinstance(dropout, int | float | np.floating)
            or not 0.0 <= float(dropout) < 1.0):
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
    dropout = float(dropout)
    if dropout_key is not None and not (
            isinstance(dropout_key, jax.Array) and (jnp.issubdtype(dropout_key.dtype,
                                                                   jax.dtypes.prng_key)
                                                    or dropout_key.dtype == jnp.uint32)):
        raise TypeError(f"dropout_key must be a PRNG key (jax.random.key), got "
                        f"{type(dropout_key).__name__}")
    use_dropout = dropout > 0 and dropout_key is not None
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
    if formulation == "merged" and (adapter.m is not None or use_dropout):
        raise ValueError('formulation="merged" is for plain LoRA without dropout; DoRA adapters and '
                         'LoRA dropout use the default formulation="factored"')
    x, compute, out_dtype = _linear.check_linear_input(w, x, dtype, preferred_element_type)
    key = dropout_key if use_dropout else None
    return _linear_jit(params, adapter, x, key, precision, compute, out_dtype, formulation,
                       dropout if use_dropout else 0.0)


def _drop(x, key, rate):
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))


# Eager calls compile one program per shape rather than one per primitive; under an outer jit this
# is inlined.
@functools.partial(jax.jit, static_argnums=(4, 5, 6, 7, 8))
def _linear_jit(params, adapter, x, key, precision, compute, out_dtype, formulation, rate):
    acc = _checks.accum_dtype(compute)
    wq = params["w"]  # a quantized base: multiplied by the fused CPU kernel or decoded, frozen
    w = _use.kernel(wq, compute)  # (XLA drops the decode where only the fused product uses it)
    a, b = jnp.asarray(adapter.a).astype(compute), jnp.asarray(adapter.b).astype(compute)
    x = x.astype(compute)
    scale = scale_of(adapter, acc)
    last = x.ndim - 1
    if formulation == "merged":
        if adapter.gain is not None:  # a traced scale: fold it into b (autodiff sees the product)
            b = (b.astype(acc) * scale).astype(compute)
            y = _merged_product(x, w, a, b, 1.0, precision)
        else:
            y = _merged_product(x, w, a, b, float(adapter.scale), precision)
    elif adapter.m is None and key is None:
        y = _factored_product(x, wq, a, b, scale, precision, acc)
    else:
        xd = _drop(x, key, rate) if key is not None else x
        base = _use.matmul(x, wq, compute=compute, acc=acc, precision=precision)
        xa = (_dot(xd, a, last, 1, precision, acc) * scale).astype(compute)
        low = _dot(xa, b, last, 1, precision, acc)
        if adapter.m is None:
            y = base + low
        else:
            n = jax.lax.stop_gradient(_column_norms(w, a, b, scale, acc))
            f = _safe_ratio(jnp.asarray(adapter.m).astype(acc), n)
            f = f.reshape((1,) * (base.ndim - 1) + f.shape)
            if key is None:
                y = f * (base + low)
            else:
                based = _use.matmul(xd, wq, compute=compute, acc=acc, precision=precision)
                y = base + (f - jnp.ones_like(f)) * based + f * low
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
    y = _use.matmul(x, w, compute=x.dtype, acc=acc, precision=precision)
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
      trainable: adapter parameters, ``r·(d_in + d_out)`` per adapted matrix (``+ d_out`` for DoRA).
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
    trainable = sum(int(np.size(ad.a)) + int(np.size(ad.b))
                    + (int(np.size(ad.m)) if ad.m is not None else 0) for ad in adapters.values())
    leaves = dict(_targets.flatten_with_paths(params))
    adapted = sum(int(np.size(leaves[k])) for k in adapters)
    total = frozen + trainable
    return ParamCount(trainable, frozen, total, trainable / total if total else 0.0, adapted)
