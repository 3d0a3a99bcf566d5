"""Multi-head attention block: Q, K, V and output projections around :func:`dot_product_attention`.

Parameters are plain dicts of :func:`jaxla.init_linear` layers::

    {"q": (D → N·H), "k": (Dc → K·H), "v": (Dc → K·Hv), "o": (N·Hv → D)}

The head layout is read back from the weight shapes and ``num_heads``, so the dict holds only arrays.
For autoregressive generation, :func:`init_kv_cache` preallocates keys/values for ``max_len`` tokens
and :func:`multi_head_attention_decode` appends new tokens and attends over the cache.

Dimension legend: B batch, T query length, S context length, L cache capacity, D model width,
Dc context width, N query heads, K kv heads, H query/key head dim, Hv value head dim.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from jaxla import _checks, _eager
from jaxla._linear import check_linear_params, init_linear, linear
from jaxla.attention._api import dot_product_attention
from jaxla.attention._rope import apply_rope

Params = dict[str, Any]


@_eager.compiled
def init_mha(
    key: jax.Array,
    d_model: int,
    num_heads: int,
    *,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    value_head_dim: int | None = None,
    d_context: int | None = None,
    use_bias: bool = False,
    kernel_init=None,
    dtype: DTypeLike = jnp.float32,
) -> Params:
    """Initialises a multi-head attention block.

    Dimension legend: B batch, T query length, S context length, L cache capacity, D model width,
    Dc context width, N query heads, K kv heads, H query/key head dim, Hv value head dim.

    Args:
      key: a PRNG key.
      d_model: D, width of the input and output.
      num_heads: N query heads.
      num_kv_heads: K key/value heads (N a multiple of K); N by default (MHA), 1 gives MQA.
      head_dim: H; ``d_model // num_heads`` by default.
      value_head_dim: Hv; H by default.
      d_context: Dc, width of the keys/values' source (cross-attention); D by default.
      use_bias: whether the projections have biases.
      kernel_init: initializer of every kernel (LeCun normal by default).
      dtype: parameter dtype.

    Returns:
      ``{"q", "k", "v", "o"}`` linear layers (see the module docstring for shapes).
    """
    num_heads = _checks.check_positive_int(num_heads, "num_heads")
    num_kv_heads = num_heads if num_kv_heads is None else _checks.check_positive_int(
        num_kv_heads, "num_kv_heads")
    if num_heads % num_kv_heads:
        raise ValueError(
            f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}"
        )
    d_model = _checks.check_positive_int(d_model, "d_model")
    if head_dim is None:
        if d_model % num_heads:
            raise ValueError(
                f"d_model={d_model} is not divisible by num_heads={num_heads}; pass head_dim"
            )
        head_dim = d_model // num_heads
    head_dim = _checks.check_positive_int(head_dim, "head_dim")
    value_head_dim = head_dim if value_head_dim is None else value_head_dim
    d_context = d_model if d_context is None else d_context
    kq, kk, kv, ko = jax.random.split(key, 4)
    kw = dict(use_bias=use_bias, kernel_init=kernel_init, dtype=dtype)
    return {
        "q": init_linear(kq, d_model, num_heads * head_dim, **kw),
        "k": init_linear(kk, d_context, num_kv_heads * head_dim, **kw),
        "v": init_linear(kv, d_context, num_kv_heads * value_head_dim, **kw),
        "o": init_linear(ko, num_heads * value_head_dim, d_model, **kw),
    }


def _heads(params: Params, num_heads: int) -> tuple[int, int, int]:
    """(K, H, Hv) read from the projection shapes, with errors naming the inconsistent weight."""
    if not isinstance(params, dict) or any(p not in params for p in "qkvo"):
        raise TypeError(
            'params must be a dict with linear layers "q", "k", "v", "o" (from init_mha), got '
            + (f"keys {sorted(params)}" if isinstance(params, dict) else type(params).__name__)
        )
    num_heads = _checks.check_positive_int(num_heads, "num_heads")
    widths = {p: check_linear_params(params[p], f'params["{p}"]')[0].shape for p in "qkvo"}
    if widths["q"][1] % num_heads:
        raise ValueError(f'params["q"] width {widths["q"][1]} is not divisible by num_heads={num_heads}')
    h = widths["q"][1] // num_heads
    if widths["k"][1] % h:
        raise ValueError(f'params["k"] width {widths["k"][1]} is not a multiple of head dim H={h}')
    k = widths["k"][1] // h
    if num_heads % k:
        raise ValueError(f"num_heads={num_heads} is not a multiple of the K={k} kv heads in params")
    if widths["v"][1] % k or widths["v"][0] != widths["k"][0]:
        raise ValueError(f'params["v"] {widths["v"]} does not fit K={k} heads of params["k"]')
    hv = widths["v"][1] // k
    if widths["o"][0] != num_heads * hv:
        raise ValueError(f'params["o"] input width {widths["o"][0]} must be N·Hv = {num_heads * hv}')
    return k, h, hv


def _project(layer, x, heads, dim, **kw):
    y = linear(layer, x, **kw)
    return y.reshape((*y.shape[:-1], heads, dim))


@_eager.compiled
def multi_head_attention(
    params: Params,
    x: ArrayLike,
    *,
    num_heads: int,
    context: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    is_causal: bool = False,
    positions: ArrayLike | None = None,
    context_positions: ArrayLike | None = None,
    rope_theta: float | None = None,
    query_seq_lengths: ArrayLike | None = None,
    key_value_seq_lengths: ArrayLike | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    segment_ids: ArrayLike | tuple[ArrayLike, ArrayLike] | None = None,
    logits_soft_cap: float | None = None,
    implementation: str | None = None,
    dtype: DTypeLike | None = None,
) -> jax.Array:
    """Multi-head (or grouped-query) attention: ``o(attention(q(x), k(c), v(c)))`` with c = context.

    Dimension legend: B batch, T query length, S context length, L cache capacity, D model width,
    Dc context width, N query heads, K kv heads, H query/key head dim, Hv value head dim.

    Args:
      params: from :func:`init_mha`.
      x: (B, T, D) inputs (queries).
      num_heads: N, as given to :func:`init_mha`.
      context: (B, S, Dc) source of keys and values (cross-attention); ``x`` by default.
      bias, mask, is_causal, query_seq_lengths, key_value_seq_lengths, local_window_size,
        segment_ids, logits_soft_cap, implementation: as in :func:`jaxla.dot_product_attention`.
      positions: (B, T) or (T,) positions of ``x`` for rotary embeddings; ``0 .. T - 1`` by default.
      context_positions: positions of ``context``; ``positions`` when there is no context, else
        ``0 .. S - 1``.
      rope_theta: if given, rotary position embeddings with this base are applied to queries and
        keys (:func:`jaxla.apply_rope`); no position information is added when None.
      dtype: compute dtype of the projections (see :func:`jaxla.linear`).

    Returns:
      (B, T, D) outputs in the compute dtype.
    """
    kh, h, hv = _heads(params, num_heads)
    x = _checks.as_array(x, "x")
    _checks.check_rank(x, "x", 3, "(B, T, D)")
    self_attention = context is None
    c = x if self_attention else _checks.as_array(context, "context")
    _checks.check_rank(c, "context", 3, "(B, S, Dc)")
    kw = dict(dtype=dtype)
    q = _project(params["q"], x, num_heads, h, **kw)
    k = _project(params["k"], c, kh, h, **kw)
    v = _project(params["v"], c, kh, hv, **kw)
    if rope_theta is not None:
        if context_positions is None and self_attention:
            context_positions = positions
        q = apply_rope(q, positions, theta=rope_theta)
        k = apply_rope(k, context_positions, theta=rope_theta)
    out = dot_product_attention(
        q, k, v, bias, mask, is_causal=is_causal, query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths, local_window_size=local_window_size,
        segment_ids=segment_ids, logits_soft_cap=logits_soft_cap, implementation=implementation,
    )
    return linear(params["o"], out.reshape((*out.shape[:2], num_heads * hv)), **kw)


@_eager.compiled
def init_kv_cache(
    batch: int,
    max_len: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    value_head_dim: int | None = None,
    dtype: DTypeLike = jnp.float32,
) -> Params:
    """Preallocates an empty key/value cache for :func:`multi_head_attention_decode`.

    Dimension legend: B batch, T query length, S context length, L cache capacity, D model width,
    Dc context width, N query heads, K kv heads, H query/key head dim, Hv value head dim.

    Args:
      batch: B.
      max_len: L, the most tokens (prompt + generated) a sequence may hold.
      num_kv_heads: K.
      head_dim: H.
      value_head_dim: Hv; H by default.
      dtype: dtype of the stored keys and values.

    Returns:
      ``{"k": (B, L, K, H) zeros, "v": (B, L, K, Hv) zeros, "lengths": (B,) int32 zeros}``;
      ``lengths[b]`` counts the tokens already stored for sequence b.
    """
    dims = [_checks.check_positive_int(d, n) for d, n in (
        (batch, "batch"), (max_len, "max_len"), (num_kv_heads, "num_kv_heads"),
        (head_dim, "head_dim"))]
    b, length, kh, h = dims
    hv = h if value_head_dim is None else _checks.check_positive_int(value_head_dim,
                                                                      "value_head_dim")
    return {
        "k": jnp.zeros((b, length, kh, h), dtype),
        "v": jnp.zeros((b, length, kh, hv), dtype),
        "lengths": jnp.zeros((b,), jnp.int32),
    }


def _check_cache(cache: Params, kh: int, h: int, hv: int) -> tuple[int, int]:
    if not isinstance(cache, dict) or any(n not in cache for n in ("k", "v", "lengths")):
        raise TypeError('cache must be a dict with "k", "v", "lengths" (from init_kv_cache)')
    ck, cv, lengths = cache["k"], cache["v"], cache["lengths"]
    _checks.check_rank(ck, 'cache["k"]', 4, "(B, L, K, H)")
    b, length = ck.shape[:2]
    if ck.shape[2:] != (kh, h) or cv.shape != (b, length, kh, hv):
        raise ValueError(
            f'cache["k"] {ck.shape} / cache["v"] {cv.shape} do not match the K={kh}, H={h}, '
            f"Hv={hv} heads of params"
        )
    if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f'cache["lengths"] must be integer (B,) = ({b},), got {lengths.dtype} '
                         f"{lengths.shape}")
    return b, length


@_eager.compiled
def multi_head_attention_decode(
    params: Params,
    x: ArrayLike,
    cache: Params,
    *,
    num_heads: int,
    rope_theta: float | None = None,
    local_window_size: int | None = None,
    logits_soft_cap: float | None = None,
    implementation: str | None = None,
    dtype: DTypeLike | None = None,
) -> tuple[jax.Array, Params]:
    """Causal self-attention for new tokens against a key/value cache (prefill or decode step).

    The T new tokens of sequence b take positions ``cache["lengths"][b] + 0 .. T - 1``; their keys
    and values are written into the cache there, and each attends causally to every cached token up to
    its own position. Running a prompt and then one token at a time gives the same outputs as
    :func:`multi_head_attention` with ``is_causal=True`` over the whole sequence.

    Dimension legend: B batch, T query length, S context length, L cache capacity, D model width,
    Dc context width, N query heads, K kv heads, H query/key head dim, Hv value head dim.

    Args:
      params: from :func:`init_mha` (self-attention: Dc = D).
      x: (B, T, D) new tokens (T = 1 for a decode step).
      cache: from :func:`init_kv_cache` or a previous call; the caller keeps
        ``lengths + T <= L`` (writes past the capacity cannot be detected inside ``jit``).
      num_heads: N.
      rope_theta: rotary embedding base (positions come from the cache lengths); None for none.
      local_window_size: ``left``: a token sees only the ``left`` tokens before it (and itself).
      logits_soft_cap, implementation: as in :func:`jaxla.dot_product_attention`.
      dtype: compute dtype of the projections.

    Returns:
      ``(y, new_cache)``: y (B, T, D); the cache with the new keys/values and lengths + T.
    """
    kh, h, hv = _heads(params, num_heads)
    x = _checks.as_array(x, "x")
    _checks.check_rank(x, "x", 3, "(B, T, D)")
    b, length = _check_cache(cache, kh, h, hv)
    t = x.shape[1]
    if x.shape[0] != b or t > length:
        raise ValueError(f"x {x.shape} must have batch {b} and at most L={length} tokens (cache)")
    lengths = cache["lengths"].astype(jnp.int32)
    pos = lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # (B, T)
    kw = dict(dtype=dtype)
    q = _project(params["q"], x, num_heads, h, **kw)
    k = _project(params["k"], x, kh, h, **kw)
    v = _project(params["v"], x, kh, hv, **kw)
    if rope_theta is not None:
        q = apply_rope(q, pos, theta=rope_theta)
        k = apply_rope(k, pos, theta=rope_theta)

    def write(buf, new, start):
        return jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), start, 0)

    ck = jax.vmap(write)(cache["k"], k, lengths)
    cv = jax.vmap(write)(cache["v"], v, lengths)
    key_pos = jnp.arange(length, dtype=jnp.int32)[None, None, :]
    visible = key_pos <= pos[:, :, None]  # (B, T, L): causal against absolute positions
    if local_window_size is not None:
        left = _checks.check_positive_int(local_window_size, "local_window_size", allow_zero=True)
        visible = visible & (key_pos >= pos[:, :, None] - left)
    out = dot_product_attention(
        q, ck.astype(q.dtype), cv.astype(q.dtype), mask=visible[:, None],
        logits_soft_cap=logits_soft_cap, implementation=implementation,
    )
    y = linear(params["o"], out.reshape((b, t, num_heads * hv)), **kw)
    return y, {"k": ck, "v": cv, "lengths": lengths + t}
