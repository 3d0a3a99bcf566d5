"""Pallas flash-attention backward kernels: dQ, and dK/dV summed over each GQA group.

Both recompute the probabilities from the saved logsumexp (``p = exp(s - lse)``) instead of storing
them, and accumulate in f32. ``delta = rowsum(dO·O) - dlse`` folds the cotangent of the returned
logsumexp into the usual softmax backward: ``dS = P ⊙ (dP - delta)``.

The dK/dV program owns one key block of one KV head and loops over the query heads of its group and
the query blocks that can see it, so GQA gradients are summed in registers without atomics or a
(B, S, N, H) intermediate.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxla.attention import _pallas_common as c


def _dq_kernel(*refs, plan: c.Plan):
    if plan.has_segments:
        q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
        qseg_ref = kvseg_ref = None
    bq, bk = plan.block_q_dq, plan.block_k_dq
    order = c.q_block_order(plan, plan.t_pad // bq)
    q_start = order(pl.program_id(c.block_axis(plan))) * bq
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]  # (bq, 1)
    delta = delta_ref[...]
    q_seg = None if qseg_ref is None else qseg_ref[...]

    def body(masked, j, dq):
        k_start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(k_start, bk), :]
        v = v_ref[pl.ds(k_start, bk), :]
        mask = c.tile_mask(plan, masked, q_start, k_start, (bq, bk), 0, lambda: q_seg,
                           lambda: kvseg_ref[:, pl.ds(k_start, bk)])
        p, t = c.probs(plan, c.dot_nt(q, k, plan), lse, mask)
        ds = p * (c.dot_nt(do, v, plan) - delta)
        if t is not None:
            ds = ds * (1.0 - t * t)
        return dq + c.dot_nn(ds.astype(k.dtype), k, plan)

    lo, hi = c.kv_block_range(plan, q_start, bq, bk)
    ulo, uhi = c.kv_unmasked_range(plan, q_start, bq, bk, lo, hi)
    dq = c.split_loop(lo, ulo, uhi, hi, lambda m: functools.partial(body, m),
                      jnp.zeros(q.shape, plan.acc))
    dq_ref[...] = (dq * plan.scale).astype(dq_ref.dtype)


def _dkdv_kernel(*refs, plan: c.Plan):
    if plan.has_segments:
        q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
        qseg_ref = kvseg_ref = None
    bq, bk = plan.block_q_dkv, plan.block_k_dkv
    k_start = pl.program_id(c.block_axis(plan)) * bk
    k = k_ref[...]
    v = v_ref[...]
    kv_seg = None if kvseg_ref is None else kvseg_ref[...]  # (bk, 1)
    btnh = plan.layout == "btnh"

    def rows(ref, g, q_start):
        if btnh:
            return ref[pl.ds(q_start, bq), g, :]
        return ref[g, pl.ds(q_start, bq), :]

    # Tiles are (key, query): s^T = k·q^T, so dV = P^T·dO and dK = dS^T·Q need no transposes.
    def q_body(masked, g, qb, carry):
        dk, dv = carry
        q_start = pl.multiple_of(qb * bq, bq)
        q = rows(q_ref, g, q_start)
        do = rows(do_ref, g, q_start)
        lse = lse_ref[g, :, pl.ds(q_start, bq)]  # (1, bq)
        delta = delta_ref[g, :, pl.ds(q_start, bq)]
        mask = c.tile_mask(plan, masked, q_start, k_start, (bk, bq), 1,
                           lambda: qseg_ref[:, pl.ds(q_start, bq)], lambda: kv_seg)
        p, t = c.probs(plan, c.dot_nt(k, q, plan), lse, mask)
        dv = dv + c.dot_nn(p.astype(do.dtype), do, plan)
        ds = p * (c.dot_nt(v, do, plan) - delta)
        if t is not None:
            ds = ds * (1.0 - t * t)
        dk = dk + c.dot_nn(ds.astype(q.dtype), q, plan)
        return dk, dv

    lo, hi = c.q_block_range(plan, k_start, bq, bk)
    ulo, uhi = c.q_unmasked_range(plan, k_start, bq, bk, lo, hi)

    def g_body(g, carry):
        return c.split_loop(lo, ulo, uhi, hi, lambda m: functools.partial(q_body, m, g), carry)

    init = (jnp.zeros(k.shape, plan.acc), jnp.zeros(v.shape, plan.acc))
    dk, dv = lax.fori_loop(0, plan.groups, g_body, init)
    dk_ref[...] = (dk * plan.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def flash_backward(q, k, v, q_seg, kv_seg, out, lse, d_out, d_lse, plan: c.Plan):
    """Gradients of the padded forward: returns ``(dq, dk, dv)`` in the inputs' layouts and dtypes.

    ``lse``/``d_lse`` are (B, N, Tp, 1) f32; the other arrays are as in ``flash_forward``.
    """
    batch = q.shape[0]
    btnh = plan.layout == "btnh"
    heads = q.shape[2] if btnh else q.shape[1]
    kv_heads = k.shape[2] if btnh else k.shape[1]
    hd, hv = q.shape[-1], v.shape[-1]
    g = plan.groups
    delta = jnp.sum(d_out.astype(plan.acc) * out.astype(plan.acc), axis=-1)
    if btnh:  # (B, Tp, N) -> (B, N, Tp), the stats layout
        delta = jnp.swapaxes(delta, 1, 2)
    delta = c.as_column(delta) - d_lse

    bq, bk = plan.block_q_dq, plan.block_k_dq
    qi = c.q_block_order(plan, plan.t_pad // bq)
    seg_specs, segs = [], []
    if plan.has_segments:
        seg_specs = [
            c.seg_spec(plan, bq, lambda b, h, i: qi(i), row=False),
            c.seg_spec(plan, plan.s_pad, lambda b, h, i: 0, row=True),
        ]
        segs = [c.as_column(q_seg), c.as_row(kv_seg)]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, plan=plan),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=c.grid(plan, batch, heads, plan.t_pad // bq),
        in_specs=[
            c.seq_spec(plan, bq, hd, lambda b, h, i: (h, qi(i))),
            c.seq_spec(plan, plan.s_pad, hd, lambda b, h, i: (h // g, 0)),
            c.seq_spec(plan, plan.s_pad, hv, lambda b, h, i: (h // g, 0)),
            *seg_specs,
            c.seq_spec(plan, bq, hv, lambda b, h, i: (h, qi(i))),
            c.stat_spec(plan, bq, lambda b, h, i: (h, qi(i))),
            c.stat_spec(plan, bq, lambda b, h, i: (h, qi(i))),
        ],
        out_specs=c.seq_spec(plan, bq, hd, lambda b, h, i: (h, qi(i))),
        **c.call_kwargs(plan, backward=True, name="jaxla_flash_dq"),
    )(q, k, v, *segs, d_out, lse, delta)

    bq, bk = plan.block_q_dkv, plan.block_k_dkv
    if plan.has_segments:
        seg_specs = [
            c.seg_spec(plan, plan.t_pad, lambda b, h, i: 0, row=True),
            c.seg_spec(plan, bk, lambda b, h, i: i, row=False),
        ]
        segs = [c.as_row(q_seg), c.as_column(kv_seg)]
    # The key-block kernel reads the statistics as rows: (B, N, Tp, 1) -> (B, N, 1, Tp) is free.
    lse_row, delta_row = (x.reshape(batch, heads, 1, plan.t_pad) for x in (lse, delta))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, plan=plan),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        grid=c.grid(plan, batch, kv_heads, plan.s_pad // bk),
        in_specs=[
            c.seq_spec(plan, plan.t_pad, hd, lambda b, h, i: (h, 0), head_block=g),
            c.seq_spec(plan, bk, hd, lambda b, h, i: (h, i)),
            c.seq_spec(plan, bk, hv, lambda b, h, i: (h, i)),
            *seg_specs,
            c.seq_spec(plan, plan.t_pad, hv, lambda b, h, i: (h, 0), head_block=g),
            c.stat_spec(plan, plan.t_pad, lambda b, h, i: (h, 0), head_block=g, row=True),
            c.stat_spec(plan, plan.t_pad, lambda b, h, i: (h, 0), head_block=g, row=True),
        ],
        out_specs=[
            c.seq_spec(plan, bk, hd, lambda b, h, i: (h, i)),
            c.seq_spec(plan, bk, hv, lambda b, h, i: (h, i)),
        ],
        **c.call_kwargs(plan, backward=True, name="jaxla_flash_dkdv"),
    )(q, k, v, *segs, d_out, lse_row, delta_row)
    return dq, dk, dv
