"""Pallas flash-attention forward kernel: online softmax over key blocks, logsumexp saved.

One program handles ``block_q`` query rows of one (batch, query head) and loops over the key blocks
that can be visible to them (blocks hidden by causality, the window or padding are never loaded).
The kernel body is shared by Triton, Mosaic TPU and interpret mode; only the ``pallas_call`` keywords
and the array layout differ (see ``_pallas_common.Plan``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxla.attention import _pallas_common as c


def _fwd_kernel(*refs, plan: c.Plan):
    if plan.has_segments:
        q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, o_ref, lse_ref = refs
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref = refs
        qseg_ref = kvseg_ref = None
    bq, bk = plan.block_q, plan.block_k
    order = c.q_block_order(plan, plan.t_pad // bq)
    q_start = order(pl.program_id(c.block_axis(plan))) * bq
    q = q_ref[...]
    hv = v_ref.shape[-1]
    q_seg = None if qseg_ref is None else qseg_ref[...]  # (bq, 1)

    def body(masked, j, carry):
        m_prev, l_prev, acc = carry
        k_start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(k_start, bk), :]
        v = v_ref[pl.ds(k_start, bk), :]
        s, _ = c.scores2(c.dot_nt(q, k, plan), plan)  # base 2: m, s in log2 units
        mask = c.tile_mask(plan, masked, q_start, k_start, (bq, bk), 0, lambda: q_seg,
                           lambda: kvseg_ref[:, pl.ds(k_start, bk)])
        if mask is not None:
            s = jnp.where(mask, s, -jnp.inf)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        # Rows that have seen no visible key yet keep m = -inf; shift them by 0 instead so that
        # exp2() sees -inf - 0 = -inf (→ 0) and never -inf - (-inf) = NaN.
        m_shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = c.exp2(s - m_shift)
        alpha = c.exp2(m_prev - m_shift)
        l_new = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
        acc = acc * alpha + c.dot_nn(p.astype(v.dtype), v, plan)
        return m_new, l_new, acc

    lo, hi = c.kv_block_range(plan, q_start, bq, bk)
    init = (
        jnp.full((bq, 1), -jnp.inf, plan.acc),
        jnp.zeros((bq, 1), plan.acc),
        jnp.zeros((bq, hv), plan.acc),
    )
    ulo, uhi = c.kv_unmasked_range(plan, q_start, bq, bk, lo, hi)
    m, l, acc = c.split_loop(lo, ulo, uhi, hi, lambda m: functools.partial(body, m), init)
    # A row with no visible key has l == 0 and acc == 0: it returns zeros and lse = -inf.
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc / l_safe).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, -jnp.inf, (m + jnp.log2(l_safe)) * c.LN2)


def flash_forward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_seg: jax.Array | None,
    kv_seg: jax.Array | None,
    plan: c.Plan,
) -> tuple[jax.Array, jax.Array]:
    """Runs the forward kernel on padded arrays in ``plan.layout``.

    Args:
      q: (B, Tp, N, H) for "btnh" or (B, N, Tp, H) for "bnth"; Tp = ``plan.t_pad``.
      k: (B, Sp, K, H) or (B, K, Sp, H); Sp = ``plan.s_pad``.
      v: (B, Sp, K, Hv) or (B, K, Sp, Hv).
      q_seg: (B, Tp) int32 or None (present iff ``plan.has_segments``).
      kv_seg: (B, Sp) int32 or None.
      plan: the static launch description.

    Returns:
      ``(out, lse)``: out like ``q`` with width Hv in q's dtype; lse (B, N, Tp, 1) f32.
    """
    batch = q.shape[0]
    heads = q.shape[2] if plan.layout == "btnh" else q.shape[1]
    hd, hv = q.shape[-1], v.shape[-1]
    bq, g = plan.block_q, plan.groups
    qi = c.q_block_order(plan, plan.t_pad // bq)
    in_specs = [
        c.seq_spec(plan, bq, hd, lambda b, h, i: (h, qi(i))),
        c.seq_spec(plan, plan.s_pad, hd, lambda b, h, i: (h // g, 0)),
        c.seq_spec(plan, plan.s_pad, hv, lambda b, h, i: (h // g, 0)),
    ]
    args = [q, k, v]
    if plan.has_segments:
        in_specs += [
            c.seg_spec(plan, bq, lambda b, h, i: qi(i), row=False),
            c.seg_spec(plan, plan.s_pad, lambda b, h, i: 0, row=True),
        ]
        args += [c.as_column(q_seg), c.as_row(kv_seg)]
    o_shape = (*q.shape[:-1], hv)
    out_shape = [
        jax.ShapeDtypeStruct(o_shape, q.dtype),
        jax.ShapeDtypeStruct((batch, heads, plan.t_pad, 1), plan.acc),
    ]
    out_specs = [
        c.seq_spec(plan, bq, hv, lambda b, h, i: (h, qi(i))),
        c.stat_spec(plan, bq, lambda b, h, i: (h, qi(i))),
    ]
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, plan=plan),
        out_shape=out_shape,
        grid=c.grid(plan, batch, heads, plan.t_pad // bq),
        in_specs=in_specs,
        out_specs=out_specs,
        **c.call_kwargs(plan, backward=False, name="jaxla_flash_fwd"),
    )(*args)
    return out, lse
