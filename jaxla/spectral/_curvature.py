"""Hessian trace (Hutchinson) in total and per parameter block, and a start/end curvature summary.

Dimension legend used in the docstrings:
  P   number of scalar parameters in the ``params`` pytree
  S   number of random probe vectors (``num_probes``)
  Nb  number of parameter blocks of a per-block trace

The Hessian is only touched through Hessian-vector products (``jvp`` of ``grad``, see
:func:`jaxla.spectral.hvp`), so memory is O(P) per concurrent probe. As with
:func:`jaxla.spectral.hessian_top_eigenvalues`, compilation is the caller's: these functions compose
under the caller's ``jax.jit`` and keep no cache keyed on ``loss_fn``; eagerly each call compiles
one program for itself (params, batch and key are its arguments).

Hutchinson (1989): ``tr(H) = E[vᵀ H v]`` for Rademacher ``v`` (entries ±1). With S probes the
estimate is the sample mean of ``z_s = v_sᵀ H v_s`` and its standard error is the sample standard
deviation (ddof = 1) over √S. A block ``b`` of parameters (a set of leaves) has
``tr(H_bb) = E[v_bᵀ (H v)_b]`` with the same full probes, because ``E[v_b v_cᵀ] = 0`` for ``b ≠ c``;
so every block trace comes from the same S products, and blocks that partition the leaves add up
to the total exactly (sample by sample). The eigenvalue density (SLQ) is in
:mod:`jaxla.spectral._density`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

from jaxla import _checks
from jaxla.spectral import _density, _hessian, _iterative, _metrics
from jaxla.spectral._operator import HIGHEST

__all__ = ["CurvatureSummary", "TraceResult", "curvature_summary", "hessian_trace"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TraceResult:
    """Hutchinson estimate of the Hessian trace, in total and per parameter block (a pytree).

    Attributes:
      trace: scalar, the estimate of ``tr(H)``.
      stderr: scalar, its standard error ``std(z) / √S`` (ddof = 1; NaN for S = 1).
      block_traces: ``(Nb,)`` estimates of ``tr(H_bb)`` per block (``(0,)`` without blocks).
      block_stderr: ``(Nb,)`` their standard errors.
      samples: ``(S,)`` the per-probe values ``v_sᵀ H v_s``.
      block_names: static names of the blocks, in the order of ``block_traces``.
    """

    trace: jax.Array
    stderr: jax.Array
    block_traces: jax.Array
    block_stderr: jax.Array
    samples: jax.Array
    block_names: tuple[str, ...] = dataclasses.field(default=(), metadata=dict(static=True))

    def rows(self) -> list[dict[str, Any]]:
        """Host-side rows ``{"block", "trace", "stderr"}``, the total last."""
        tr, se = np.asarray(self.block_traces), np.asarray(self.block_stderr)
        out = [{"block": n, "trace": float(t), "stderr": float(s)}
               for n, t, s in zip(self.block_names, tr, se, strict=True)]
        out.append({"block": "total", "trace": float(self.trace), "stderr": float(self.stderr)})
        return out

    def __str__(self) -> str:
        rows = self.rows()
        width = max(len(r["block"]) for r in rows)
        lines = [f"{'block':<{width}}  tr(H)        ± stderr", "-" * (width + 26)]
        lines += [f"{r['block']:<{width}}  {r['trace']:<12.5g} ± {r['stderr']:.3g}" for r in rows]
        return "\n".join(lines)


_check_int = _density._check_int


def _leaf_names(params: Any) -> list[str]:
    return [_metrics._path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _block_masks(params: Any, blocks: Any) -> tuple[tuple[str, ...], np.ndarray]:
    """Static block names and the ``(Nb, L)`` 0/1 matrix assigning the L leaves to blocks."""
    names = _leaf_names(params)
    if blocks is None:
        return (), np.zeros((0, len(names)))
    if isinstance(blocks, str):
        if blocks != "leaves":
            raise ValueError(
                "blocks must be None, 'leaves', a mapping name -> path regex or a sequence of "
                f"path regexes; got the string {blocks!r}"
            )
        return tuple(names), np.eye(len(names))
    if isinstance(blocks, Mapping):
        items = list(blocks.items())
    elif isinstance(blocks, Sequence):
        items = [(b, b) for b in blocks]
    else:
        raise TypeError(
            f"blocks must be None, 'leaves', a mapping or a sequence, got {type(blocks).__name__}"
        )
    if not items:
        raise ValueError("blocks is empty; pass None for the total trace only")
    rows = []
    for label, pattern in items:
        if not isinstance(label, str) or not isinstance(pattern, str):
            raise TypeError(f"block names and patterns must be strings, got {label!r}: {pattern!r}")
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"block {label!r}: invalid regex {pattern!r} ({e})") from e
        row = np.array([1.0 if regex.search(n) else 0.0 for n in names])
        if not row.any():
            raise ValueError(
                f"block {label!r}: the regex {pattern!r} matches no parameter path; paths are "
                f"{names}"
            )
        rows.append(row)
    return tuple(label for label, _ in items), np.stack(rows)


def _rademacher_tree(key, params):
    flat, unravel = ravel_pytree(params)
    return unravel(jax.random.rademacher(key, flat.shape, flat.dtype))


def hessian_trace(
    loss_fn: Callable,
    params: Any,
    batch: Any,
    *,
    key: Any,
    num_probes: int = 64,
    blocks: Any = None,
    probe_batch: int | None = None,
) -> TraceResult:
    """Hutchinson estimate of ``tr(H)`` of ``loss_fn(·, batch)`` at ``params``, with a standard error.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: parameter pytree (P scalars).
      batch: data (any pytree).
      key: PRNG key of the Rademacher probes (probe s uses ``fold_in(key, s)``).
      num_probes: S >= 2 probes (one Hessian-vector product each); the standard error falls as
        1/√S.
      blocks: per-block traces as well: ``None`` (total only), ``"leaves"`` (one block per
        parameter leaf), a sequence of regexes or a mapping ``name -> regex``; a block holds the
        leaves whose path (``"layers/0/w"``, as in :func:`jaxla.spectral.weight_report`) matches
        the regex (``re.search``). Blocks may overlap.
      probe_batch: products evaluated together (vectorised); default all S at once. Lower it to
        bound memory (each concurrent product holds the activations of one backward pass).

    Returns:
      :class:`TraceResult` in f32 (f64 for f64 params).

    No library cache holds ``loss_fn``: call it under your own ``jax.jit`` to compile once.
    """
    _hessian._check_loss(loss_fn, params, batch)
    num_probes = _check_int(num_probes, "num_probes", 2)
    if probe_batch is not None:
        probe_batch = _checks.check_positive_int(probe_batch, "probe_batch")
    names, masks = _block_masks(params, blocks)
    return _hessian._this_call_jit(_trace_core, loss_fn, num_probes=num_probes, names=names,
                                   masks=masks, probe_batch=probe_batch)(params, batch, key)


def _trace_core(loss_fn, params, batch, key, *, num_probes, names, masks, probe_batch):
    leaves = jax.tree_util.tree_leaves(params)
    acc = _checks.accum_dtype(_checks.promote_dtypes(*(x.dtype for x in leaves)))

    def one(i):
        v = _rademacher_tree(jax.random.fold_in(key, i), params)
        hv = _hessian.hvp(loss_fn, params, batch, v)
        per_leaf = [jnp.sum(a.astype(acc) * b.astype(acc))
                    for a, b in zip(jax.tree_util.tree_leaves(v),
                                    jax.tree_util.tree_leaves(hv), strict=True)]
        return jnp.stack(per_leaf)

    idx = jnp.arange(num_probes, dtype=jnp.int32)
    per_leaf = lax.map(one, idx, batch_size=probe_batch or num_probes)  # (S, L)
    samples = jnp.sum(per_leaf, axis=1)
    block_samples = jnp.matmul(per_leaf, jnp.asarray(masks.T, acc), precision=HIGHEST)
    root = jnp.sqrt(jnp.asarray(num_probes, acc))
    return TraceResult(
        trace=jnp.mean(samples),
        stderr=jnp.std(samples, ddof=1) / root,
        block_traces=jnp.mean(block_samples, axis=0),
        block_stderr=jnp.std(block_samples, axis=0, ddof=1) / root,
        samples=samples,
        block_names=names,
    )


class CurvatureSummary(NamedTuple):
    """Sharpness against 2/η and the Hessian trace at one point (all scalars; a pytree).

    Attributes:
      sharpness: λ_max(H) (Lanczos).
      threshold: 2 / learning_rate, the gradient-descent stability limit.
      ratio: ``sharpness / threshold`` (above 1 plain GD at this step size diverges; adaptive
        optimisers rescale the curvature, so there it is a diagnostic).
      trace: Hutchinson estimate of ``tr(H)``.
      trace_stderr: its standard error.
      converged: whether the Lanczos eigenvalue converged.
    """

    sharpness: jax.Array
    threshold: jax.Array
    ratio: jax.Array
    trace: jax.Array
    trace_stderr: jax.Array
    converged: jax.Array

    def text(self) -> str:
        """One line for a run summary: ``λ_max … (… × 2/η), tr(H) … ± …``."""
        flag = "" if bool(self.converged) else " (not converged)"
        return (f"λ_max {float(self.sharpness):.4g}{flag} = {float(self.ratio):.3g} × 2/η, "
                f"tr(H) {float(self.trace):.4g} ± {float(self.trace_stderr):.2g}")


def curvature_summary(
    loss_fn: Callable,
    params: Any,
    batch: Any,
    *,
    key: Any,
    learning_rate: float,
    num_probes: int = 16,
    num_iters: int = 48,
) -> CurvatureSummary:
    """Top Hessian eigenvalue (vs 2/η) and Hutchinson trace of ``loss_fn(·, batch)`` at ``params``.

    Costs ``num_iters + num_probes`` Hessian-vector products: ``num_iters`` Lanczos steps (fixed,
    full reorthogonalisation; ``converged`` compares the Ritz residual estimate
    ``β_m |s_m|`` with ``tol · |θ|_max``, tol 1e-4 in f32, 1e-8 in f64) and ``num_probes``
    Rademacher probes (those of :func:`hessian_trace` with the same key), one after another in
    the same loop, so the compiled program holds a single HVP. Meant for the start and the end of
    a fine-tune (e.g. of the LoRA loss over the adapter parameters); jit it at the call site (it
    vmaps, e.g. over stacked start and end parameters, in one program).

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: parameter pytree (P scalars).
      batch: data (any pytree).
      key: PRNG key (split between the Lanczos start vector and the trace probes).
      learning_rate: the step size η > 0.
      num_probes: Hutchinson probes (>= 2).
      num_iters: Lanczos steps (capped at P).

    Returns:
      :class:`CurvatureSummary`.
    """
    _hessian._check_learning_rate(learning_rate)
    _hessian._check_loss(loss_fn, params, batch)
    num_probes = _check_int(num_probes, "num_probes", 2)
    dim = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(params))
    steps = min(_check_int(num_iters, "num_iters", 1), dim)
    return _hessian._this_call_jit(_summary_core, loss_fn, learning_rate=float(learning_rate),
                                   num_probes=num_probes, steps=steps)(params, batch, key)


def _summary_core(loss_fn, params, batch, key, *, learning_rate, num_probes, steps):
    k_top, k_trace = jax.random.split(key)
    flat, unravel = ravel_pytree(params)
    acc = _checks.accum_dtype(flat.dtype)

    def matvec(v):
        hv = _hessian.hvp(loss_fn, params, batch, unravel(v.astype(flat.dtype)))
        return ravel_pytree(hv)[0].astype(acc)

    def probe(i):  # hessian_trace(key=k_trace)'s probe i (_rademacher_tree), as the flat vector
        return jax.random.rademacher(jax.random.fold_in(k_trace, i), flat.shape, flat.dtype).astype(acc)

    # The Lanczos steps and the Hutchinson probes share one loop and so one HVP in the program
    # (each HVP of a model costs seconds of compile; this halved the summary's on the tiny LM).
    q0 = jax.random.normal(k_top, flat.shape, acc)
    *tri, samples = _density._lanczos_tridiag_and_probes(matvec, q0, steps, probe, num_probes)
    top, ok = _density._top_ritz(*tri, steps, _iterative.default_tol(acc))
    threshold = jnp.asarray(2.0 / learning_rate, acc)
    ratio = top / threshold
    stderr = jnp.std(samples, ddof=1) / jnp.sqrt(jnp.asarray(num_probes, acc))
    return CurvatureSummary(top, threshold, ratio, jnp.mean(samples), stderr, ok)
