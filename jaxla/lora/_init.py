"""Creating adapters: target selection, per-path rank/alpha, Gaussian/Kaiming and PiSSA initialisers."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from jaxla import _checks, _rsvd
from jaxla.lora import _targets
from jaxla.lora._adapter import Adapter, Adapters
from jaxla.lora._core import unmerge

__all__ = ["init", "init_pissa"]

_INITS = ("gaussian", "kaiming")


def _check_alpha(alpha: Any, name: str) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, int | float | np.integer | np.floating):
        raise TypeError(f"alpha for {name!r} must be a number, got {type(alpha).__name__} {alpha!r}")
    if not math.isfinite(float(alpha)) or alpha <= 0:
        raise ValueError(f"alpha for {name!r} must be finite and > 0, got {alpha}")
    return float(alpha)


def _plan(params, *, rank, alpha, targets, rank_pattern, alpha_pattern, stack_axes, out_in, rslora):
    """Validates every choice and returns ``[(path, leaf, r, alpha, out_in, d_in, d_out)]``."""
    if not isinstance(rslora, bool):
        raise TypeError(f"rslora must be a bool, got {rslora!r}")
    chosen = _targets.select_targets(params, targets)
    out_in_pred = None if out_in is None else _targets.predicate(out_in, "out_in")
    plan = []
    for name, leaf in chosen:
        shape = tuple(np.shape(leaf))
        n_stack = _targets.resolve(stack_axes, name, 0, "stack_axes")
        n_stack = _checks.check_positive_int(n_stack, f"stack_axes for {name!r}", allow_zero=True)
        if len(shape) != n_stack + 2:
            hint = (f"pass stack_axes={{{name!r}: {len(shape) - 2}}} if its leading axes stack layers "
                    "or experts" if len(shape) > 2 else "only matrices can be adapted; narrow targets")
            raise ValueError(
                f"target {name!r} has shape {shape}; with {n_stack} stacking axes a LoRA target must "
                f"have rank {n_stack + 2} ((stack..., d_in, d_out)); {hint}"
            )
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(f"target {name!r} must be floating, got {jnp.result_type(leaf)}")
        flip = bool(out_in_pred(name, leaf)) if out_in_pred is not None else False
        d_in, d_out = (shape[-1], shape[-2]) if flip else (shape[-2], shape[-1])
        r = _checks.check_positive_int(
            _targets.resolve(rank_pattern, name, rank, "rank_pattern"), f"rank for {name!r}")
        if r > min(d_in, d_out):
            raise ValueError(
                f"rank for {name!r} must be <= min(d_in, d_out) = {min(d_in, d_out)} for its weight "
                f"of shape {shape}, got {r}"
            )
        al = _check_alpha(_targets.resolve(alpha_pattern, name, alpha, "alpha_pattern"), name)
        plan.append((name, leaf, r, al, flip, d_in, d_out))
    return plan


def init(
    key: jax.Array,
    params: Any,
    *,
    rank: int,
    alpha: float,
    targets: _targets.TargetSpec,
    init: str = "gaussian",
    rslora: bool = False,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    stack_axes: int | Mapping[str, int] = 0,
    out_in: _targets.TargetSpec | None = None,
    dtype: DTypeLike | None = None,
) -> Adapters:
    """Creates adapters (b = 0, so outputs are unchanged) for the leaves of ``params`` chosen by ``targets``.

    Dimension legend: ``...`` stacking axes (layers, experts), I ``d_in``, O ``d_out``, r rank.

    Args:
      key: a PRNG key for ``a``.
      params: any parameter pytree (jaxla, Flax linen dicts, Flax NNX state, Equinox, plain dicts).
      rank: r for every target (``0 < r <= min(I, O)``).
      alpha: LoRA alpha (> 0); the scale is ``alpha / r`` (``alpha / sqrt(r)`` with ``rslora``).
      targets: a regex matching the end of each "/"-joined leaf path at a "/" boundary (``"w"``,
        ``"(q|v)_proj/kernel"``, ``".*kernel.*"``), a sequence of such regexes, or a callable
        ``(path, leaf) -> bool``.
      init: ``"gaussian"`` (a ~ N(0, 1/r²), PEFT's "gaussian") or ``"kaiming"`` (a ~ U(±1/√I), PEFT's
        default Kaiming-uniform). For PiSSA use :func:`init_pissa`.
      rslora: rank-stabilised scale ``alpha / sqrt(r)``.
      rank_pattern: ``{regex: r}`` overriding ``rank`` for matching paths (first match wins).
      alpha_pattern: ``{regex: alpha}`` overriding ``alpha`` likewise.
      stack_axes: number of leading stacking axes of the targets, or ``{regex: n}``; 0 by default, so a
        target must be a matrix unless its stacking axes are stated.
      out_in: targets whose weights are stored ``(..., O, I)`` (Equinox, PyTorch), as for ``targets``.
      dtype: adapter dtype; float32 by default (float64 for float64 weights).

    Returns:
      ``{path: Adapter}`` with a ``(..., r, I)`` and b ``(..., O, r)`` zeros.

    Raises:
      ValueError: bad rank or alpha, targets matching nothing (the available paths are listed), or a
        target whose rank does not equal ``stack_axes + 2``.
    """
    if init not in _INITS:
        hint = "; use jaxla.lora.init_pissa for PiSSA" if "pissa" in str(init).lower() else ""
        raise ValueError(f"init must be one of {_INITS}, got {init!r}{hint}")
    plan = _plan(params, rank=rank, alpha=alpha, targets=targets, rank_pattern=rank_pattern,
                 alpha_pattern=alpha_pattern, stack_axes=stack_axes, out_in=out_in, rslora=rslora)
    specs = tuple(
        (tuple(np.shape(leaf))[:-2], r, d_in, d_out,
         (jnp.dtype(dtype) if dtype is not None else _checks.accum_dtype(jnp.result_type(leaf))).name)
        for name, leaf, r, al, flip, d_in, d_out in plan
    )
    arrays = _init_arrays(key, specs, init)
    return {name: Adapter(a, b, al, rslora, flip)
            for (name, _leaf, _r, al, flip, _i, _o), (a, b) in zip(plan, arrays, strict=True)}


def _flat_draw(sampler, key, shape, dtype, *args):
    # A 1-D draw reshaped: XLA:CPU compiles multi-dimensional threefry draws an order of magnitude
    # more slowly (seconds per shape), and the values are just as random.
    return sampler(key, (math.prod(shape),), dtype, *args).reshape(shape)


# All adapters in one compiled program (eager random ops would each compile on their own).
@functools.partial(jax.jit, static_argnums=(1, 2))
def _init_arrays(key: jax.Array, specs: tuple, init: str) -> list[tuple[jax.Array, jax.Array]]:
    out = []
    for i, (lead, r, d_in, d_out, dt) in enumerate(specs):
        k = jax.random.fold_in(key, i)
        shape = (*lead, r, d_in)
        if init == "gaussian":
            a = _flat_draw(jax.random.normal, k, shape, dt) * jnp.asarray(1.0 / r, dt)
        else:
            bound = 1.0 / math.sqrt(d_in)
            a = _flat_draw(jax.random.uniform, k, shape, dt, -bound, bound)
        out.append((a, jnp.zeros((*lead, d_out, r), dt)))
    return out


def init_pissa(
    params: Any,
    *,
    rank: int,
    alpha: float,
    targets: _targets.TargetSpec,
    svd: str = "full",
    key: jax.Array | None = None,
    niter: int = 4,
    oversample: int = 8,
    rslora: bool = False,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    stack_axes: int | Mapping[str, int] = 0,
    out_in: _targets.TargetSpec | None = None,
    dtype: DTypeLike | None = None,
) -> tuple[Adapters, Any]:
    """PiSSA: adapters holding each weight's top-r singular part, and the residual as the new base.

    With ``W = U S Vᵀ`` (jaxla layout, per stacked matrix), ``a = √(S_r/scale) U_rᵀ`` and
    ``b = V_r √(S_r/scale)``, so ``scale·(b @ a)ᵀ = U_r S_r V_rᵀ``; the returned base holds
    ``W − U_r S_r V_rᵀ`` and ``merge(base, adapters)`` reproduces ``params`` up to rounding.

    Dimension legend: as :func:`init`.

    Args:
      params: any parameter pytree.
      rank, alpha, targets, rslora, rank_pattern, alpha_pattern, stack_axes, out_in, dtype: as
        :func:`init`.
      svd: ``"full"`` (exact, ``jnp.linalg.svd``) or ``"randomized"`` (the range finder with power
        iterations of :func:`jaxla.spectral.randomized_svd`; needs ``key``; much faster for large
        weights).
      key: PRNG key for ``svd="randomized"``.
      niter: power iterations of the randomized SVD.
      oversample: extra random directions of the randomized SVD.

    Returns:
      ``(adapters, base_params)``. Train the adapters on ``base_params`` (not on ``params``).
    """
    if svd not in ("full", "randomized"):
        raise ValueError(f'svd must be "full" or "randomized", got {svd!r}')
    if svd == "randomized" and key is None:
        raise ValueError('svd="randomized" needs a PRNG key: pass key=jax.random.key(...)')
    niter = _checks.check_positive_int(niter, "niter", allow_zero=True)
    oversample = _checks.check_positive_int(oversample, "oversample", allow_zero=True)
    plan = _plan(params, rank=rank, alpha=alpha, targets=targets, rank_pattern=rank_pattern,
                 alpha_pattern=alpha_pattern, stack_axes=stack_axes, out_in=out_in, rslora=rslora)
    if key is None:
        key = jax.random.key(0)  # unused by the full SVD; keeps one code path
    adapters = {}
    for i, (name, leaf, r, al, flip, _d_in, _d_out) in enumerate(plan):
        scale = al / (math.sqrt(r) if rslora else r)
        dt = (jnp.dtype(dtype) if dtype is not None
              else _checks.accum_dtype(jnp.result_type(leaf))).name
        a, b = _pissa_factors(jax.random.fold_in(key, i), jnp.asarray(leaf), r, scale, flip, svd,
                              niter, oversample, dt)
        adapters[name] = Adapter(a, b, al, rslora, flip)
    base, _ = unmerge(params, adapters)
    return adapters, base


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6, 7, 8))
def _pissa_factors(key, w, r, scale, flip, svd, niter, oversample, dt):
    acc = _checks.accum_dtype(w.dtype)
    w = w.astype(acc)
    w_io = jnp.swapaxes(w, -1, -2) if flip else w
    if svd == "full":
        u, s, vh = jnp.linalg.svd(w_io, full_matrices=False)
        u, s, vh = u[..., :r], s[..., :r], vh[..., :r, :]
    else:
        # The package's one randomized SVD (jaxla.spectral.randomized_svd's core).
        size = min(r + oversample, *w_io.shape[-2:])
        u, s, vh = _rsvd.randomized_svd(w_io, key, rank=r, size=size, n_iter=niter)
    root = jnp.sqrt(s / jnp.asarray(scale, acc))
    a = (jnp.swapaxes(u, -1, -2) * root[..., :, None]).astype(dt)
    b = (jnp.swapaxes(vh, -1, -2) * root[..., None, :]).astype(dt)
    return a, b
