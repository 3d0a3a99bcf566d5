"""Mosaic TPU flash attention: key (or query) blocks as an "arbitrary" grid axis, stats in VMEM.

The Triton kernels (``_pallas_fwd``/``_pallas_bwd``) loop over key blocks inside one program with
the whole K and V of a head as one block, which on TPU means the whole K/V (forward) or Q/dO
(backward) in VMEM: 16 MiB at S = 16k, H = 128 in the forward, four times that for a GQA group in
the backward. Here, as in jax's own Pallas TPU flash attention, the inner loop is the last grid
axis instead, marked "arbitrary" (sequential on a core, so the scratch carries over): each step
DMAs one (block, H) tile of K/V (or Q/dO), and the running state lives in VMEM scratch:

- forward: grid (B, N, Tp/bq, Sp/bk); m and l as (bq, 128) lane-replicated f32 (a (bq, 1) value
  would use one lane of every 128-lane vreg), acc (bq, Hv) f32; o and lse written at the last step;
- dQ: grid (B, N, Tp/bq, Sp/bk), a (bq, H) f32 accumulator;
- dK/dV: grid (B, K, Sp/bk, G·Tp/bq), the GQA group's query heads and query blocks folded into the
  one arbitrary axis, (bk, H) and (bk, Hv) f32 accumulators.

Blocks that causality, the window or padding hide are skipped (``pl.when``) and their index maps
are clamped into the visited range, so a skipped step re-names the block already in VMEM and
Pallas issues no DMA for it. The tile maths (base-2 scores, masks, empty rows) is shared with the
Triton kernels through ``_pallas_common``; the arrays are in the "bnth" layout.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxla.attention import _pallas_common as c

LANES = 128


def _lanes(x: jax.Array, width: int) -> jax.Array:
    """A (rows, 128) lane-replicated statistic as (rows, width)."""
    if width == LANES:
        return x
    if width % LANES == 0:
        return jnp.tile(x, (1, width // LANES))  # lane-aligned copies: no relayout on Mosaic
    return x[:, :width]


def _clamp_block(j, lo, hi, count: int):
    """The block index a step fetches: j inside [lo, hi), else the nearest visited block."""
    j = jnp.minimum(jnp.maximum(j, lo), jnp.maximum(hi - 1, lo))
    return jnp.minimum(jnp.maximum(j, 0), count - 1)


def _visit(lo, ulo, uhi, hi, j, step):
    """Runs ``step(masked)`` when block j is visited; unmasked inside [ulo, uhi)."""
    inside = jnp.logical_and(j >= lo, j < hi)
    unmasked = jnp.logical_and(j >= ulo, j < uhi)

    @pl.when(jnp.logical_and(inside, unmasked))
    def _():
        step(False)

    @pl.when(jnp.logical_and(inside, jnp.logical_not(unmasked)))
    def _():
        step(True)


# ---- forward ---------------------------------------------------------------------------------


def _fwd_kernel(*refs, plan: c.Plan):
    if plan.has_segments:
        (q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc) = refs
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
        qseg_ref = kvseg_ref = None
    bq, bk = plan.block_q, plan.block_k
    i, j = pl.program_id(2), pl.program_id(3)
    q_start, k_start = i * bq, j * bk
    hv = acc_sc.shape[-1]

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, m_sc.dtype)
        l_sc[...] = jnp.zeros(l_sc.shape, l_sc.dtype)
        acc_sc[...] = jnp.zeros(acc_sc.shape, acc_sc.dtype)

    def step(masked):
        s, _ = c.scores2(c.dot_nt(q_ref[...], k_ref[...], plan), plan)  # base 2
        mask = c.tile_mask(plan, masked, q_start, k_start, (bq, bk), 0, lambda: qseg_ref[...],
                           lambda: kvseg_ref[...])
        if mask is not None:
            s = jnp.where(mask, s, -jnp.inf)
        m_prev, l_prev = m_sc[...], l_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # (bq, 128)
        # Rows with no visible key so far keep m = -inf and shift by 0 (no -inf - -inf = NaN).
        m_shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = c.exp2(s - _lanes(m_shift, bk))
        alpha = c.exp2(m_prev - m_shift)
        l_sc[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
        m_sc[...] = m_new
        v = v_ref[...]
        acc_sc[...] = acc_sc[...] * _lanes(alpha, hv) + c.dot_nn(p.astype(v.dtype), v, plan)

    lo, hi = c.kv_block_range(plan, q_start, bq, bk)
    ulo, uhi = c.kv_unmasked_range(plan, q_start, bq, bk, lo, hi)
    _visit(lo, ulo, uhi, hi, j, step)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        l = l_sc[...]
        empty = l == 0.0  # no visible key: zeros out, lse = -inf
        l_safe = jnp.where(empty, 1.0, l)
        o_ref[...] = (acc_sc[...] / _lanes(l_safe, hv)).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(empty, -jnp.inf, (m_sc[...] + jnp.log2(l_safe)) * c.LN2)


def _kv_index(plan: c.Plan, bq: int, bk: int):
    """Index of the key block a (query block i, step j) program fetches (clamped, see module)."""
    count = plan.s_pad // bk

    def index(i, j):
        lo, hi = c.kv_block_range(plan, i * bq, bq, bk)
        return _clamp_block(j, lo, hi, count)

    return index


def flash_forward(q, k, v, q_seg, kv_seg, plan: c.Plan):
    """As ``_pallas_fwd.flash_forward`` for "bnth" arrays; lse comes back (B, N, Tp, 1)."""
    batch, heads, _, hd = q.shape
    hv = v.shape[-1]
    bq, bk, g = plan.block_q, plan.block_k, plan.groups
    kv_index = _kv_index(plan, bq, bk)
    sq = c.SQUEEZED
    in_specs = [
        pl.BlockSpec((sq, sq, bq, hd), lambda b, h, i, j: (b, h, i, 0)),
        pl.BlockSpec((sq, sq, bk, hd), lambda b, h, i, j: (b, h // g, kv_index(i, j), 0)),
        pl.BlockSpec((sq, sq, bk, hv), lambda b, h, i, j: (b, h // g, kv_index(i, j), 0)),
    ]
    args = [q, k, v]
    if plan.has_segments:
        in_specs += [
            pl.BlockSpec((sq, bq, 1), lambda b, h, i, j: (b, i, 0)),
            pl.BlockSpec((sq, 1, bk), lambda b, h, i, j: (b, 0, kv_index(i, j))),
        ]
        args += [c.as_column(q_seg), c.as_row(kv_seg)]
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, plan=plan),
        out_shape=[jax.ShapeDtypeStruct((batch, heads, plan.t_pad, hv), q.dtype),
                   jax.ShapeDtypeStruct((batch, heads, plan.t_pad, LANES), plan.acc)],
        grid=(batch, heads, plan.t_pad // bq, plan.s_pad // bk),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((sq, sq, bq, hv), lambda b, h, i, j: (b, h, i, 0)),
                   pl.BlockSpec((sq, sq, bq, LANES), lambda b, h, i, j: (b, h, i, 0))],
        scratch_shapes=[c.vmem((bq, LANES), plan.acc), c.vmem((bq, LANES), plan.acc),
                        c.vmem((bq, hv), plan.acc)],
        **c.call_kwargs(plan, backward=False, name="jaxla_flash_fwd", grid_rank=4),
    )(*args)
    return out, lse[..., :1]


# ---- backward --------------------------------------------------------------------------------


def _dq_kernel(*refs, plan: c.Plan):
    if plan.has_segments:
        (q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, do_ref, lse_ref, delta_ref, dq_ref,
         dq_sc) = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_sc = refs
        qseg_ref = kvseg_ref = None
    bq, bk = plan.block_q_dq, plan.block_k_dq
    i, j = pl.program_id(2), pl.program_id(3)
    q_start, k_start = i * bq, j * bk

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, dq_sc.dtype)

    def step(masked):
        k = k_ref[...]
        mask = c.tile_mask(plan, masked, q_start, k_start, (bq, bk), 0, lambda: qseg_ref[...],
                           lambda: kvseg_ref[...])
        p, t = c.probs(plan, c.dot_nt(q_ref[...], k, plan), lse_ref[...], mask)
        ds = p * (c.dot_nt(do_ref[...], v_ref[...], plan) - delta_ref[...])
        if t is not None:
            ds = ds * (1.0 - t * t)
        dq_sc[...] += c.dot_nn(ds.astype(k.dtype), k, plan)

    lo, hi = c.kv_block_range(plan, q_start, bq, bk)
    ulo, uhi = c.kv_unmasked_range(plan, q_start, bq, bk, lo, hi)
    _visit(lo, ulo, uhi, hi, j, step)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * plan.scale).astype(dq_ref.dtype)


def _dkdv_kernel(*refs, plan: c.Plan):
    if plan.has_segments:
        (q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
         dk_sc, dv_sc) = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_sc, dv_sc = refs
        qseg_ref = kvseg_ref = None
    bq, bk = plan.block_q_dkv, plan.block_k_dkv
    nq = plan.t_pad // bq
    j, r = pl.program_id(2), pl.program_id(3)
    qb = lax.rem(r, nq)  # step r: query head r // nq of the group, query block r % nq
    k_start, q_start = j * bk, qb * bq

    @pl.when(r == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, dk_sc.dtype)
        dv_sc[...] = jnp.zeros(dv_sc.shape, dv_sc.dtype)

    # Tiles are (key, query): s^T = k·q^T, so dV = P^T·dO and dK = dS^T·Q need no transposes.
    def step(masked):
        q, do = q_ref[...], do_ref[...]
        mask = c.tile_mask(plan, masked, q_start, k_start, (bk, bq), 1, lambda: qseg_ref[...],
                           lambda: kvseg_ref[...])
        p, t = c.probs(plan, c.dot_nt(k_ref[...], q, plan), lse_ref[...], mask)  # lse (1, bq)
        dv_sc[...] += c.dot_nn(p.astype(do.dtype), do, plan)
        ds = p * (c.dot_nt(v_ref[...], do, plan) - delta_ref[...])
        if t is not None:
            ds = ds * (1.0 - t * t)
        dk_sc[...] += c.dot_nn(ds.astype(q.dtype), q, plan)

    lo, hi = c.q_block_range(plan, k_start, bq, bk)
    ulo, uhi = c.q_unmasked_range(plan, k_start, bq, bk, lo, hi)
    _visit(lo, ulo, uhi, hi, qb, step)

    @pl.when(r == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = (dk_sc[...] * plan.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def flash_backward(q, k, v, q_seg, kv_seg, out, lse, d_out, d_lse, plan: c.Plan):
    """As ``_pallas_bwd.flash_backward`` for "bnth" arrays."""
    batch, heads, _, hd = q.shape
    kv_heads, hv, g = k.shape[1], v.shape[-1], plan.groups
    sq = c.SQUEEZED
    delta = jnp.sum(d_out.astype(plan.acc) * out.astype(plan.acc), axis=-1)  # (B, N, Tp)
    delta = c.as_column(delta) - d_lse

    bq, bk = plan.block_q_dq, plan.block_k_dq
    kv_index = _kv_index(plan, bq, bk)
    seg_specs, segs = [], []
    if plan.has_segments:
        seg_specs = [pl.BlockSpec((sq, bq, 1), lambda b, h, i, j: (b, i, 0)),
                     pl.BlockSpec((sq, 1, bk), lambda b, h, i, j: (b, 0, kv_index(i, j)))]
        segs = [c.as_column(q_seg), c.as_row(kv_seg)]
    col_spec = pl.BlockSpec((sq, sq, bq, 1), lambda b, h, i, j: (b, h, i, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, plan=plan),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(batch, heads, plan.t_pad // bq, plan.s_pad // bk),
        in_specs=[
            pl.BlockSpec((sq, sq, bq, hd), lambda b, h, i, j: (b, h, i, 0)),
            pl.BlockSpec((sq, sq, bk, hd), lambda b, h, i, j: (b, h // g, kv_index(i, j), 0)),
            pl.BlockSpec((sq, sq, bk, hv), lambda b, h, i, j: (b, h // g, kv_index(i, j), 0)),
            *seg_specs,
            pl.BlockSpec((sq, sq, bq, hv), lambda b, h, i, j: (b, h, i, 0)),
            col_spec,
            col_spec,
        ],
        out_specs=pl.BlockSpec((sq, sq, bq, hd), lambda b, h, i, j: (b, h, i, 0)),
        scratch_shapes=[c.vmem((bq, hd), plan.acc)],
        **c.call_kwargs(plan, backward=True, name="jaxla_flash_dq", grid_rank=4),
    )(q, k, v, *segs, d_out, lse, delta)

    bq, bk = plan.block_q_dkv, plan.block_k_dkv
    nq, nk = plan.t_pad // bq, plan.s_pad // bk

    def q_index(j, r):
        lo, hi = c.q_block_range(plan, j * bk, bq, bk)
        return _clamp_block(lax.rem(r, nq), lo, hi, nq)

    def head(h, r):
        return h * g + lax.div(r, nq)

    if plan.has_segments:
        seg_specs = [pl.BlockSpec((sq, 1, bq), lambda b, h, j, r: (b, 0, q_index(j, r))),
                     pl.BlockSpec((sq, bk, 1), lambda b, h, j, r: (b, j, 0))]
        segs = [c.as_row(q_seg), c.as_column(kv_seg)]
    # The key-block kernel reads the statistics as rows: (B, N, Tp, 1) -> (B, N, 1, Tp) is free.
    lse_row, delta_row = (x.reshape(batch, heads, 1, plan.t_pad) for x in (lse, delta))
    stat_spec = pl.BlockSpec((sq, sq, 1, bq), lambda b, h, j, r: (b, head(h, r), 0, q_index(j, r)))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, plan=plan),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        grid=(batch, kv_heads, nk, g * nq),
        in_specs=[
            pl.BlockSpec((sq, sq, bq, hd), lambda b, h, j, r: (b, head(h, r), q_index(j, r), 0)),
            pl.BlockSpec((sq, sq, bk, hd), lambda b, h, j, r: (b, h, j, 0)),
            pl.BlockSpec((sq, sq, bk, hv), lambda b, h, j, r: (b, h, j, 0)),
            *seg_specs,
            pl.BlockSpec((sq, sq, bq, hv), lambda b, h, j, r: (b, head(h, r), q_index(j, r), 0)),
            stat_spec,
            stat_spec,
        ],
        out_specs=[pl.BlockSpec((sq, sq, bk, hd), lambda b, h, j, r: (b, h, j, 0)),
                   pl.BlockSpec((sq, sq, bk, hv), lambda b, h, j, r: (b, h, j, 0))],
        scratch_shapes=[c.vmem((bk, hd), plan.acc), c.vmem((bk, hv), plan.acc)],
        **c.call_kwargs(plan, backward=True, name="jaxla_flash_dkdv", grid_rank=4),
    )(q, k, v, *segs, d_out, lse_row, delta_row)
    return dq, dk, dv
