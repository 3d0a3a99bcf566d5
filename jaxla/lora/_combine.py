"""Adapter arithmetic: several adapters combined into one, with PEFT's ``add_weighted_adapter`` rules.

Each method is defined per adapted matrix (per stacked matrix for stacked adapters), in PyTorch's
``(O, I)`` orientation where it matters (pruning counts and SVD), with sᵢ the scale of adapter i and
wᵢ its weight. The result has ``alpha = rank`` and ``rslora = False``, so its scale is 1 — as PEFT's
new adapter has ``lora_alpha = r``:

* ``linear`` (same rank): ``a = Σ sgn(wᵢsᵢ)·√|wᵢsᵢ|·aᵢ``, ``b = Σ √|wᵢsᵢ|·bᵢ`` (a and b are mixed
  separately, so ``b·a`` has cross terms: it is not ``Σ wᵢΔWᵢ`` unless one adapter is given).
* ``cat`` (rank Σrᵢ): ``a = [w₁s₁a₁; w₂s₂a₂; …]``, ``b = [b₁, b₂, …]``: exactly ``Σ wᵢΔWᵢ``.
* ``ties``, ``dare_linear`` (alias ``dare``), ``dare_ties``, ``magnitude_prune`` (same rank): as
  ``linear``, but the a's and the b's are merged with TIES (keep the top ``density`` fraction of
  each tensor by magnitude, elect the per-entry sign of the sum, average the agreeing weighted
  entries), DARE (keep each entry with probability ``density``, rescale by 1/density; then a
  weighted sum, or TIES' sign election) or magnitude pruning (then a weighted sum).
* ``svd`` and ``ties_svd`` / ``dare_linear_svd`` / ``dare_ties_svd`` / ``magnitude_prune_svd``:
  the matrices ``ΔWᵢ = sᵢ·bᵢaᵢ`` ``(O, I)`` are merged with weights ``wᵢ·sᵢ`` — PEFT weights the
  already-scaled ΔWᵢ by the scale once more, and so does this function, so both libraries give the
  same adapter — then truncated to ``rank`` (default: the largest rᵢ) by SVD: ``b = U_r·S_r``,
  ``a = V_rᵀ``. Large matrices use the randomized SVD core shared with :mod:`jaxla.spectral`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxla import _checks, _rsvd
from jaxla.lora._adapter import Adapter, Adapters, check_pair, weight_shape
from jaxla.lora._swap import _concrete_scale

__all__ = ["METHODS", "combine"]

_SAME_RANK = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_SVD = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS = (*_SAME_RANK, "cat", *_SVD)
_ALIASES = {"dare": "dare_linear", "dare_svd": "dare_linear_svd"}
_NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
# Above this min(I, O), the SVD methods use the randomized SVD (full SVD below it).
RANDOMIZED_ABOVE = 1024


def _check_weights(weights: Any, n: int) -> list[float]:
    if isinstance(weights, str | bytes) or not isinstance(weights, Sequence | np.ndarray):
        raise TypeError(f"weights must be a sequence of {n} numbers, got {type(weights).__name__}")
    ws = list(np.asarray(weights).reshape(-1)) if isinstance(weights, np.ndarray) else list(weights)
    if len(ws) != n:
        raise ValueError(f"weights has {len(ws)} entries for {n} adapter sets; expected one weight "
                         "per adapter set")
    out = []
    for i, w in enumerate(ws):
        if isinstance(w, bool) or not isinstance(w, int | float | np.integer | np.floating):
            raise TypeError(f"weights[{i}] must be a number, got {type(w).__name__} {w!r}")
        if not math.isfinite(float(w)):
            raise ValueError(f"weights[{i}] must be finite, got {w}")
        out.append(float(w))
    return out


def _check_sets(adapters_list: Any) -> list[Adapters]:
    if isinstance(adapters_list, dict) or not isinstance(adapters_list, Sequence) or not adapters_list:
        raise TypeError("adapters_list must be a non-empty sequence of adapter dicts "
                        "{path: Adapter}")
    sets = list(adapters_list)
    for i, s in enumerate(sets):
        if not isinstance(s, dict) or not all(isinstance(v, Adapter) for v in s.values()):
            raise TypeError(f"adapters_list[{i}] must be a dict {{path: jaxla.lora.Adapter}}")
    keys = sorted(sets[0])
    for i, s in enumerate(sets[1:], 1):
        if sorted(s) != keys:
            raise ValueError(f"adapter set {i} adapts {sorted(s)} but set 0 adapts {keys}; combined "
                             "sets must target the same paths")
    for k in keys:
        ads = [s[k] for s in sets]
        dora = [ad.m is not None for ad in ads]
        if any(dora):
            which = [i for i, d in enumerate(dora) if d]
            kind = "mixes DoRA (sets " + str(which) + ") and plain LoRA adapters" if not all(dora) \
                else "is DoRA in every set"
            raise ValueError(f"path {k!r} {kind}; adapter arithmetic combines plain LoRA adapters "
                             "only (a DoRA magnitude has no weighted-combination rule)")
        shape0 = weight_shape(ads[0])
        for i, ad in enumerate(ads):
            check_pair(f"{k} (set {i})", jax.ShapeDtypeStruct(shape0, jnp.float32), ad)
            if ad.out_in != ads[0].out_in:
                raise ValueError(f"path {k!r}: set {i} has out_in={ad.out_in} but set 0 has "
                                 f"out_in={ads[0].out_in}")
    return sets


def combine(
    adapters_list: Sequence[Adapters],
    weights: Sequence[float],
    *,
    method: str = "linear",
    rank: int | None = None,
    density: float | None = None,
    key: jax.Array | None = None,
    majority_sign: str = "total",
    svd: str = "auto",
    niter: int = 4,
) -> Adapters:
    """Combines several adapter sets for the same params into one (PEFT's ``add_weighted_adapter``).

    Dimension legend: ``...`` stacking axes, I ``d_in``, O ``d_out``, r rank; n adapter sets.

    Args:
      adapters_list: n dicts ``{path: Adapter}`` adapting the same paths with the same weight shapes
        (plain LoRA only; ranks and alphas may differ where the method allows).
      weights: n finite numbers, one per set (negative weights subtract).
      method: one of :data:`METHODS` (see the module docstring; ``"dare"`` means ``"dare_linear"``).
        With a single set PEFT always uses ``linear``; so does this function.
      rank: target rank of the SVD methods (default: the largest input rank; at most min(I, O)).
      density: kept fraction in (0, 1] for the pruning methods (ties, dare, magnitude_prune and
        their _svd forms).
      key: PRNG key, required by the dare methods (and used by the randomized SVD when given).
      majority_sign: TIES sign election, ``"total"`` (sign of the sum) or ``"frequency"`` (sign of
        the count).
      svd: ``"auto"`` (randomized above min(I, O) = 1024), ``"full"`` or ``"randomized"``.
      niter: power iterations of the randomized SVD.

    Returns:
      ``{path: Adapter}`` with ``alpha = rank``, ``rslora = False`` (scale 1), in the promoted dtype
      of the inputs.

    Raises:
      ValueError / TypeError: sets that adapt different paths or weight shapes, DoRA adapters,
        unequal ranks for a same-rank method, weights of the wrong length, density outside (0, 1]
        or missing, a dare method without key, a bad rank, an unknown method.
    """
    sets = _check_sets(adapters_list)
    ws = _check_weights(weights, len(sets))
    method = _ALIASES.get(method, method)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS} (or 'dare'), got {method!r}")
    if len(sets) == 1:
        method = "linear"
    base = method[:-4] if method.endswith("_svd") else method
    if base in _NEEDS_DENSITY:
        if density is None:
            raise ValueError(f"method {method!r} needs density, the kept fraction in (0, 1]")
        if (isinstance(density, bool) or not isinstance(density, int | float | np.floating)
                or not 0.0 < float(density) <= 1.0):
            raise ValueError(f"density must be a number in (0, 1], got {density!r}")
        density = float(density)
    elif density is not None and method != "linear":
        raise ValueError(f"density is for the pruning methods, not {method!r}")
    if base.startswith("dare") and key is None:
        raise ValueError(f"method {method!r} drops entries at random: pass key=jax.random.key(...)")
    if majority_sign not in ("total", "frequency"):
        raise ValueError(f"majority_sign must be 'total' or 'frequency', got {majority_sign!r}")
    if svd not in ("auto", "full", "randomized"):
        raise ValueError(f"svd must be 'auto', 'full' or 'randomized', got {svd!r}")
    if rank is not None:
        if method not in _SVD:
            raise ValueError(f"rank is the target rank of the SVD methods, not of {method!r}")
        rank = _checks.check_positive_int(rank, "rank")
    niter = _checks.check_positive_int(niter, "niter", allow_zero=True)
    if key is None:
        key = jax.random.key(0)  # only the randomized SVD's sketch can use it; fixed for determinism

    out = {}
    for p_idx, name in enumerate(sorted(sets[0])):
        ads = [s[name] for s in sets]
        scales = [_concrete_scale(ad, name) for ad in ads]
        ranks = [ad.rank for ad in ads]
        dt = _checks.accum_dtype(_checks.promote_dtypes(*(jnp.result_type(ad.a) for ad in ads)))
        pkey = jax.random.fold_in(key, p_idx)
        if method in _SAME_RANK:
            if len(set(ranks)) != 1:
                raise ValueError(f"method {method!r} needs adapters of one rank; path {name!r} has "
                                 f"ranks {ranks} (use 'cat' or an SVD method)")
            ws_a = [math.copysign(math.sqrt(abs(w * s)), w * s) for w, s in zip(ws, scales, strict=True)]
            ws_b = [math.sqrt(abs(w * s)) for w, s in zip(ws, scales, strict=True)]
            a = _merge_tensors([jnp.asarray(ad.a, dt) for ad in ads], ws_a, method, density,
                               majority_sign, jax.random.fold_in(pkey, 0), 2)
            b = _merge_tensors([jnp.asarray(ad.b, dt) for ad in ads], ws_b, method, density,
                               majority_sign, jax.random.fold_in(pkey, 1), 2)
            new_rank = ranks[0]
        elif method == "cat":
            a = jnp.concatenate([jnp.asarray(ad.a, dt) * jnp.asarray(w * s, dt)
                                 for ad, w, s in zip(ads, ws, scales, strict=True)], axis=-2)
            b = jnp.concatenate([jnp.asarray(ad.b, dt) for ad in ads], axis=-1)
            new_rank = sum(ranks)
        else:
            d_out, d_in = np.shape(ads[0].b)[-2], np.shape(ads[0].a)[-1]
            new_rank = rank if rank is not None else max(ranks)
            if new_rank > min(d_in, d_out):
                raise ValueError(f"rank {new_rank} exceeds min(d_in, d_out) = {min(d_in, d_out)} "
                                 f"for path {name!r}")
            deltas = [jnp.asarray(s, dt) * jnp.einsum(
                "...or,...ri->...oi", jnp.asarray(ad.b, dt), jnp.asarray(ad.a, dt),
                precision=jax.lax.Precision.HIGHEST) for ad, s in zip(ads, scales, strict=True)]
            delta = _merge_tensors(deltas, [w * s for w, s in zip(ws, scales, strict=True)], base,
                                   density, majority_sign, pkey, 2)
            randomized = svd == "randomized" or (svd == "auto"
                                                 and min(d_in, d_out) > RANDOMIZED_ABOVE)
            if randomized:
                size = min(new_rank + 8, d_in, d_out)
                u, sv, vh = _rsvd.randomized_svd(delta, jax.random.fold_in(pkey, 2), rank=new_rank,
                                                 size=size, n_iter=niter)
            else:
                u, sv, vh = jnp.linalg.svd(delta, full_matrices=False)
                u, sv, vh = u[..., :new_rank], sv[..., :new_rank], vh[..., :new_rank, :]
            b, a = u * sv[..., None, :], vh
        out[name] = Adapter(a, b, float(new_rank), False, ads[0].out_in)
    return out


def _per_matrix(fn, x: jax.Array, n_mat_axes: int) -> jax.Array:
    """Applies ``fn`` to each matrix (the trailing ``n_mat_axes`` axes) flattened to a vector."""
    lead = x.shape[: x.ndim - n_mat_axes]
    flat = x.reshape((math.prod(lead), -1))
    return jax.vmap(fn)(flat).reshape(x.shape)


def _magnitude_prune(x: jax.Array, density: float, n_mat_axes: int) -> jax.Array:
    """Keeps the ``int(density · size)`` largest-magnitude entries of each matrix (PEFT's rule)."""
    size = math.prod(x.shape[x.ndim - n_mat_axes:])
    k = int(density * size)

    def one(v):
        if k == 0:
            return jnp.zeros_like(v)
        _, idx = jax.lax.top_k(jnp.abs(v), k)
        return v * jnp.zeros_like(v).at[idx].set(jnp.ones((), v.dtype))

    return _per_matrix(one, x, n_mat_axes)


def _random_prune(x: jax.Array, density: float, key: jax.Array) -> jax.Array:
    """DARE: keep each entry with probability ``density``, rescaled by ``1 / density``."""
    keep = jax.random.bernoulli(key, density, x.shape)
    return jnp.where(keep, x / jnp.asarray(density, x.dtype), jnp.zeros_like(x))


def _merge_tensors(tensors: list[jax.Array], weights: list[float], method: str, density, sign_method,
                   key, n_mat_axes: int) -> jax.Array:
    """PEFT's merge_utils on a list of same-shape tensors (task arithmetic, TIES, DARE, pruning)."""
    dt = tensors[0].dtype
    if method in ("ties", "magnitude_prune"):
        tensors = [_magnitude_prune(t, density, n_mat_axes) for t in tensors]
    elif method in ("dare_linear", "dare_ties"):
        tensors = [_random_prune(t, density, jax.random.fold_in(key, i))
                   for i, t in enumerate(tensors)]
    stacked = jnp.stack(tensors)
    w = jnp.asarray(weights, dt).reshape((len(weights),) + (1,) * (stacked.ndim - 1))
    weighted = stacked * w
    if method in ("ties", "dare_ties"):
        # The sign is elected on the unweighted (pruned) tensors, as PEFT does.
        magnitude = stacked.sum(axis=0) if sign_method == "total" else jnp.sign(stacked).sum(axis=0)
        majority = jnp.where(magnitude >= 0, jnp.ones_like(magnitude), -jnp.ones_like(magnitude))
        agree = (jnp.sign(stacked) == majority[None]).astype(dt)
        kept = agree.sum(axis=0)
        return (weighted * agree).sum(axis=0) / jnp.maximum(kept, jnp.ones_like(kept))
    return weighted.sum(axis=0)
