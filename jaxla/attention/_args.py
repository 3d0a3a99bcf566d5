"""The canonical attention arguments: one record, built once from the user's validated arguments.

``canonical_args`` checks every argument of :func:`jaxla.dot_product_attention` (shapes, dtypes, static
options) and returns an :class:`AttentionArgs`: arrays in rank-4 form and the compute dtype, the causal
flag and window folded into one static band, statics as Python numbers. Every backend reads this record
and nothing else, so a check or a default lives here once.

Dimension legend: B batch, T query length, S key/value length, N query heads, K key/value heads
(N a multiple of K), G = N // K, H query/key head dim, Hv value head dim.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxla import _checks
from jaxla.attention import _masks


@dataclasses.dataclass(frozen=True, eq=False)
class AttentionArgs:
    """Validated attention arguments in canonical form (arrays are traced values under ``jit``).

    Attributes:
      query: (B, T, N, H) in the compute dtype (the promotion of the query/key/value dtypes).
      key: (B, S, K, H), compute dtype.
      value: (B, S, K, Hv), compute dtype.
      bias: additive bias (Bx, Nx, Tx, Sx), each axis 1 or full size (broadcastable to BNTS), or None.
      mask: boolean (Bx, Nx, Tx, Sx), True = attend, or None.
      q_segment_ids: int32 (B, T) or None; given iff ``kv_segment_ids`` is.
      kv_segment_ids: int32 (B, S) or None.
      query_seq_lengths: int32 (B,) or None.
      key_value_seq_lengths: int32 (B,) or None.
      band: the static causal/window band (causal folded in as ``right <= 0``).
      is_causal: whether the caller asked for causal attention (already part of ``band``).
      scale: the logit scale, a finite Python float.
      softcap: the logit soft cap ``c > 0`` (finite), or None.
      out_dtype: dtype of the output: the caller's query dtype.
      batched: False when the caller passed rank-3 arrays (a batch axis of 1 was added).
    """

    query: jax.Array
    key: jax.Array
    value: jax.Array
    bias: jax.Array | None
    mask: jax.Array | None
    q_segment_ids: jax.Array | None
    kv_segment_ids: jax.Array | None
    query_seq_lengths: jax.Array | None
    key_value_seq_lengths: jax.Array | None
    band: _masks.Band
    is_causal: bool
    scale: float
    softcap: float | None
    out_dtype: jnp.dtype
    batched: bool

    @property
    def batch(self) -> int:
        return self.query.shape[0]

    @property
    def q_len(self) -> int:
        """T, the query length."""
        return self.query.shape[1]

    @property
    def kv_len(self) -> int:
        """S, the key/value length."""
        return self.key.shape[1]

    @property
    def num_heads(self) -> int:
        return self.query.shape[2]

    @property
    def num_kv_heads(self) -> int:
        return self.key.shape[2]

    @property
    def head_dim(self) -> int:
        return self.query.shape[3]

    @property
    def value_head_dim(self) -> int:
        return self.value.shape[3]

    @property
    def dtype(self) -> jnp.dtype:
        """The compute dtype of query, key and value."""
        return jnp.dtype(self.query.dtype)

    @property
    def has_dynamic_mask(self) -> bool:
        """Whether visibility depends on array values (mask, lengths or segments), not only the band."""
        return any(x is not None for x in (self.mask, self.q_segment_ids,
                                           self.query_seq_lengths, self.key_value_seq_lengths))


def canonical_args(query, key, value, bias=None, mask=None, *, scale=None, is_causal=False,
                   query_seq_lengths=None, key_value_seq_lengths=None, local_window_size=None,
                   segment_ids=None, logits_soft_cap=None) -> AttentionArgs:
    """Checks every argument (as documented by ``dot_product_attention``) → :class:`AttentionArgs`.

    Raises:
      ValueError / TypeError: naming the argument and printing the shapes or values, for any
        inconsistent argument.
    """
    query = _checks.as_array(query, "query")
    key = _checks.as_array(key, "key")
    value = _checks.as_array(value, "value")
    for x, name in ((query, "query"), (key, "key"), (value, "value")):
        _checks.check_floating(x, name)
    _checks.check_rank(query, "query", (3, 4), "BTNH or TNH")
    _checks.check_rank(key, "key", query.ndim, "BSKH or SKH, the same rank as query")
    _checks.check_rank(value, "value", query.ndim, "BSKHv or SKHv, the same rank as query")
    batched = query.ndim == 4
    if not batched:
        query, key, value = query[None], key[None], value[None]
    b, t, n, h = query.shape
    s, k = key.shape[1], key.shape[2]
    shapes = f"query {query.shape}, key {key.shape}, value {value.shape} (BTNH, BSKH, BSKHv)"
    if key.shape[0] != b or value.shape[0] != b:
        raise ValueError(f"query, key and value must have the same batch size B; got {shapes}")
    if key.shape[-1] != h:
        raise ValueError(f"query and key must have the same head dim H; got {shapes}")
    if value.shape[1:3] != (s, k):
        raise ValueError(f"value must have the same S and K as key; got {shapes}")
    if k == 0:
        raise ValueError(f"key and value need at least one kv head (K >= 1); got {shapes}")
    if n % k:
        raise ValueError(
            f"the number of query heads N={n} must be a multiple of the kv heads K={k}; got {shapes}"
        )
    if h == 0 or value.shape[-1] == 0:
        raise ValueError(f"head dims H and Hv must be >= 1; got {shapes}")
    out_dtype = jnp.dtype(query.dtype)
    compute = _checks.promote_dtypes(query.dtype, key.dtype, value.dtype)
    query, key, value = query.astype(compute), key.astype(compute), value.astype(compute)
    full = (b, n, t, s)
    if bias is not None:
        bias = _pairwise(bias, "bias", full, batched)
        _checks.check_floating(bias, "bias")
    if mask is not None:
        mask = _pairwise(mask, "mask", full, batched)
        if mask.dtype != jnp.bool_:
            raise TypeError(
                f"mask must be boolean (True = attend), got dtype {mask.dtype} with shape "
                f"{mask.shape}; pass an additive mask as bias"
            )
    q_len = _lengths(query_seq_lengths, "query_seq_lengths", b, batched)
    kv_len = _lengths(key_value_seq_lengths, "key_value_seq_lengths", b, batched)
    q_seg, kv_seg = _segments(segment_ids, b, t, s, batched)
    window = _window(local_window_size)
    if scale is None:
        scale = 1.0 / math.sqrt(h)
    else:
        scale = _finite_float(scale, "scale")
    if logits_soft_cap is not None:
        logits_soft_cap = _finite_float(logits_soft_cap, "logits_soft_cap")
        if logits_soft_cap <= 0:
            raise ValueError(f"logits_soft_cap must be > 0, got {logits_soft_cap}")
    is_causal = _static_bool(is_causal, "is_causal")
    return AttentionArgs(
        query=query, key=key, value=value, bias=bias, mask=mask, q_segment_ids=q_seg,
        kv_segment_ids=kv_seg, query_seq_lengths=q_len, key_value_seq_lengths=kv_len,
        band=_masks.make_band(is_causal, window), is_causal=is_causal, scale=scale,
        softcap=logits_soft_cap, out_dtype=out_dtype, batched=batched,
    )


def _pairwise(x, name, full, batched):
    x = _checks.as_array(x, name)
    layout = "broadcastable to BNTS" if batched else "broadcastable to NTS"
    if x.ndim > (4 if batched else 3):
        raise ValueError(f"{name} must have rank <= {4 if batched else 3} ({layout}), got {x.shape}")
    x = x.reshape((1,) * (4 - x.ndim) + x.shape)
    if any(d not in (1, f) for d, f in zip(x.shape, full, strict=True)):
        raise ValueError(
            f"{name} with shape {x.shape} does not broadcast to (B, N, T, S) = {full}: every axis "
            "must be 1 or the full size"
        )
    return x


def _lengths(x, name, b, batched):
    if x is None:
        return None
    x = _checks.as_array(x, name)
    _checks.check_integer(x, name)
    if x.shape != (b,):
        raise ValueError(
            f"{name} must have shape (B,) = ({b},)"
            + ("" if batched else " (B = 1 for rank-3 inputs)")
            + f", got {x.shape}"
        )
    return x.astype(jnp.int32)


def _segments(segment_ids, b, t, s, batched):
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, tuple | list):
        if len(segment_ids) != 2:
            raise ValueError(
                "segment_ids must be one array or a pair (query ids (B, T), key ids (B, S)), "
                f"got a sequence of length {len(segment_ids)}"
            )
        q_seg, kv_seg = segment_ids
    else:
        if t != s:
            raise ValueError(
                f"a single segment_ids array needs T == S, got T={t}, S={s}; pass a pair "
                "(query ids (B, T), key ids (B, S))"
            )
        q_seg = kv_seg = segment_ids
    out = []
    for x, name, length in ((q_seg, "query segment_ids", t), (kv_seg, "key segment_ids", s)):
        x = _checks.as_array(x, name)
        _checks.check_integer(x, name)
        expected = (b, length) if batched else (length,)
        if x.shape != expected:
            raise ValueError(f"{name} must have shape {expected}, got {x.shape}")
        out.append(x.reshape(b, length).astype(jnp.int32))
    return tuple(out)


def _window(w):
    if w is None:
        return None
    if isinstance(w, int | np.integer) and not isinstance(w, bool):
        w = (int(w), int(w))
    if (
        not isinstance(w, Sequence)
        or len(w) != 2
        or any(isinstance(x, bool) or not isinstance(x, int | np.integer) for x in w)
    ):
        raise TypeError(f"local_window_size must be an int or a pair of ints (left, right), got {w!r}")
    if w[0] < 0 or w[1] < 0:
        raise ValueError(f"local_window_size sizes must be >= 0, got (left, right) = {tuple(w)}")
    return int(w[0]), int(w[1])


def _finite_float(x, name):
    try:
        value = float(x)
    except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
        # Traced values land here too: the value shapes the computation, so it must be static.
        raise TypeError(
            f"{name} must be a static Python number, got {type(x).__name__} {x!r}"
        ) from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


def _static_bool(x, name):
    if isinstance(x, bool | np.bool_):
        return bool(x)
    if isinstance(x, int | np.integer) and x in (0, 1):
        return bool(x)
    raise TypeError(f"{name} must be a static Python bool, got {type(x).__name__} {x!r}")
