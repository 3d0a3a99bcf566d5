"""Rotary position embeddings (RoPE): rotate pairs of query/key features by position-dependent angles.

Feature pair ``(x[k], x[k + H/2])`` of a token at position p is rotated by the angle ``p · θ^(-2k/H)``
("rotate half" pairing, as in GPT-NeoX and Llama). Because rotations compose, the dot product of a
rotated query at position i and a rotated key at position j depends only on ``i - j``.

Dimension legend: B batch, T sequence length, N heads, H head dim (even), R = H / 2 rotated pairs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxla import _checks, _eager


@_eager.compiled
def rope_frequencies(head_dim: int, *, theta: float = 10000.0, dtype=jnp.float32) -> jax.Array:
    """Angular frequency of each rotated pair: ``theta^(-2k / head_dim)`` for k = 0 .. R - 1.

    Dimension legend: H head dim (even), R = H / 2 rotated feature pairs.

    Args:
      head_dim: H, even.
      theta: base wavelength (10000 in the original RoPE; larger for long contexts).
      dtype: floating dtype of the result.

    Returns:
      (R,) frequencies, from 1 down to about ``1 / theta``.
    """
    head_dim = _checks.check_positive_int(head_dim, "head_dim")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
    if not theta > 0:
        raise ValueError(f"theta must be > 0, got {theta}")
    exponents = jnp.arange(0, head_dim, 2, dtype=dtype) / head_dim
    return jnp.asarray(theta, dtype) ** -exponents


@_eager.compiled
def apply_rope(
    x: ArrayLike, positions: ArrayLike | None = None, *, theta: float = 10000.0
) -> jax.Array:
    """Rotates the features of queries or keys by their positions.

    Dimension legend: B batch, T sequence length, N heads, H head dim (even).

    Args:
      x: BTNH (or TNH) queries or keys, H even.
      positions: integer or float positions, (B, T) or (T,) (broadcast over the batch);
        ``0 .. T - 1`` by default.
      theta: base wavelength, see :func:`rope_frequencies`.

    Returns:
      An array like ``x`` (same shape and dtype); the rotation is computed in float32 (float64 for
      float64 inputs).
    """
    x = _checks.as_array(x, "x")
    _checks.check_floating(x, "x")
    _checks.check_rank(x, "x", (3, 4), "BTNH or TNH")
    t, h = x.shape[-3], x.shape[-1]
    acc = _checks.accum_dtype(x.dtype)
    freqs = rope_frequencies(h, theta=theta, dtype=acc)
    if positions is None:
        positions = jnp.arange(t, dtype=jnp.int32)
    positions = _checks.as_array(positions, "positions")
    if not (jnp.issubdtype(positions.dtype, jnp.integer) or jnp.issubdtype(
            positions.dtype, jnp.floating)):
        raise TypeError(f"positions must be integer or float, got {positions.dtype}")
    batch_shape = x.shape[:-3]
    if positions.shape not in ((t,), (*batch_shape, t)):
        raise ValueError(
            f"positions must have shape (T,) = ({t},) or {(*batch_shape, t)} to match x "
            f"{tuple(x.shape)}, got {tuple(positions.shape)}"
        )
    positions = jnp.broadcast_to(positions, (*batch_shape, t)).astype(acc)
    # (..., T, 1, R): one angle per position and pair, shared by all heads.
    angles = positions[..., :, None, None] * freqs.reshape((1,) * (positions.ndim + 1) + (-1,))
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x32 = x.astype(acc)
    first, second = x32[..., : h // 2], x32[..., h // 2 :]
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)
