"""Which keys each query may see: the visibility rule shared by every attention implementation.

Key j is visible to query i when all of these hold (each only when the feature is used):

* ``mask[b, n, i, j]`` is True (a user boolean mask, broadcastable to BNTS);
* causal: ``j <= i`` (top-left aligned, as ``jax.nn.dot_product_attention``);
* window ``(left, right)``: ``i - left <= j <= i + right``;
* lengths: ``i < query_seq_lengths[b]`` and ``j < key_value_seq_lengths[b]``;
* segments: ``q_segment_ids[b, i] == kv_segment_ids[b, j]``.

Causal and window masks are static: they only depend on positions, so they are folded into one *band*
``-left <= j - i <= right`` (causal is ``right = 0``). The chunked path uses the band to skip key blocks
that are entirely invisible and to drop masking work on blocks that are entirely visible.

Dimension legend: B batch, T query length, S key length, t/s positions inside a block.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Band:
    """Static visible band ``-left <= j - i <= right``; ``None`` means unbounded on that side."""

    left: int | None = None
    right: int | None = None

    @property
    def is_full(self) -> bool:
        return self.left is None and self.right is None


def make_band(is_causal: bool, window: tuple[int, int] | None) -> Band:
    """Combines ``is_causal`` and a ``(left, right)`` window into one band."""
    left = right = None
    if window is not None:
        left, right = window
    if is_causal:
        right = 0 if right is None else min(right, 0)
    return Band(left, right)


def band_visible(q_pos: jax.Array, k_pos: jax.Array, band: Band, kv_len: int) -> jax.Array:
    """Static part of the visibility for query positions (t,) and key positions (s,) → (t, s).

    ``kv_len`` is the true key length: positions at or beyond it are padding added by a blocked
    implementation.
    """
    diff = k_pos[None, :] - q_pos[:, None]
    vis = jnp.broadcast_to(k_pos[None, :] < kv_len, diff.shape)
    if band.left is not None:
        vis = vis & (diff >= -band.left)
    if band.right is not None:
        vis = vis & (diff <= band.right)
    return vis


def dynamic_visible(
    q_pos: jax.Array,
    k_pos: jax.Array,
    *,
    q_len: jax.Array | None,
    kv_len: jax.Array | None,
    q_seg: jax.Array | None,
    kv_seg: jax.Array | None,
) -> jax.Array | None:
    """Per-batch part of the visibility (lengths, segments) → (B, t, s), or None when unused.

    ``q_seg`` (B, t) and ``kv_seg`` (B, s) are the segment ids of the positions ``q_pos``/``k_pos``
    (already sliced to the block); ``q_len``/``kv_len`` are (B,) int32.
    """
    vis = None

    def conj(a, b):
        return b if a is None else a & b

    if q_len is not None:
        vis = conj(vis, q_pos[None, :, None] < q_len[:, None, None])
    if kv_len is not None:
        vis = conj(vis, k_pos[None, None, :] < kv_len[:, None, None])
    if q_seg is not None:
        vis = conj(vis, q_seg[:, :, None] == kv_seg[:, None, :])
    return vis


def classify_blocks(
    num_q: int, num_k: int, block_q: int, block_k: int, *, t: int, s: int, band: Band
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Sorts the (query block, key block) pairs by how the static band covers them.

    Only the ``t`` real query rows and ``s`` real key columns count (the rest is padding).

    Returns:
      ``(full, partial)``: blocks entirely visible (no masking needed) and blocks partly visible
      (masked); blocks entirely invisible are in neither list and are never computed.
    """
    full, partial = [], []
    for i in range(num_q):
        r0, r1 = i * block_q, min((i + 1) * block_q, t) - 1
        for j in range(num_k):
            c0, c1 = j * block_k, (j + 1) * block_k - 1
            # j - i over the rectangle spans [c0 - r1, c1 - r0]; compare with [-left, right].
            lo, hi = c0 - r1, min(c1, s - 1) - r0
            if band.right is not None and lo > band.right:
                continue
            if band.left is not None and hi < -band.left:
                continue
            inside = (band.right is None or c1 - r0 <= band.right) and (
                band.left is None or c0 - r1 >= -band.left
            )
            (full if inside and c1 < s else partial).append((i, j))
    return full, partial


def positions(start: jax.Array | int, size: int) -> jax.Array:
    """Positions ``start, ..., start + size - 1`` as int32."""
    return jnp.asarray(start, jnp.int32) + jnp.arange(size, dtype=jnp.int32)
