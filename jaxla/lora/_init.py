"""Creating adapters: target selection, per-path rank/alpha, Gaussian/Kaiming and PiSSA initialisers."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from jaxla import _checks, _rsvd, quant
from jaxla.lora import _targets
from jaxla.lora._adapter import Adapter, Adapters
from jaxla.lora._core import _column_norms, _io_view, unmerge

__all__ = ["init", "init_olora", "init_pissa", "to_lora_delta"]

_INITS = ("gaussian", "kaiming")
_BASE_INITS = ("pissa", "olora")


def _check_alpha(alpha: Any, name: str) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, int | float | np.integer | np.floating):
        raise TypeError(f"alpha for {name!r} must be a number, got {type(alpha).__name__} {alpha!r}")
    if not math.isfinite(float(alpha)) or alpha <= 0:
        raise ValueError(f"alpha for {name!r} must be finite and > 0, got {alpha}")
    return float(alpha)


def _refuse_quantized(plan, init_name: str) -> None:
    """PiSSA and OLoRA rewrite W into a residual: a quantized (frozen, packed) W cannot be rewritten."""
    for name, leaf, *_ in plan:
        if isinstance(leaf, quant.QArray):
            raise TypeError(
                f"{init_name} rewrites each target W into a residual, but {name!r} is a quantized "
                f"{leaf.format} kernel that cannot be rewritten; use lora.init (kaiming or gaussian "
                "init, DoRA allowed) on a quantized base, or jaxla.quant.dequantize the base first"
            )


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
    _check_patterns_used(rank_pattern, "rank_pattern", chosen)
    _check_patterns_used(alpha_pattern, "alpha_pattern", chosen)
    return plan


def _check_patterns_used(patterns, what, chosen) -> None:
    """A rank_pattern / alpha_pattern key that matches no target is a typo, not a no-op (peft#3582)."""
    if not isinstance(patterns, Mapping):
        return
    names = [name for name, _ in chosen]
    unused = [k for k in patterns
              if not any(_targets._compile(k, f"{what} key").search(n) for n in names)]
    if unused:
        listed = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
        raise ValueError(f"{what} keys {unused} match none of the targets ({listed}); a pattern "
                         "must match the end of a target's path at a '/' boundary")


def _check_bool(value, what):
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be a bool, got {value!r}")
    return value


def _with_magnitude(adapters: Adapters, leaves: Mapping[str, Any]) -> Adapters:
    """DoRA: m initialised to the column norms of ``leaves`` + ΔW₀ (the weights the adapters train
    on): W's norms for b = 0, and ``‖W_res + ΔW₀‖ = ‖W‖`` for PiSSA / OLoRA."""
    out = {}
    for name, ad in adapters.items():
        w = leaves[name]
        # A quantized base: the magnitudes are the norms of the weights the forward computes with.
        w = quant.dequantize(w, dtype=jnp.float32) if isinstance(w, quant.QArray) else jnp.asarray(w)
        out[name] = dataclasses.replace(ad, m=_magnitude(w, ad.a, ad.b,
                                                         float(ad.scale), ad.out_in))
    return out


@functools.partial(jax.jit, static_argnums=(3, 4))
def _magnitude(w, a, b, scale, out_in):
    acc = _checks.accum_dtype(_checks.promote_dtypes(w.dtype, jnp.result_type(a)))
    n = _column_norms(_io_view(w, out_in), a, b, jnp.asarray(scale, acc), acc)
    return n.astype(jnp.result_type(a))


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
    dora: bool = False,
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
        default Kaiming-uniform). PiSSA and OLoRA change the base weights too: use
        :func:`init_pissa` / :func:`init_olora`.
      rslora: rank-stabilised scale ``alpha / sqrt(r)``.
      rank_pattern: ``{regex: r}`` overriding ``rank`` for matching paths (first match wins).
      alpha_pattern: ``{regex: alpha}`` overriding ``alpha`` likewise.
      stack_axes: number of leading stacking axes of the targets, or ``{regex: n}``; 0 by default, so a
        target must be a matrix unless its stacking axes are stated.
      out_in: targets whose weights are stored ``(..., O, I)`` (Equinox, PyTorch), as for ``targets``.
      dtype: adapter dtype; float32 by default (float64 for float64 weights).
      dora: DoRA (Liu et al., 2024): also create the trainable magnitude ``m (..., O)``,
        initialised to W's column norms (over I), so the adapted weight
        ``m · (W + ΔW) / ‖W + ΔW‖`` equals W at initialisation.

    Returns:
      ``{path: Adapter}`` with a ``(..., r, I)`` and b ``(..., O, r)`` zeros (and ``m`` for DoRA).

    Raises:
      ValueError: bad rank or alpha, targets matching nothing (the available paths are listed), a
        ``rank_pattern``/``alpha_pattern`` key matching no target, or a target whose rank does not
        equal ``stack_axes + 2``.
    """
    if init not in _INITS:
        hint = (f"; use jaxla.lora.init_{init} (it also returns the residual base weights)"
                if init in _BASE_INITS else "")
        raise ValueError(f"init must be one of {_INITS}, got {init!r}{hint}")
    _check_bool(dora, "dora")
    plan = _plan(params, rank=rank, alpha=alpha, targets=targets, rank_pattern=rank_pattern,
                 alpha_pattern=alpha_pattern, stack_axes=stack_axes, out_in=out_in, rslora=rslora)
    specs = tuple(
        (tuple(np.shape(leaf))[:-2], r, d_in, d_out,
         (jnp.dtype(dtype) if dtype is not None else _checks.accum_dtype(jnp.result_type(leaf))).name)
        for name, leaf, r, al, flip, d_in, d_out in plan
    )
    arrays = _init_arrays(key, specs, init)
    adapters = {name: Adapter(a, b, al, rslora, flip)
                for (name, _leaf, _r, al, flip, _i, _o), (a, b) in zip(plan, arrays, strict=True)}
    if dora:
        adapters = _with_magnitude(adapters, {name: leaf for name, leaf, *_ in plan})
    return adapters


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
    dora: bool = False,
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
      dora: also create DoRA magnitudes (the column norms of the original W).

    Returns:
      ``(adapters, base_params)``. Train the adapters on ``base_params`` (not on ``params``); keep a
      copy of the initial adapters to turn the trained ones into a plain LoRA delta against the
      original weights with :func:`to_lora_delta`.
    """
    _check_bool(dora, "dora")
    if svd not in ("full", "randomized"):
        raise ValueError(f'svd must be "full" or "randomized", got {svd!r}')
    if svd == "randomized" and key is None:
        raise ValueError('svd="randomized" needs a PRNG key: pass key=jax.random.key(...)')
    niter = _checks.check_positive_int(niter, "niter", allow_zero=True)
    oversample = _checks.check_positive_int(oversample, "oversample", allow_zero=True)
    plan = _plan(params, rank=rank, alpha=alpha, targets=targets, rank_pattern=rank_pattern,
                 alpha_pattern=alpha_pattern, stack_axes=stack_axes, out_in=out_in, rslora=rslora)
    _refuse_quantized(plan, "init_pissa")
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
    if dora:  # m = ‖W_res + ΔW₀‖ = ‖W‖
        adapters = _with_magnitude(adapters, dict(_targets.flatten_with_paths(base)))
    return adapters, base


