"""Ring attention: the sequence split over a mesh axis, key/value blocks rotating around the ring.

Used inside ``jax.shard_map`` with the sequence axis of query, key and value sharded over
``axis_name`` (P devices, the "ring"). Device i holds its query rows and one key/value block; at each
of P steps it attends its queries to the block it holds (with :func:`dot_product_attention` and
``return_residual=True``, so any backend computes the block) and passes the block to device i + 1
with ``lax.ppermute``. The partial results ``(out_j, lse_j)`` are merged by the online-softmax rule

    lse = logaddexp(lse_a, lse_b),   out = out_a · exp(lse_a - lse) + out_b · exp(lse_b - lse)

in float32 (float64 for float64 inputs), so no device ever holds more than its own T/P queries and
one T/P block of keys: memory per device is O(T / P).

The backward pass (``jax.custom_vjp``) runs the ring again: each device recomputes its block with the
backend's own VJP, given the cotangents of the block's (out, lse) that the merge implies
(``w = exp(lse_j - lse)``: ``d out_j = w · d out``, ``d lse_j = w · (<d out, out_j> - <d out, out>
+ d lse)``), adds to dQ locally, and sends the block's dK/dV accumulators around the ring with the
block, so after P rotations every device holds the gradient of its own keys and values.

Causal attention. With ``layout="contiguous"`` device i holds positions ``[i·c, (i+1)·c)`` (c = T/P);
blocks from later devices are skipped (``lax.cond``), so device P-1 does P block steps and device 0
one. ``layout="zigzag"`` balances this: the sequence is cut into 2P chunks of c = T/(2P) and device i
holds chunks i and 2P-1-i (in that order). Then every step other than the diagonal is exactly half a
block for every device (queries vs the first half of the keys when the block comes from an earlier
device, the second half of the queries vs all keys when from a later one), and the diagonal step is
plain causal attention on the local rows. :func:`to_ring_layout` / :func:`from_ring_layout` permute
a global sequence into and out of the layout before sharding / after gathering.

Dimension legend: B batch, T global sequence length, P ring size (devices on ``axis_name``),
Tl = T / P local length, N query heads, K kv heads (N a multiple of K), H query/key head dim,
Hv value head dim.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from jaxla import _checks
from jaxla.attention import _vma
from jaxla.attention._chunked import ChunkedBlockSizes
from jaxla.attention._reference import EMPTY_ROW_LSE

LAYOUTS = ("contiguous", "zigzag")


@dataclasses.dataclass(frozen=True)
class _Config:
    """The static part of one ring call (a ``custom_vjp`` nondiff argument)."""

    axis_name: object
    ring_size: int
    causal: bool
    zigzag: bool
    scale: float | None
    softcap: float | None
    implementation: str | None
    block_sizes: ChunkedBlockSizes | None


# ---- the global layout --------------------------------------------------------------------------


def _layout_index(length: int, ring_size: int, layout: str, name: str):
    if not isinstance(ring_size, int) or isinstance(ring_size, bool) or ring_size < 1:
        raise ValueError(f"ring_size must be a positive int, got {ring_size!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    parts = 2 * ring_size if layout == "zigzag" else ring_size
    if length % parts:
        raise ValueError(
            f"{name} has sequence length {length}, which the {layout!r} layout over a ring of "
            f"{ring_size} devices cannot split: it must be a multiple of {parts}"
            + (" (2 chunks per device)" if layout == "zigzag" else "")
            + "; pad the sequence (and hide the padding with segment_ids) to a multiple"
        )
    c = length // parts
    chunks = jnp.arange(length).reshape(parts, c)
    if layout == "contiguous":
        return chunks.reshape(-1)
    order = [x for i in range(ring_size) for x in (i, parts - 1 - i)]
    return chunks[jnp.asarray(order)].reshape(-1)


def to_ring_layout(x, *, ring_size: int, layout: str = "zigzag", axis: int = 1) -> jax.Array:
    """Permutes a global sequence into the order :func:`ring_attention` expects, before sharding it.

    ``"zigzag"``: the T positions are cut into 2P chunks of T/(2P), and the result holds chunks
    ``0, 2P-1, 1, 2P-2, ..., P-1, P``, so splitting it evenly over P devices gives device i chunks
    i and 2P-1-i. ``"contiguous"``: the identity (device i gets positions ``[i·T/P, (i+1)·T/P)``).
    Apply it to query, key, value and segment ids alike; :func:`from_ring_layout` undoes it.

    Args:
      x: an array with the sequence (length T) on ``axis``, e.g. BTNH or segment ids (B, T).
      ring_size: P, the number of devices on the ring axis.
      layout: ``"zigzag"`` or ``"contiguous"``.
      axis: the sequence axis of ``x``.

    Raises:
      ValueError: T is not a multiple of 2P (zigzag) or P (contiguous), or a bad layout/ring_size.
    """
    x = _checks.as_array(x, "x")
    axis = _axis(x, axis)
    index = _layout_index(x.shape[axis], ring_size, layout, "x")
    return jnp.take(x, index, axis=axis)


def from_ring_layout(x, *, ring_size: int, layout: str = "zigzag", axis: int = 1) -> jax.Array:
    """Undoes :func:`to_ring_layout`: a gathered result in ring order → the natural sequence order.

    Args and Raises: as :func:`to_ring_layout`.
    """
    x = _checks.as_array(x, "x")
    axis = _axis(x, axis)
    index = _layout_index(x.shape[axis], ring_size, layout, "x")
    return jnp.take(x, jnp.argsort(index), axis=axis)


def _axis(x, axis):
    if not isinstance(axis, int) or not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis must be an int in [-{x.ndim}, {x.ndim}) for x of shape {x.shape}, "
                         f"got {axis!r}")
    return axis % x.ndim


# ---- the public function ------------------------------------------------------------------------


def ring_attention(
    query,
    key,
    value,
    *,
    axis_name,
    is_causal: bool = False,
    segment_ids=None,
    logits_soft_cap: float | None = None,
    scale: float | None = None,
    layout: str = "contiguous",
    implementation: str | None = None,
    block_sizes: ChunkedBlockSizes | None = None,
    return_residual: bool = False,
):
    """Attention over a sequence split across the devices of ``axis_name``; call inside ``shard_map``.

    Equals :func:`dot_product_attention` on the gathered sequence (values and gradients, in the
    global order the layout defines), while each device holds only its T/P rows and one T/P block of
    keys at a time (see the module docstring for the algorithm and the layouts).

    Dimension legend: B batch, T global sequence length, P devices on ``axis_name``, Tl = T/P local
    length, N query heads, K kv heads (N a multiple of K), H head dim, Hv value head dim.

    Args:
      query: the local block BTlNH (or TlNH); its sequence axis is sharded over ``axis_name``.
      key: the local block BTlKH (or TlKH), same local length as query.
      value: BTlKHv (or TlKHv).
      axis_name: the ``shard_map`` mesh axis the sequence is split over (the ring).
      is_causal: key j visible to query i only if ``j <= i`` in global positions.
      segment_ids: local int ids (B, Tl) ((Tl,) for rank 3), or a pair (query ids, key ids), each
        sharded like the sequence; tokens attend only within their segment. Padding the sequence
        to a multiple of P (2P for zigzag) is the caller's: give the padding its own segment id.
      logits_soft_cap, scale, implementation, block_sizes: as in :func:`dot_product_attention`
        (``implementation`` picks the backend of every block computation). "xla", "chunked" and
        "cpu" run under shard_map's default ``check_vma=True`` (the compiled kernel types its
        results as varying over the axes its operands vary over) as well as with
        ``check_vma=False``. "pallas" needs ``check_vma=False`` (its kernels' outputs are not
        typed yet); with ``check_vma=True`` None runs the blocks with "chunked" on a Pallas
        platform.
      layout: ``"contiguous"`` (device i holds global positions ``[i·Tl, (i+1)·Tl)``) or
        ``"zigzag"`` (device i holds chunks i and 2P-1-i of T/(2P) positions; balances causal work;
        build it with :func:`to_ring_layout`). Only matters for causal attention.
      return_residual: also return the logsumexp (B, Tl, N) of each row.

    Returns:
      The local output BTlNHv (TlNHv) in the query dtype, and with ``return_residual`` the
      logsumexp in float32 (float64 for float64 inputs), ``EMPTY_ROW_LSE`` for rows that see nothing.

    Raises:
      ValueError / TypeError: ``axis_name`` not bound by an enclosing ``shard_map``, query and key
        local lengths that differ, an odd local length with ``layout="zigzag"``, a bad layout, or
        any argument :func:`dot_product_attention` rejects. A global length that does not split
        evenly over the ring is refused by ``shard_map`` (and by :func:`to_ring_layout`, which
        says which multiple to pad to); the padding is the caller's (give it its own segment id).

    Example (inside ``jax.shard_map(f, mesh=mesh, in_specs=P(None, "sp"), out_specs=P(None, "sp"))``
    with ``q, k, v = (to_ring_layout(x, ring_size=P) for x in (q, k, v))``):
      >>> out = ring_attention(q, k, v, axis_name="sp", is_causal=True, layout="zigzag")  # doctest: +SKIP
    """
    try:
        ring_size = lax.axis_size(axis_name)
    except NameError:
        raise ValueError(
            f"ring_attention: axis_name={axis_name!r} is not a mesh axis bound here; call it inside "
            "jax.shard_map over a mesh with that axis, with the sequence sharded over it"
        ) from None
    if layout not in LAYOUTS:
        raise ValueError(f"ring_attention: layout must be one of {LAYOUTS}, got {layout!r}")
    query = _checks.as_array(query, "query")
    key = _checks.as_array(key, "key")
    value = _checks.as_array(value, "value")
    batched = query.ndim == 4
    if query.ndim not in (3, 4) or key.ndim != query.ndim or value.ndim != query.ndim:
        raise ValueError(
            "ring_attention: query, key and value must all be BTlNH (rank 4) or TlNH (rank 3); got "
            f"query {query.shape}, key {key.shape}, value {value.shape}"
        )
    if not batched:
        query, key, value = query[None], key[None], value[None]
    if key.shape[1] != query.shape[1]:
        raise ValueError(
            "ring_attention: query and key must have the same local length Tl (the sequence is "
            f"split the same way); got query {query.shape}, key {key.shape}"
        )
    zigzag = layout == "zigzag" and bool(is_causal)
    if zigzag and query.shape[1] % 2:
        raise ValueError(
            f"ring_attention: layout='zigzag' needs an even local length (2 chunks per device), "
            f"got Tl={query.shape[1]} (query {query.shape}); use to_ring_layout on a sequence whose "
            f"length is a multiple of 2P = {2 * ring_size}"
        )
    q_seg = kv_seg = None
    if segment_ids is not None:
        if isinstance(segment_ids, tuple | list) and len(segment_ids) == 2:
            q_seg, kv_seg = segment_ids
        else:
            q_seg = kv_seg = segment_ids
        q_seg = _checks.as_array(q_seg, "query segment_ids")
        kv_seg = _checks.as_array(kv_seg, "key segment_ids")
        for x, name in ((q_seg, "query segment_ids"), (kv_seg, "key segment_ids")):
            _checks.check_integer(x, name)
            expected = query.shape[:2] if batched else query.shape[1:2]
            if x.shape != expected:
                raise ValueError(f"ring_attention: {name} must have the local shape {expected}, "
                                 f"got {x.shape}")
        q_seg = q_seg.reshape(query.shape[:2]).astype(jnp.int32)
        kv_seg = kv_seg.reshape(query.shape[:2]).astype(jnp.int32)
    implementation = _block_implementation(query, implementation)
    cfg = _Config(axis_name=axis_name, ring_size=ring_size, causal=bool(is_causal), zigzag=zigzag,
                  scale=scale, softcap=logits_soft_cap, implementation=implementation,
                  block_sizes=block_sizes)
    # Check every option once, as dot_product_attention would, on the local block.
    jax.eval_shape(partial(_block, cfg, "diag" if cfg.causal else "full"), query, key, value,
                   q_seg, kv_seg)
    out, lse = _ring(cfg, query, key, value, q_seg, kv_seg)
    out = out.astype(query.dtype)
    if not batched:
        out, lse = out[0], lse[0]
    return (out, lse) if return_residual else out


def _block_implementation(query, implementation):
    """The block backend: Pallas only where shard_map does not check varying manual axes.

    ``pallas_call``'s results carry no varying-axes type (its ``out_shape`` would need one), so
    under ``check_vma=True`` (the query is typed as varying) None avoids it and "pallas" is refused
    with the fix; every other backend is typed (:mod:`jaxla.attention._vma`).
    """
    if implementation not in (None, "pallas") or not _vma.axes(query):
        return implementation
    if implementation == "pallas":
        raise ValueError(
            "ring_attention: implementation='pallas' runs only under jax.shard_map(..., "
            "check_vma=False) (its kernels' outputs are not typed for varying manual axes); pass "
            "check_vma=False to shard_map, or use 'chunked', 'cpu' or 'xla'"
        )
    platform = jax.default_backend()
    return "chunked" if platform in ("gpu", "cuda", "rocm", "tpu") else None


# ---- one block ----------------------------------------------------------------------------------


def _attend(cfg, q, k, v, q_seg, kv_seg, causal):
    from jaxla.attention._api import dot_product_attention  # the public path: checks + any backend

    seg = None if q_seg is None else (q_seg, kv_seg)
    out, lse = dot_product_attention(
        q, k, v, is_causal=causal, segment_ids=seg, logits_soft_cap=cfg.softcap, scale=cfg.scale,
        implementation=cfg.implementation, block_sizes=cfg.block_sizes, return_residual=True,
    )
    return out.astype(lse.dtype), lse


def _block(cfg, kind, q, k, v, q_seg, kv_seg):
    """The partial (out, lse) of the local queries against one key block, full local shapes.

    kind: "full" (every key visible), "diag" (the device's own block, causal), "lower" (zigzag, a
    block from an earlier device: every query vs its first half), "upper" (zigzag, a later device:
    the second half of the queries vs every key). Rows that see nothing get 0 and EMPTY_ROW_LSE.
    """
    if kind in ("full", "diag"):
        return _attend(cfg, q, k, v, q_seg, kv_seg, kind == "diag")
    half = q.shape[1] // 2
    seg = (lambda x, sl: None if x is None else x[:, sl])  # noqa: E731
    if kind == "lower":
        sl = slice(0, half)
        return _attend(cfg, q, k[:, sl], v[:, sl], q_seg, seg(kv_seg, sl), False)
    sl = slice(half, None)
    out, lse = _attend(cfg, q[:, sl], k, v, seg(q_seg, sl), kv_seg, False)
    out = jnp.concatenate([jnp.zeros_like(out), out], axis=1)
    lse = jnp.concatenate([jnp.full_like(lse, EMPTY_ROW_LSE), lse], axis=1)
    return out, lse


def _skip(cfg, q, v, acc):
    b, t, n = q.shape[:3]
    return (_pvary(cfg, jnp.zeros((b, t, n, v.shape[-1]), acc), q, v),
            _pvary(cfg, jnp.full((b, t, n), EMPTY_ROW_LSE, acc), q, v))


def _source(cfg, step):
    """(this device's index, index of the device whose block it holds at ``step``)."""
    i = lax.axis_index(cfg.axis_name)
    return i, (i - step) % cfg.ring_size


def _branches(cfg):
    """The two block kinds an off-diagonal step chooses between: (earlier device, later device)."""
    if not cfg.causal:
        return "full", "full"
    return ("lower", "upper") if cfg.zigzag else ("full", None)


def _rotate(cfg, *xs):
    perm = [(i, (i + 1) % cfg.ring_size) for i in range(cfg.ring_size)]
    return tuple(None if x is None else lax.ppermute(x, cfg.axis_name, perm) for x in xs)


def _merge(o1, l1, o2, l2):
    lse = jnp.logaddexp(l1, l2)
    return o1 * jnp.exp(l1 - lse)[..., None] + o2 * jnp.exp(l2 - lse)[..., None], lse


def _pvary(cfg, x, *refs):
    """A fresh value typed as varying over the ring axis and wherever ``refs`` vary (the two
    branches of a ``lax.cond`` and a scan's carry must have one type)."""
    return _vma.vary(_vma.like(x, *refs), cfg.axis_name)


# ---- forward and backward ring ------------------------------------------------------------------


def _forward(cfg, q, k, v, q_seg, kv_seg):
    acc = _checks.accum_dtype(_checks.promote_dtypes(q.dtype, k.dtype, v.dtype))
    o, lse = _block(cfg, "diag" if cfg.causal else "full", q, k, v, q_seg, kv_seg)
    earlier, later = _branches(cfg)

    def compute(step, k, v, kv_seg):
        i, j = _source(cfg, step)
        run = lambda kind: (lambda: _skip(cfg, q, v, acc) if kind is None  # noqa: E731
                            else _block(cfg, kind, q, k, v, q_seg, kv_seg))
        if earlier == later:
            return run(earlier)()
        return lax.cond(j < i, run(earlier), run(later))

    def body(carry, step):
        o, lse, k, v, kv_seg = carry
        k, v, kv_seg = _rotate(cfg, k, v, kv_seg)
        ob, lb = compute(step, k, v, kv_seg)
        o, lse = _merge(o, lse, ob, lb)
        return (o, lse, k, v, kv_seg), None

    if cfg.ring_size > 1:
        steps = jnp.arange(1, cfg.ring_size)
        (o, lse, *_), _ = lax.scan(body, (o, lse, k, v, kv_seg), steps)
    # logaddexp of two empty rows is EMPTY_ROW_LSE + log 2, which rounds back; clamp anyway.
    lse = jnp.where(lse <= EMPTY_ROW_LSE, jnp.asarray(EMPTY_ROW_LSE, lse.dtype), lse)
    return o, lse


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(cfg, q, k, v, q_seg, kv_seg):
    return _forward(cfg, q, k, v, q_seg, kv_seg)


def _ring_fwd(cfg, q, k, v, q_seg, kv_seg):
    o, lse = _forward(cfg, q, k, v, q_seg, kv_seg)
    return (o, lse), (q, k, v, q_seg, kv_seg, o, lse)


def _block_grads(cfg, kind, q, k, v, q_seg, kv_seg, d_out, d_lse, out, lse):
    """(dq, dk, dv) of one block's contribution, through the backend's VJP of that block."""
    (ob, lb), vjp = jax.vjp(lambda q, k, v: _block(cfg, kind, q, k, v, q_seg, kv_seg), q, k, v)
    w = jnp.exp(lb - lse)
    d_ob = (w[..., None] * d_out).astype(ob.dtype)
    d_lb = w * (jnp.sum(d_out * ob, axis=-1) - jnp.sum(d_out * out, axis=-1) + d_lse)
    return vjp((d_ob, d_lb.astype(lb.dtype)))


def _ring_bwd(cfg, res, cotangents):
    q, k, v, q_seg, kv_seg, out, lse = res
    d_out, d_lse = cotangents
    acc = out.dtype
    d_out, d_lse = d_out.astype(acc), d_lse.astype(acc)
    grads = partial(_block_grads, cfg, d_out=d_out, d_lse=d_lse, out=out, lse=lse)
    dq, dk, dv = grads("diag" if cfg.causal else "full", q, k, v, q_seg, kv_seg)
    dq, dk, dv = dq.astype(acc), dk.astype(acc), dv.astype(acc)
    earlier, later = _branches(cfg)

    def compute(step, k, v, kv_seg):
        i, j = _source(cfg, step)

        def run(kind):
            def f():
                if kind is None:
                    return tuple(_pvary(cfg, jnp.zeros(x.shape, acc), q, k, v) for x in (q, k, v))
                return tuple(g.astype(acc) for g in grads(kind, q, k, v, q_seg, kv_seg))
            return f

        if earlier == later:
            return run(earlier)()
        return lax.cond(j < i, run(earlier), run(later))

    def body(carry, step):
        dq, dk, dv, k, v, kv_seg = carry
        k, v, kv_seg, dk, dv = _rotate(cfg, k, v, kv_seg, dk, dv)
        gq, gk, gv = compute(step, k, v, kv_seg)
        return (dq + gq, dk + gk, dv + gv, k, v, kv_seg), None

    if cfg.ring_size > 1:
        steps = jnp.arange(1, cfg.ring_size)
        (dq, dk, dv, *_), _ = lax.scan(body, (dq, dk, dv, k, v, kv_seg), steps)
        dk, dv = _rotate(cfg, dk, dv)  # the P-th rotation brings each block's gradient home
    grads = ((dq, q), (dk, k), (dv, v))
    return (*(_vma.cotangent(g.astype(x.dtype), x) for g, x in grads), None, None)


_ring.defvjp(_ring_fwd, _ring_bwd)
