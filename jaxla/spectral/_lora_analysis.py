"""LoRA rank analysis: the rank an update needs, and how a learned adapter relates to its weight.

Dimension legend used in the docstrings:
  d_in, d_out  the weight's input and output widths; weights are stored ``(d_in, d_out)``
  r            the adapter rank
  q            number of singular directions compared

Adapter convention (that of ``jaxla.lora``, restated so this module stands alone): ``a`` is
``(r, d_in)``, ``b`` is ``(d_out, r)`` and the update in the weight's layout is
``ΔW = scale · (b @ a)ᵀ`` ``(d_in, d_out)``. The report takes either ``ΔW`` itself or ``(a, b,
scale)``; from factors it never forms ``ΔW`` for the SVD (QR of both factors, then an ``r × r``
SVD).

Alignment follows Hu et al. 2021 (LoRA, §7): the cosines of the principal angles between ΔW's top-q
left (input-side) and right (output-side) singular subspaces and W's top-q ones; random
q-dimensional subspaces of R^d have cosines around √(q/d). The amplification factor is ``‖ΔW‖_F /
‖U_qᵀ W V_q‖_F`` with U_q, V_q ΔW's top singular vectors: large values mean ΔW boosts directions W
barely uses.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxla import _checks
from jaxla.spectral import _metrics, _operator
from jaxla.spectral._operator import HIGHEST

__all__ = ["AdapterReport", "adapter_report", "suggest_rank"]


def _check_energy(energy: Any) -> float:
    if isinstance(energy, bool) or not isinstance(energy, int | float | np.floating):
        raise TypeError(f"energy must be a float in (0, 1], got {energy!r}")
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must lie in (0, 1] (fraction of ‖ΔW‖_F² to keep), got {energy}")
    return float(energy)


def _rank_for_energy(s: jax.Array, energy: float) -> jax.Array:
    sq = s * s
    total = jnp.sum(sq, axis=-1, keepdims=True)
    frac = jnp.cumsum(sq, axis=-1) / jnp.where(total > 0, total, 1.0)
    # The relative slack keeps energy=1.0 from asking for rounding-noise directions.
    slack = 8 * jnp.finfo(s.dtype).eps * s.shape[-1]
    need = jnp.sum(frac < energy - slack, axis=-1) + 1
    return jnp.where(total[..., 0] > 0, need, 0).astype(jnp.int32)


def suggest_rank(delta_w: Any, *, energy: float = 0.9) -> jax.Array:
    """Smallest rank whose truncated SVD keeps ``energy`` of ``‖ΔW‖_F²``.

    ``r* = min{r : Σ_{i<=r} σ_i² >= energy · Σ_i σ_i²}``, i.e. the rank-r* approximation has
    relative Frobenius error at most ``√(1 − energy)``.

    Args:
      delta_w: ``(..., d_in, d_out)`` update (or any matrix); leading dimensions are batched.
      energy: fraction in ``(0, 1]``.

    Returns:
      int32 ``(...)``; 0 for a zero matrix. ``int(...)`` it for a Python int.
    """
    energy = _check_energy(energy)
    return _rank_for_energy(_metrics.singular_values(delta_w), energy)


def _orth(x: jax.Array) -> jax.Array:
    return jnp.linalg.qr(x)[0]


def _update_svd(shape, dtype, delta_w, a, b, scale, what="delta_w"):
    """SVD ``(u (d_in, p), s (p,), vt (p, d_out))`` of ΔW, from ΔW or from the adapter factors.

    ``shape`` is the expected ``(d_in, d_out)``, or None to take it from the update itself.
    """
    if delta_w is not None:
        if a is not None or b is not None:
            raise ValueError("pass either delta_w or the factors (a, b, scale), not both")
        dw = _operator.check_matrix(delta_w, what)
        if shape is not None and dw.shape != tuple(shape):
            raise ValueError(
                f"{what} has shape {tuple(dw.shape)}, expected (d_in, d_out) = {tuple(shape)} "
                "like w and the update"
            )
        dtype = dtype or _checks.accum_dtype(dw.dtype)
        return jnp.linalg.svd(dw.astype(dtype), full_matrices=False)
    if a is None or b is None:
        raise ValueError("pass delta_w, or both adapter factors a (r, d_in) and b (d_out, r)")
    a = _operator.check_matrix(a, "a")
    b = _operator.check_matrix(b, "b")
    r = a.shape[0]
    d_in, d_out = shape if shape is not None else (a.shape[1], b.shape[0])
    if a.shape != (r, d_in) or b.shape != (d_out, r):
        raise ValueError(
            f"adapter factors must be a (r, d_in) and b (d_out, r) for (d_in, d_out) = "
            f"{(d_in, d_out)}; got a {tuple(a.shape)} and b {tuple(b.shape)}"
        )
    dtype = dtype or _checks.accum_dtype(jnp.promote_types(a.dtype, b.dtype))
    scale = jnp.asarray(scale, dtype)
    if scale.shape != ():
        raise ValueError(f"scale must be a scalar, got shape {scale.shape}")
    # ΔW = scale · aᵀ bᵀ = Q_a (scale · R_a R_bᵀ) Q_bᵀ with QR of aᵀ (d_in, r) and b (d_out, r).
    qa, ra = jnp.linalg.qr(a.T.astype(dtype))
    qb, rb = jnp.linalg.qr(b.astype(dtype))
    core = scale * jnp.matmul(ra, rb.T, precision=HIGHEST)
    uc, s, vct = jnp.linalg.svd(core, full_matrices=False)
    u = jnp.matmul(qa, uc, precision=HIGHEST)
    vt = jnp.matmul(vct, qb.T, precision=HIGHEST)
    return u, s, vt


def _principal_angles(q1: jax.Array, q2: jax.Array) -> jax.Array:
    """Principal angles (radians, ascending) between the spans of orthonormal ``q1``, ``q2`` (n, q).

    Small angles come from the sines (the singular values of ``q2 − q1 q1ᵀ q2``), large ones from
    the cosines, so both ends keep full relative precision (arccos alone loses small angles: in
    float32 every angle below ~0.02° has cosine 1).
    """
    c = jnp.matmul(q1.T, q2, precision=HIGHEST)
    cos = jnp.linalg.svd(c, compute_uv=False)  # descending: angles ascending
    resid = q2 - jnp.matmul(q1, c, precision=HIGHEST)
    sin = jnp.sort(jnp.linalg.svd(resid, compute_uv=False))  # ascending: angles ascending
    from_sin = jnp.arcsin(jnp.clip(sin, 0.0, 1.0))
    from_cos = jnp.arccos(jnp.clip(cos, 0.0, 1.0))
    return jnp.where(sin * sin < 0.5, from_sin, from_cos)


def _difference_norm(u, s, vt, ur, sr, vtr) -> jax.Array:
    """``‖U S Vᵀ − U_r S_r V_rᵀ‖_F`` from both factorisations, without forming either matrix.

    The difference is ``A Bᵀ`` with ``A = [U S, −U_r S_r]``, ``B = [V, V_r]``; with QR of both,
    its norm is that of the small ``R_A R_Bᵀ``, so no cancellation between large sums occurs.
    """
    left = jnp.concatenate([u * s[None, :], -(ur * sr[None, :])], axis=1)
    right = jnp.concatenate([vt.T, vtr.T], axis=1)
    _, ra = jnp.linalg.qr(left)
    _, rb = jnp.linalg.qr(right)
    return jnp.linalg.norm(jnp.matmul(ra, rb.T, precision=HIGHEST))


def _reference_svd(reference, shape, dtype):
    """SVD of the reference update: a ``(d_in, d_out)`` matrix or factors ``(a, b, scale)``."""
    if isinstance(reference, tuple):
        if len(reference) != 3:
            raise ValueError(
                f"reference must be a (d_in, d_out) update or a tuple (a, b, scale), got a tuple "
                f"of {len(reference)}"
            )
        ra, rb, rscale = reference
        return _update_svd(shape, dtype, None, ra, rb, rscale)
    return _update_svd(shape, dtype, reference, None, None, 1.0, what="reference")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdapterReport:
    """Spectral summary of a LoRA update ΔW against its frozen weight W (a pytree; printable).

    Attributes:
      singular_values: ``(p,)`` singular values of ΔW, ``p = min(r, d_in, d_out)`` from factors or
        ``min(d_in, d_out)`` from ΔW.
      suggested_rank: int32, :func:`suggest_rank` of ΔW at ``energy``.
      stable_rank: stable rank of ΔW.
      effective_rank: effective rank of ΔW.
      relative_norm: ``‖ΔW‖_F / ‖W‖_F`` (None without ``w``).
      input_cosines: ``(q,)`` cosines of principal angles between ΔW's and W's top-q left singular
        subspaces (input side, ``R^{d_in}``), descending (None without ``w``).
      output_cosines: ``(q,)`` the same on the output side ``R^{d_out}`` (None without ``w``).
      amplification: ``‖ΔW‖_F / ‖U_qᵀ W V_q‖_F`` (Hu et al. 2021); inf if W has no energy there,
        0 for ΔW = 0 (None without ``w``).
      energy: the energy fraction used (static).
      reference_input_angles: ``(q,)`` principal angles (radians, ascending) between ΔW's and the
        reference update's top-q left singular subspaces, accurate for small angles (None without
        ``reference``).
      reference_output_angles: ``(q,)`` the same on the output side (None without ``reference``).
      reference_relative_error: ``‖ΔW − ΔW_ref‖_F / ‖ΔW_ref‖_F`` (None without ``reference``).
    """

    singular_values: jax.Array
    suggested_rank: jax.Array
    stable_rank: jax.Array
    effective_rank: jax.Array
    relative_norm: jax.Array | None
    input_cosines: jax.Array | None
    output_cosines: jax.Array | None
    amplification: jax.Array | None
    energy: float = dataclasses.field(default=0.9, metadata=dict(static=True))
    reference_input_angles: jax.Array | None = None
    reference_output_angles: jax.Array | None = None
    reference_relative_error: jax.Array | None = None

    def __str__(self) -> str:
        s = np.asarray(self.singular_values)
        shown = ", ".join(f"{v:.4g}" for v in s[:8]) + (", ..." if s.size > 8 else "")
        lines = [
            f"singular values of ΔW : {shown}",
            f"suggested rank        : {int(self.suggested_rank)} "
            f"(keeps {self.energy:.0%} of ‖ΔW‖_F²)",
            f"stable / effective    : {float(self.stable_rank):.3f} / "
            f"{float(self.effective_rank):.3f}",
        ]
        if self.relative_norm is not None:
            cos_in = ", ".join(f"{v:.3f}" for v in np.asarray(self.input_cosines))
            cos_out = ", ".join(f"{v:.3f}" for v in np.asarray(self.output_cosines))
            lines += [
                f"‖ΔW‖_F / ‖W‖_F        : {float(self.relative_norm):.4g}",
                f"cosines with W, input : {cos_in}",
                f"cosines with W, output: {cos_out}",
                f"amplification         : {float(self.amplification):.4g}",
            ]
        if self.reference_relative_error is not None:
            deg_in = np.degrees(np.asarray(self.reference_input_angles))
            deg_out = np.degrees(np.asarray(self.reference_output_angles))
            lines += [
                f"‖ΔW − ref‖ / ‖ref‖    : {float(self.reference_relative_error):.4g}",
                f"angles to ref (deg)   : max {deg_in.max():.3f} input, {deg_out.max():.3f} output",
            ]
        return "\n".join(lines)


def adapter_report(
    w: Any,
    *,
    delta_w: Any = None,
    a: Any = None,
    b: Any = None,
    scale: float = 1.0,
    top_k: int = 8,
    energy: float = 0.9,
    reference: Any = None,
) -> AdapterReport:
    """Spectral report on a LoRA update ΔW relative to its frozen weight ``w`` and a reference.

    Args:
      w: ``(d_in, d_out)`` frozen weight, or None to skip the comparisons with W (they need W's
        full SVD, by far the costliest part for large W).
      delta_w: ``(d_in, d_out)`` update; or give the factors instead:
      a: ``(r, d_in)`` adapter down-projection.
      b: ``(d_out, r)`` adapter up-projection.
      scale: the adapter scale (e.g. alpha / r) in ``ΔW = scale · (b @ a)ᵀ``.
      top_k: number ``q`` of singular directions compared (capped at the number ΔW has, and the
        reference has).
      energy: energy fraction for the suggested rank.
      reference: optional update ΔW_ref to compare ΔW with (e.g. the known answer in a synthetic
        task): a ``(d_in, d_out)`` matrix, or factors ``(a_ref (k, d_in), b_ref (d_out, k),
        scale_ref)`` with ``ΔW_ref = scale_ref · a_refᵀ b_refᵀ``. Adds the principal angles between
        the top-q singular subspaces and the relative error.

    Returns:
      :class:`AdapterReport` in f32 (f64 for f64 inputs).
    """
    top_k = _checks.check_positive_int(top_k, "top_k")
    energy = _check_energy(energy)
    if w is not None:
        w = _operator.check_matrix(w, "w")
        w = w.astype(_checks.accum_dtype(w.dtype))
    shape = None if w is None else w.shape
    u, s, vt = _update_svd(shape, None if w is None else w.dtype, delta_w, a, b, scale)
    dw_norm = jnp.sqrt(jnp.sum(s * s))
    q = min(top_k, s.shape[0])
    fields = dict(relative_norm=None, input_cosines=None, output_cosines=None, amplification=None)
    if w is not None:
        fields = _weight_alignment(w, u, s, vt, q, dw_norm)
    if reference is not None:
        ur, sr, vtr = _reference_svd(reference, (u.shape[0], vt.shape[1]), s.dtype)
        qr = min(q, sr.shape[0])
        ref_norm = jnp.sqrt(jnp.sum(sr * sr))
        err = _difference_norm(u, s, vt, ur, sr, vtr)
        fields.update(
            reference_input_angles=_principal_angles(u[:, :qr], ur[:, :qr]),
            reference_output_angles=_principal_angles(vt[:qr].T, vtr[:qr].T),
            reference_relative_error=jnp.where(
                ref_norm > 0, err / jnp.where(ref_norm > 0, ref_norm, 1.0), jnp.inf),
        )
    return AdapterReport(
        singular_values=s,
        suggested_rank=_rank_for_energy(s, energy),
        stable_rank=_metrics._stable_rank(s),
        effective_rank=_metrics._effective_rank(s),
        energy=energy,
        **fields,
    )


def _weight_alignment(w, u, s, vt, q, dw_norm) -> dict[str, jax.Array]:
    """The report's comparisons of ΔW (SVD ``u, s, vt``) with the frozen weight ``w``."""
    uw, _, vwt = jnp.linalg.svd(w, full_matrices=False)
    cos_in = jnp.linalg.svd(jnp.matmul(u[:, :q].T, uw[:, :q], precision=HIGHEST), compute_uv=False)
    cos_out = jnp.linalg.svd(jnp.matmul(vt[:q], vwt[:q].T, precision=HIGHEST), compute_uv=False)
    uw_proj = jnp.matmul(u[:, :q].T, w, precision=HIGHEST)
    projected = jnp.matmul(uw_proj, vt[:q].T, precision=HIGHEST)
    proj_norm = jnp.linalg.norm(projected)
    ratio = dw_norm / jnp.where(proj_norm > 0, proj_norm, 1.0)
    amplification = jnp.where(dw_norm == 0, 0.0, jnp.where(proj_norm > 0, ratio, jnp.inf))
    w_norm = jnp.linalg.norm(w)
    rel = jnp.where(w_norm > 0, dw_norm / jnp.where(w_norm > 0, w_norm, 1.0), jnp.inf)
    return dict(
        relative_norm=rel,
        input_cosines=jnp.clip(cos_in, 0.0, 1.0),
        output_cosines=jnp.clip(cos_out, 0.0, 1.0),
        amplification=amplification,
    )