def init_olora(
    params: Any,
    *,
    rank: int,
    alpha: float,
    targets: _targets.TargetSpec,
    rslora: bool = False,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    stack_axes: int | Mapping[str, int] = 0,
    out_in: _targets.TargetSpec | None = None,
    dtype: DTypeLike | None = None,
    dora: bool = False,
) -> tuple[Adapters, Any]:
    """OLoRA (Büyükakyüz, 2024): adapters from the QR decomposition of each weight, and the residual.

    With PyTorch's layout ``Wᵀ = Q R`` (``Wᵀ`` is ``(O, I)``; per stacked matrix), ``b = Q[:, :r]``
    ``(O, r)`` and ``a = R[:r]`` ``(r, I)`` — PEFT's ``init_lora_weights="olora"`` — so the first r
    orthonormal directions of W's column space start the adapter. The returned base holds
    ``W − scale·(b @ a)ᵀ`` and ``merge(base, adapters)`` reproduces ``params`` up to rounding.

    Dimension legend: as :func:`init`.

    Args:
      params, rank, alpha, targets, rslora, rank_pattern, alpha_pattern, stack_axes, out_in, dtype,
      dora: as :func:`init_pissa`.

    Returns:
      ``(adapters, base_params)``; train on ``base_params`` (see :func:`to_lora_delta`).
    """
    _check_bool(dora, "dora")
    plan = _plan(params, rank=rank, alpha=alpha, targets=targets, rank_pattern=rank_pattern,
                 alpha_pattern=alpha_pattern, stack_axes=stack_axes, out_in=out_in, rslora=rslora)
    _refuse_quantized(plan, "init_olora")
    adapters = {}
    for name, leaf, r, al, flip, _d_in, _d_out in plan:
        dt = (jnp.dtype(dtype) if dtype is not None
              else _checks.accum_dtype(jnp.result_type(leaf))).name
        a, b = _olora_factors(jnp.asarray(leaf), r, flip, dt)
        adapters[name] = Adapter(a, b, al, rslora, flip)
    base, _ = unmerge(params, adapters)
    if dora:  # m = ‖W_res + ΔW₀‖ = ‖W‖
        adapters = _with_magnitude(adapters, dict(_targets.flatten_with_paths(base)))
    return adapters, base


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _olora_factors(w, r, flip, dt):
    acc = _checks.accum_dtype(w.dtype)
    w_oi = w.astype(acc) if flip else jnp.swapaxes(w.astype(acc), -1, -2)  # (..., O, I)
    q, rr = jnp.linalg.qr(w_oi)  # q (..., O, k), rr (..., k, I), k = min(O, I)
    return rr[..., :r, :].astype(dt), q[..., :, :r].astype(dt)


