"""The ``"chunked"`` backend: tiled online-softmax ("flash") attention in plain JAX.

Queries are cut into blocks of ``block_q`` positions and keys into blocks of ``block_k``. Every
(query block, key block) pair that the static causal/window band does not rule out is visited once by
a ``lax.scan`` over a list of pairs fixed at trace time; a running maximum and sum per query row (f32)
rescale the output accumulator, so the T×S score matrix never exists. Pairs entirely outside the band
are never computed; pairs entirely inside it skip the masking work (they run in a separate scan).

The backward pass (``jax.custom_vjp``) recomputes each tile's probabilities from the saved
logsumexp and accumulates dQ, dK, dV (and d bias) in one pass over the same pair list, so memory in the
sequence length is O(T + S) (plus the bias and its gradient when a bias is given).

Inside, all heads of a block are processed at once in the layout (B, K, T·G, H): a kv head's G query
heads are consecutive rows next to their position, so GQA needs no repeated K/V and every score tile
is a plain (B, K) batch of (t·G, s) matrices. Scores are kept in base-2 units
(``log2(e)`` folded into the scale) so the inner loop uses ``exp2``.

Dimension legend: B batch, T query length, S key length, N query heads, K kv heads, G = N // K,
H query/key head dim, Hv value head dim, t = block_q, s = block_k.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxla import _checks
from jaxla.attention import _masks, _reference, _vma
from jaxla.attention._args import AttentionArgs

_LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class ChunkedBlockSizes:
    """Tile sizes of the ``"chunked"`` implementation (and of ``"cpu"`` when passed to it).

    Any T and S work with any sizes: a length is cut into ``ceil(T / block_q)`` equal blocks (rounded
    up to a multiple of 8), padded and masked at the end; a length up to ``block_q`` is one block.
    The compiled ``"cpu"`` kernel takes ``block_q`` query positions (times the G query heads of a kv
    head) and ``block_k`` keys (rounded up to a multiple of 16) per tile; its defaults come from
    ``jaxla.attention._cpu.default_block_sizes``.

    Attributes:
      block_q: query positions per tile (all heads of those positions are processed together).
      block_k: key positions per tile.
    """

    block_q: int = 256
    block_k: int = 512

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            _checks.check_positive_int(getattr(self, name), f"ChunkedBlockSizes.{name}")

    @classmethod
    def default(cls, platform: str | None = None) -> ChunkedBlockSizes:
        """Defaults for ``platform`` ("cpu", "gpu", "tpu"; the default backend when None).

        The CPU sizes were chosen by measuring N=8, H=64 f32 on 2 cores, T=2048 and 4096, causal and
        not, with tiles from 64 to 1024 on a quiet machine: 256 queries × 512 keys was fastest or
        within noise of it (smaller tiles pay a fixed cost per loop step and, at 256 × 256, ran up
        to 2× slower at T=4096; larger ones waste more of the causal diagonal). Under heavy
        contention from other processes smaller tiles win instead, so measure on an idle machine.
        GPU/TPU use larger tiles for fewer, bigger loop steps (not tuned: there the Pallas kernel
        is the fast path).
        """
        platform = platform or jax.default_backend()
        return cls(256, 512) if platform == "cpu" else cls(512, 512)


def split_length(length: int, block: int) -> int:
    """Block size actually used for a length: equal blocks of at most ``block`` (multiple of 8)."""
    if length <= block:
        return length
    num = -(-length // block)
    return _round_up(-(-length // num), 8)


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static part of one call (a ``custom_vjp`` nondiff argument): options, true S and G, tiles."""

    scale: float
    band: _masks.Band
    softcap: float | None
    block_q: int
    block_k: int
    s_len: int  # S, the true key length (keys at or past it are padding)
    groups: int  # G = N // K


class _Operands(NamedTuple):
    """The arrays of one call in the tiled layout (padded to whole blocks); None where unused."""

    q: jax.Array  # (B, K, Tp·G, H)
    q_z: jax.Array | None  # q · scale · log2(e), when it can be folded in (f32/f64, no bias/softcap)
    k: jax.Array  # (B, K, Sp, H)
    v: jax.Array  # (B, K, Sp, Hv)
    bias: jax.Array | None  # (Bx, Kx, Tp or 1, Gx, Sp or 1)
    mask: jax.Array | None  # like bias, boolean
    q_seg: jax.Array | None  # (B, Tp)
    kv_seg: jax.Array | None  # (B, Sp)
    q_len: jax.Array | None  # (B,)
    kv_len: jax.Array | None  # (B,)

    @property
    def dynamic(self) -> bool:
        """Whether visibility depends on array values, so no block is known to be fully visible."""
        return any(x is not None for x in (self.mask, self.q_seg, self.q_len, self.kv_len))


class _BackwardOperands(NamedTuple):
    """What the backward pass adds to the operands, in the same tiled layout."""

    lse2: jax.Array  # (B, K, Tp·G) base-2 logsumexp, +inf on rows that see nothing
    do: jax.Array  # (B, K, Tp·G, Hv) output cotangent
    q_t: jax.Array  # (B, K, H, Tp·G), q transposed
    do_t: jax.Array  # (B, K, Hv, Tp·G)
    delta: jax.Array  # (B, K, Tp·G): rowsum(dO·O) - d lse


# ---- layout: (B, T, N, D) <-> (B, K, Tp·G, D), padded to whole blocks -----------------------------