def to_lora_delta(trained: Adapters, initial: Adapters) -> Adapters:
    """Turns PiSSA/OLoRA-trained adapters into plain LoRA adapters against the ORIGINAL weights.

    PiSSA and OLoRA train on a residual base ``W_res = W − ΔW₀``; the fine-tuned weight
    ``W_res + ΔW_t`` equals ``W + (ΔW_t − ΔW₀)``. The result is that difference as one rank-2r
    adapter: ``a = [a_t; a₀]`` ``(..., 2r, I)``, ``b = [b_t, −b₀]`` ``(..., O, 2r)`` with alpha
    doubled (``√2·alpha`` for rsLoRA) so the scale is unchanged — PEFT's
    ``path_initial_model_for_weight_conversion``. Apply it to the original weights
    (``merge(params, delta)``) or ship it as an ordinary LoRA file.

    Dimension legend: ``...`` stacking axes, I ``d_in``, O ``d_out``, r rank.

    Args:
      trained: the adapters after training (``{path: Adapter}``).
      initial: the adapters :func:`init_pissa` / :func:`init_olora` returned, unchanged.

    Returns:
      ``{path: Adapter}`` of rank 2r.

    Raises:
      ValueError: keys, shapes, alpha, rslora or layout that do not line up, or DoRA adapters (a
        magnitude is not a low-rank delta).
    """
    for what, ads in (("trained", trained), ("initial", initial)):
        if not isinstance(ads, dict) or not all(isinstance(v, Adapter) for v in ads.values()):
            raise TypeError(f"{what} must be a dict {{path: jaxla.lora.Adapter}}")
    if sorted(trained) != sorted(initial):
        raise ValueError(f"trained and initial adapters adapt different paths: "
                         f"{sorted(set(trained) ^ set(initial))}")
    out = {}
    for name in trained:
        t, i = trained[name], initial[name]
        if t.m is not None or i.m is not None:
            raise ValueError(f"adapter {name!r} is DoRA: its magnitude is not a low-rank delta, so "
                             "it cannot be converted to a plain LoRA adapter")
        if t.gain is not None or i.gain is not None:
            raise ValueError(f"adapter {name!r} carries a traced scale (pad_rank); convert the "
                             "unpadded adapters")
        if (np.shape(t.a), np.shape(t.b)) != (np.shape(i.a), np.shape(i.b)):
            raise ValueError(f"adapter {name!r}: trained a {np.shape(t.a)}, b {np.shape(t.b)} and "
                             f"initial a {np.shape(i.a)}, b {np.shape(i.b)} differ in shape")
        if (float(t.alpha), t.rslora, t.out_in) != (float(i.alpha), i.rslora, i.out_in):
            raise ValueError(f"adapter {name!r}: trained (alpha {t.alpha}, rslora {t.rslora}, out_in "
                             f"{t.out_in}) and initial (alpha {i.alpha}, rslora {i.rslora}, out_in "
                             f"{i.out_in}) disagree")
        dt = _checks.promote_dtypes(jnp.result_type(t.a), jnp.result_type(i.a))
        a = jnp.concatenate([jnp.asarray(t.a, dt), jnp.asarray(i.a, dt)], axis=-2)
        b = jnp.concatenate([jnp.asarray(t.b, dt), -jnp.asarray(i.b, dt)], axis=-1)
        alpha = float(t.alpha) * (math.sqrt(2.0) if t.rslora else 2.0)
        out[name] = Adapter(a, b, alpha, t.rslora, t.out_in)
    return out


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