def _pad_axis(x, axis, size, value=0):
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _q_layout(x, k, tp):
    b, t, n, d = x.shape
    x = _pad_axis(x.reshape(b, t, k, n // k, d), 1, tp)
    return jnp.transpose(x, (0, 2, 1, 3, 4)).reshape(b, k, tp * (n // k), d)


def _q_unlayout(x, t, g):
    b, k, rows, d = x.shape
    x = x.reshape(b, k, rows // g, g, d)[:, :, :t]
    return jnp.transpose(x, (0, 2, 1, 3, 4)).reshape(b, t, k * g, d)


def _rows(x, bq, g):
    """A (Bx, Kx, t or 1, G or 1, s) tile → (Bx, Kx, t·G, s), the row order of the score tiles."""
    x = jnp.broadcast_to(x, (*x.shape[:2], bq, g, x.shape[4]))
    return x.reshape(*x.shape[:2], bq * g, x.shape[4])


def _kv_layout(x, sp):
    return jnp.transpose(_pad_axis(x, 1, sp), (0, 2, 1, 3))


def _pair_layout(x, n, k, t, tp, s, sp, fill):
    """A bias or mask (Bx, Nx, Tx, Sx), broadcastable to BNTS, → (Bx, Kx, Tx', Gx, Sx')."""
    bx, nx, tx, sx = x.shape
    kx, gx = (k, n // k) if nx == n and n > 1 else (1, 1)
    x = jnp.transpose(x.reshape(bx, kx, gx, tx, sx), (0, 1, 3, 2, 4))
    if tx != 1:
        x = _pad_axis(x, 2, tp, fill)
    if sx != 1:
        x = _pad_axis(x, 4, sp, fill)
    return x


def _pair_unlayout(x, shape, t, s):
    _bx, _nx, tx, sx = shape
    x = x[:, :, : (t if tx != 1 else 1), :, : (s if sx != 1 else 1)]
    return jnp.transpose(x, (0, 1, 3, 2, 4)).reshape(shape)


def _tile(x, i, bq, j, bk):
    """Block (i, j) of a pair-laid-out bias/mask, keeping broadcast (size 1) axes as they are."""
    if x.shape[2] != 1:
        x = lax.dynamic_slice_in_dim(x, i * bq, bq, 2)
    if x.shape[4] != 1:
        x = lax.dynamic_slice_in_dim(x, j * bk, bk, 4)
    return x


# ---- one tile -------------------------------------------------------------------------------------


def _scores(cfg, ops, i, j, masked):
    """Scores of tile (i, j) in base-2 units (B, K, t·G, s), and tanh of the softcap (or None)."""
    bq, bk, g = cfg.block_q, cfg.block_k, cfg.groups
    acc = _checks.accum_dtype(ops.q.dtype)
    prescaled = ops.q_z is not None
    qb = lax.dynamic_slice_in_dim(ops.q_z if prescaled else ops.q, i * bq * g, bq * g, 2)
    kb = lax.dynamic_slice_in_dim(ops.k, j * bk, bk, 2)
    x = lax.dot_general(qb, kb, (((3,), (3,)), ((0, 1), (0, 1))), preferred_element_type=acc)
    tanh = None
    if prescaled:
        z = x
    elif ops.bias is None and cfg.softcap is None:
        z = x * jnp.asarray(cfg.scale * _LOG2E, acc)
    else:
        x = x * jnp.asarray(cfg.scale, acc)
        if ops.bias is not None:
            x = x + _rows(_tile(ops.bias, i, bq, j, bk), bq, g).astype(acc)
        if cfg.softcap is not None:
            tanh = jnp.tanh(x / cfg.softcap)
            x = cfg.softcap * tanh
        z = x * jnp.asarray(_LOG2E, acc)
    if masked:
        z = jnp.where(_rows(_visible(cfg, ops, i, j), bq, g), z, -jnp.inf)
    return kb, z, tanh


def _visible(cfg, ops, i, j):
    bq, bk = cfg.block_q, cfg.block_k
    q_pos, k_pos = _masks.positions(i * bq, bq), _masks.positions(j * bk, bk)
    vis = _masks.band_visible(q_pos, k_pos, cfg.band, cfg.s_len)[None, None, :, None, :]

    def block(x, start, size):
        return None if x is None else lax.dynamic_slice_in_dim(x, start, size, 1)

    dyn = _masks.dynamic_visible(
        q_pos, k_pos, q_len=ops.q_len, kv_len=ops.kv_len,
        q_seg=block(ops.q_seg, i * bq, bq), kv_seg=block(ops.kv_seg, j * bk, bk),
    )
    if dyn is not None:
        vis = vis & dyn[:, None, :, None, :]
    if ops.mask is not None:
        vis = vis & _tile(ops.mask, i, bq, j, bk)
    return vis


def _forward_pairs(cfg, ops, pairs, masked, carry):
    bk, r = cfg.block_k, cfg.block_q * cfg.groups

    def step(carry, ij):
        o, m, l = carry
        i, j = ij[0], ij[1]
        _, z, _ = _scores(cfg, ops, i, j, masked)
        m_old = lax.dynamic_slice_in_dim(m, i * r, r, 2)
        l_old = lax.dynamic_slice_in_dim(l, i * r, r, 2)
        o_old = lax.dynamic_slice_in_dim(o, i * r, r, 2)
        m_new = jnp.maximum(m_old, jnp.max(z, axis=-1))
        # A row that has seen only masked keys keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
        m_use = jnp.where(m_new == -jnp.inf, jnp.zeros_like(m_new), m_new)
        p = jnp.exp2(z - m_use[..., None])
        alpha = jnp.exp2(m_old - m_use)
        vb = lax.dynamic_slice_in_dim(ops.v, j * bk, bk, 2)
        pv = lax.dot_general(
            p.astype(vb.dtype), vb, (((3,), (2,)), ((0, 1), (0, 1))), preferred_element_type=o.dtype
        )
        o = lax.dynamic_update_slice_in_dim(o, o_old * alpha[..., None] + pv, i * r, 2)
        m = lax.dynamic_update_slice_in_dim(m, m_new, i * r, 2)
        l = lax.dynamic_update_slice_in_dim(l, alpha * l_old + jnp.sum(p, axis=-1), i * r, 2)
        return (o, m, l), None

    return lax.scan(step, carry, pairs)[0]


def _backward_pairs(cfg, ops, bops, pairs, masked, carry):
    bq, bk, g = cfg.block_q, cfg.block_k, cfg.groups
    r = bq * g
    # Batched (B, K) contractions over the tile's rows, i.e. the tile on the left transposed, take a
    # much slower path on XLA:CPU than plain row-by-column products. dK and dV are therefore built
    # transposed, (H, s) = Qᵀ·dS and (Hv, s) = dOᵀ·P, from Qᵀ and dOᵀ laid out once before the loop.
    contract_rows = (((3,), (2,)), ((0, 1), (0, 1)))

    def step(carry, ij):
        dq, dk_t, dv_t, dbias = carry
        i, j = ij[0], ij[1]
        kb, z, tanh = _scores(cfg, ops, i, j, masked)
        q_t = lax.dynamic_slice_in_dim(bops.q_t, i * r, r, 3)
        lse2 = lax.dynamic_slice_in_dim(bops.lse2, i * r, r, 2)
        p = jnp.exp2(z - lse2[..., None])
        dob = lax.dynamic_slice_in_dim(bops.do, i * r, r, 2)
        do_t = lax.dynamic_slice_in_dim(bops.do_t, i * r, r, 3)
        vb = lax.dynamic_slice_in_dim(ops.v, j * bk, bk, 2)
        delta = lax.dynamic_slice_in_dim(bops.delta, i * r, r, 2)
        dp = lax.dot_general(dob, vb, (((3,), (3,)), ((0, 1), (0, 1))), preferred_element_type=p.dtype)
        dx = p * (dp - delta[..., None])  # gradient w.r.t. the (soft-capped) logits
        if tanh is not None:
            dx = dx * (1 - tanh * tanh)
        if dbias is not None:
            tile = dx.reshape(*dx.shape[:2], bq, g, dx.shape[3])
            dbias = _add_tile(dbias, tile, i * bq, j * bk)
        ds = (dx * jnp.asarray(cfg.scale, dx.dtype)).astype(kb.dtype)
        dq_b = lax.dot_general(ds, kb, contract_rows, preferred_element_type=dq.dtype)
        dk_b = lax.dot_general(q_t, ds, contract_rows, preferred_element_type=dk_t.dtype)
        dv_b = lax.dot_general(do_t, p.astype(do_t.dtype), contract_rows,
                               preferred_element_type=dv_t.dtype)
        dq = _add_slice(dq, dq_b, 2, i * r)
        dk_t = _add_slice(dk_t, dk_b, 3, j * bk)
        dv_t = _add_slice(dv_t, dv_b, 3, j * bk)
        return (dq, dk_t, dv_t, dbias), None

    return lax.scan(step, carry, pairs)[0]


def _add_slice(x, update, axis, start):
    old = lax.dynamic_slice_in_dim(x, start, update.shape[axis], axis)
    return lax.dynamic_update_slice_in_dim(x, old + update, start, axis)


def _add_tile(dbias, dx, q_start, k_start):
    """Adds a tile's logit gradient into the (broadcast) bias gradient, summing broadcast axes."""
    axes = tuple(a for a in range(5) if dbias.shape[a] == 1 and dx.shape[a] != 1)
    dx = jnp.sum(dx, axis=axes, keepdims=True)
    zero = jnp.zeros((), jnp.int32)
    start = (zero, zero, q_start if dbias.shape[2] != 1 else zero, zero,
             k_start if dbias.shape[4] != 1 else zero)
    old = lax.dynamic_slice(dbias, start, dx.shape)
    return lax.dynamic_update_slice(dbias, old + dx.astype(dbias.dtype), start)


# ---- custom_vjp -----------------------------------------------------------------------------------


def _plan(cfg, t, s, dynamic_mask):
    nq, nk = -(-t // cfg.block_q), -(-s // cfg.block_k)
    full, partial = _masks.classify_blocks(
        nq, nk, cfg.block_q, cfg.block_k, t=t, s=s, band=cfg.band
    )
    if dynamic_mask:
        full, partial = [], full + partial
    as_array = lambda pairs: jnp.asarray(np.asarray(pairs, np.int32).reshape(-1, 2))  # noqa: E731
    return [(as_array(p), masked) for p, masked in ((full, False), (partial, True)) if p]


def _operands(cfg, q, k, v, bias, mask, q_seg, kv_seg, q_len, kv_len) -> _Operands:
    _b, t, n, _ = q.shape
    s, kh = k.shape[1], k.shape[2]
    tp, sp = _round_up(t, cfg.block_q), _round_up(s, cfg.block_k)
    lay = partial(_pair_layout, n=n, k=kh, t=t, tp=tp, s=s, sp=sp)
    # Folding scale·log2(e) into Q once saves a pass over every score tile. Only where Q's own
    # precision makes the extra rounding invisible (f32/f64), and when no bias/softcap needs the
    # logits in natural units.
    q_z = None
    if bias is None and cfg.softcap is None and jnp.dtype(q.dtype) in (jnp.float32, jnp.float64):
        q_z = _q_layout(q * jnp.asarray(cfg.scale * _LOG2E, q.dtype), kh, tp)
    return _Operands(
        q=_q_layout(q, kh, tp),
        q_z=q_z,
        k=_kv_layout(k, sp),
        v=_kv_layout(v, sp),
        bias=None if bias is None else lay(bias, fill=0),
        mask=None if mask is None else lay(mask, fill=False),
        q_seg=None if q_seg is None else _pad_axis(q_seg, 1, tp),
        kv_seg=None if kv_seg is None else _pad_axis(kv_seg, 1, sp),
        q_len=q_len,
        kv_len=kv_len,
    )


def _round_up(x, m):
    return -(-x // m) * m


def _fwd_impl(cfg, q, k, v, bias, mask, q_seg, kv_seg, q_len, kv_len):
    ops = _operands(cfg, q, k, v, bias, mask, q_seg, kv_seg, q_len, kv_len)
    acc = _checks.accum_dtype(q.dtype)
    b, kh, rows, _ = ops.q.shape
    # Fresh carries vary (inside shard_map) over the mesh axes the operands vary over.
    o, m, l = (_vma.like(x, q, k, v, bias, mask, q_seg, kv_seg, q_len, kv_len) for x in (
        jnp.zeros((b, kh, rows, v.shape[-1]), acc), jnp.full((b, kh, rows), -jnp.inf, acc),
        jnp.zeros((b, kh, rows), acc)))
    for pairs, masked in _plan(cfg, q.shape[1], k.shape[1], ops.dynamic):
        o, m, l = _forward_pairs(cfg, ops, pairs, masked, (o, m, l))
    # l == 0 exactly when a row saw no visible key; a NaN l (non-finite input) is not empty and
    # gives a NaN output and logsumexp.
    empty = l == 0
    safe_l = jnp.where(empty, jnp.ones_like(l), l)
    out = _q_unlayout(o / safe_l[..., None], q.shape[1], cfg.groups).astype(q.dtype)
    # +inf for rows that see nothing: exp2(z - lse2) is then 0 in the backward pass, never NaN.
    lse2 = jnp.where(empty, jnp.full_like(m, jnp.inf), m + jnp.log2(safe_l))
    return out, lse2


def _lse_natural(cfg, lse2, t):
    return _q_unlayout(_reference.lse_from_base2(lse2)[..., None], t, cfg.groups)[..., 0]


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, bias, mask, q_seg, kv_seg, q_len, kv_len):
    out, lse2 = _fwd_impl(cfg, q, k, v, bias, mask, q_seg, kv_seg, q_len, kv_len)
    return out, _lse_natural(cfg, lse2, q.shape[1])


def _flash_fwd(cfg, q, k, v, bias, mask, q_seg, kv_seg, q_len, kv_len):
    out, lse2 = _fwd_impl(cfg, q, k, v, bias, mask, q_seg, kv_seg, q_len, kv_len)
    res = (q, k, v, bias, mask, q_seg, kv_seg, q_len, kv_len, out, lse2)
    return (out, _lse_natural(cfg, lse2, q.shape[1])), res


def _flash_bwd(cfg, res, cotangents):
    q, k, v, bias, mask, q_seg, kv_seg, q_len, kv_len, out, lse2 = res
    d_out, d_lse = cotangents
    ops = _operands(cfg, q, k, v, bias, mask, q_seg, kv_seg, q_len, kv_len)
    acc = lse2.dtype
    t, s, kh, g = q.shape[1], k.shape[1], k.shape[2], cfg.groups
    tp = ops.q.shape[2] // g
    do = _q_layout(d_out.astype(v.dtype), kh, tp)
    delta = _reference.output_delta(d_out, out, d_lse, acc)
    bops = _BackwardOperands(
        lse2=lse2, do=do, q_t=jnp.swapaxes(ops.q, 2, 3), do_t=jnp.swapaxes(do, 2, 3),
        delta=_q_layout(delta[..., None], kh, tp)[..., 0],
    )
    varying = (q, k, v, bias, mask, q_seg, kv_seg, q_len, kv_len, d_out, d_lse)
    dq = _vma.like(jnp.zeros(ops.q.shape, acc), *varying)
    dk = _vma.like(jnp.zeros(bops.q_t.shape[:2] + ops.k.shape[3:] + ops.k.shape[2:3], acc), *varying)
    dv = _vma.like(jnp.zeros(bops.do_t.shape[:2] + ops.v.shape[3:] + ops.v.shape[2:3], acc), *varying)
    dbias = None if bias is None else _vma.like(jnp.zeros(ops.bias.shape, acc), *varying)
    for pairs, masked in _plan(cfg, t, s, ops.dynamic):
        dq, dk, dv, dbias = _backward_pairs(cfg, ops, bops, pairs, masked, (dq, dk, dv, dbias))
    dq = _q_unlayout(dq, t, g).astype(q.dtype)
    dk = jnp.transpose(dk[..., :s], (0, 3, 1, 2)).astype(k.dtype)
    dv = jnp.transpose(dv[..., :s], (0, 3, 1, 2)).astype(v.dtype)
    if dbias is not None:
        dbias = _pair_unlayout(dbias, bias.shape, t, s).astype(bias.dtype)
    dq, dk, dv, dbias = (_vma.cotangent(g, x) for g, x in ((dq, q), (dk, k), (dv, v), (dbias, bias)))
    return dq, dk, dv, dbias, None, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def unsupported_reason(args: AttentionArgs, *, platform: str) -> str | None:
    """Plain JAX: every argument on every platform."""
    del args, platform
    return None


def attend(args: AttentionArgs, *, block_sizes: ChunkedBlockSizes | None = None):
    """The backend entry point (see ``_base``): out (B, T, N, Hv), lse (B, T, N).

    Args:
      args: the canonical arguments.
      block_sizes: tile sizes; ``ChunkedBlockSizes.default()`` when None.
    """
    sizes = block_sizes or ChunkedBlockSizes.default()
    cfg = _Config(
        scale=args.scale,
        band=args.band,
        softcap=args.softcap,
        block_q=split_length(args.q_len, sizes.block_q),
        block_k=split_length(args.kv_len, sizes.block_k),
        s_len=args.kv_len,
        groups=args.num_heads // args.num_kv_heads,
    )
    return _flash(cfg, args.query, args.key, args.value, args.bias, args.mask, args.q_segment_ids,
                  args.kv_segment_ids, args.query_seq_lengths, args.key_value_seq_lengths)
