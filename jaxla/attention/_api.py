"""Public scaled dot-product attention: argument checks, canonical form, and implementation choice.

Dimension legend (used by every docstring here):
  B batch, T query length, S key/value length, N query heads, K key/value heads (N a multiple of K),
  H query/key head dim, Hv value head dim.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxla import _checks
from jaxla.attention import _chunked, _cpu, _masks, _reference
from jaxla.attention._chunked import ChunkedBlockSizes

_log = logging.getLogger("jaxla.attention")

IMPLEMENTATIONS = ("xla", "chunked", "cpu", "pallas")

# implementation=None uses "chunked" from this many score entries per (batch, head) on; below it the
# scores are small and "xla" has no loop overhead. Measured on a 2-core CPU (f32, N=8, H=64, causal
# and not): at T = S = 64 chunked is ~1.2× faster forward but ~0.95× forward+backward,
# at 128 ~1.2-1.4× forward and ~1.07× forward+backward, at 256 ~1.4× and ~1.1×.
_CHUNKED_MIN_SCORES = 128 * 128


def _canonical(query, key, value, bias, mask, segment_ids, query_seq_lengths,
               key_value_seq_lengths, local_window_size, scale, logits_soft_cap):
    """Checks every argument and returns them in canonical rank-4 form (see the module legend)."""
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
    if n % k:
        raise ValueError(
            f"the number of query heads N={n} must be a multiple of the kv heads K={k}; got {shapes}"
        )
    out_dtype = query.dtype
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
    scale = 1.0 / float(np.sqrt(h)) if scale is None else _static_float(scale, "scale")
    if logits_soft_cap is not None:
        logits_soft_cap = _static_float(logits_soft_cap, "logits_soft_cap")
        if logits_soft_cap <= 0:
            raise ValueError(f"logits_soft_cap must be > 0, got {logits_soft_cap}")
    return dict(
        query=query, key=key, value=value, bias=bias, mask=mask, q_seg=q_seg, kv_seg=kv_seg,
        q_len=q_len, kv_len=kv_len, window=window, scale=scale, softcap=logits_soft_cap,
        batched=batched, out_dtype=out_dtype,
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


def _static_float(x, name):
    try:
        return float(x)
    except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
        # Traced values land here too: the value shapes the computation, so it must be static.
        raise TypeError(
            f"{name} must be a static Python number, got {type(x).__name__} {x!r}"
        ) from None


def _load_pallas():
    try:
        return importlib.import_module("jaxla.attention._pallas")
    except ImportError as e:
        return e


def _choose(implementation, args, block_sizes) -> tuple[str, Any]:
    """Returns (implementation name, pallas module or None), raising for impossible requests."""
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}"
        )
    if block_sizes is not None and not isinstance(block_sizes, ChunkedBlockSizes):
        raise TypeError(f"block_sizes must be a ChunkedBlockSizes, got {type(block_sizes).__name__}")
    if implementation in ("xla", "chunked"):
        return implementation, None
    platform = jax.default_backend()
    if implementation == "cpu" or (implementation is None and platform == "cpu"):
        reason = _cpu.unsupported_reason(
            args["query"], args["key"], args["value"], has_bias=args["bias"] is not None,
            has_mask=args["mask"] is not None, softcap=args["softcap"], platform=platform,
        )
        if reason is None:
            return "cpu", None
        if implementation == "cpu":
            raise ValueError(f'implementation="cpu" cannot run these arguments: {reason}')
        _log.debug("not using the compiled CPU attention kernel: %s", reason)
    if implementation == "pallas" or platform in ("gpu", "tpu", "cuda", "rocm"):
        pallas = _load_pallas()
        reason = (
            f"the Pallas kernel is unavailable (jaxla.attention._pallas: {pallas})"
            if isinstance(pallas, ImportError)
            else pallas.unsupported_reason(
                args["query"], args["key"], args["value"],
                has_bias=args["bias"] is not None, has_mask=args["mask"] is not None,
                platform=platform,
            )
        )
        if reason is None:
            return "pallas", pallas
        if implementation == "pallas":
            raise ValueError(f'implementation="pallas" cannot run these arguments: {reason}')
        _log.debug("not using the Pallas attention kernel: %s", reason)
    t, s = args["query"].shape[1], args["key"].shape[1]
    return ("chunked" if t * s >= _CHUNKED_MIN_SCORES else "xla"), None


def dot_product_attention(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    bias: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: ArrayLike | None = None,
    key_value_seq_lengths: ArrayLike | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    segment_ids: ArrayLike | tuple[ArrayLike, ArrayLike] | None = None,
    logits_soft_cap: float | None = None,
    implementation: str | None = None,
    return_residual: bool = False,
    block_sizes: ChunkedBlockSizes | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Scaled dot-product attention, a drop-in for ``jax.nn.dot_product_attention`` with more features.

    ``softmax(scale · Q·Kᵀ + bias) · V`` per head, where the logits (after the optional soft cap
    ``c·tanh(logits / c)``) of keys a query may not see are excluded. Key j is visible to query i when
    ``mask[b, n, i, j]`` (if given), ``j <= i`` (if ``is_causal``, top-left aligned),
    ``i - left <= j <= i + right`` (window), ``i < query_seq_lengths[b]``,
    ``j < key_value_seq_lengths[b]`` and the segment ids of i and j are equal. The softmax runs in
    float32 (float64 for float64 inputs); a query row that sees no key gives zeros, and zero gradients.

    Dimension legend: B batch, T query length, S key length, N query heads, K kv heads (N a multiple
    of K: MHA when equal, GQA/MQA otherwise; query head n uses kv head ``n // (N // K)``), H query/key
    head dim, Hv value head dim (may differ from H).

    Args:
      query: BTNH (or TNH).
      key: BSKH (or SKH).
      value: BSKHv (or SKHv).
      bias: additive bias broadcastable to BNTS (NTS for rank 3): each axis 1 or full size; fewer
        axes are padded with leading ones. Differentiable.
      mask: boolean, True = attend, broadcastable to BNTS like ``bias``.
      scale: logit scale, a Python number; ``1/sqrt(H)`` by default.
      is_causal: key j visible to query i only if ``j <= i``.
      query_seq_lengths: int (B,): query rows at or beyond the length see nothing (output zeros).
      key_value_seq_lengths: int (B,): keys at or beyond the length are hidden.
      local_window_size: ``(left, right)`` (an int w means ``(w, w)``): query i sees keys
        ``i - left .. i + right``.
      segment_ids: int (B, T) when T == S, or a pair ``(query ids (B, T), key ids (B, S))``
        ((T,), (S,) for rank 3): tokens attend only within their segment (packed sequences).
      logits_soft_cap: ``c > 0`` replaces the logits by ``c·tanh(logits / c)`` before masking.
      implementation: ``"xla"`` (materialises the T×S scores; the readable reference), ``"chunked"``
        (tiled online softmax in plain JAX, O(T + S) memory, skips blocks outside causal/window
        bands), ``"cpu"`` (jaxla's compiled CPU kernels: float32 compute, no bias/mask arrays or
        soft cap, head dims multiples of 8), ``"pallas"`` (fused GPU/TPU kernel, when available for
        the arguments), or None: Pallas on GPU/TPU when it supports the arguments; on CPU ``"cpu"``
        when it supports them; else ``"chunked"`` when T·S >= 128² (measured faster from there on
        CPU), else ``"xla"``.
      return_residual: also return the logsumexp of the visible logits.
      block_sizes: tile sizes (query positions, keys) of ``"chunked"`` and ``"cpu"``; by default
        ``ChunkedBlockSizes.default()`` for chunked and ``_cpu.default_block_sizes`` for cpu.

    Returns:
      The output BTNHv (TNHv) in the query dtype, and with ``return_residual`` also the logsumexp
      BTN (TN) in float32 (float64 for float64 inputs). The logsumexp of a row that sees no key is
      ``-0.7 · float32 max`` (finite, so exp of it is 0 and no NaN appears downstream), and it is
      differentiable (its gradient is the probability row).

    Raises:
      ValueError / TypeError: naming the argument and the shapes, for any inconsistent argument, an
        unknown ``implementation``, or ``"pallas"`` when the kernel cannot run the arguments.
    """
    args = _canonical(query, key, value, bias, mask, segment_ids, query_seq_lengths,
                      key_value_seq_lengths, local_window_size, scale, logits_soft_cap)
    args["is_causal"] = bool(is_causal)
    name, pallas = _choose(implementation, args, block_sizes)
    band = _masks.make_band(args["is_causal"], args["window"])
    common = (args["query"], args["key"], args["value"])
    if name == "pallas":
        out = pallas.pallas_attention(
            *common, scale=args["scale"], is_causal=args["is_causal"],
            local_window_size=args["window"], q_segment_ids=args["q_seg"],
            kv_segment_ids=args["kv_seg"], query_seq_lengths=args["q_len"],
            key_value_seq_lengths=args["kv_len"], logits_soft_cap=args["softcap"],
            return_residual=return_residual,
        )
        out, lse = out if return_residual else (out, None)
    else:
        rest = (args["bias"], args["mask"], args["q_seg"], args["kv_seg"], args["q_len"],
                args["kv_len"])
        kw = dict(scale=args["scale"], band=band, softcap=args["softcap"])
        if name == "chunked":
            sizes = block_sizes or ChunkedBlockSizes.default()
            out, lse = _chunked.chunked_attention(*common, *rest, block_sizes=sizes, **kw)
        elif name == "cpu":
            sizes = None if block_sizes is None else (block_sizes.block_q, block_sizes.block_k)
            out, lse = _cpu.cpu_attention(
                *common, args["q_seg"], args["kv_seg"], args["q_len"], args["kv_len"],
                scale=args["scale"], band=band, block_sizes=sizes,
            )
        else:
            out, lse = _reference.xla_attention(*common, *rest, **kw)
    out = out.astype(args["out_dtype"])
    if not args["batched"]:
        out = out[0]
        lse = None if lse is None else lse[0]
    return (out, lse) if return_residual else out


def attention_weights(
    query: ArrayLike,
    key: ArrayLike,
    bias: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: ArrayLike | None = None,
    key_value_seq_lengths: ArrayLike | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    segment_ids: ArrayLike | tuple[ArrayLike, ArrayLike] | None = None,
    logits_soft_cap: float | None = None,
) -> jax.Array:
    """Attention probabilities: how much each query listens to each key, for inspection and plots.

    The same definition as :func:`dot_product_attention` (arguments have the same meaning), but it
    returns the T×S probabilities instead of using them, so it always materialises them.

    Dimension legend: B batch, T query length, S key length, N query heads, K kv heads, H head dim.

    Args:
      query: BTNH (or TNH).
      key: BSKH (or SKH).
      bias, mask, scale, is_causal, query_seq_lengths, key_value_seq_lengths, local_window_size,
        segment_ids, logits_soft_cap: as in :func:`dot_product_attention`.

    Returns:
      Probabilities BNTS (NTS for rank 3) in float32 (float64 for float64 inputs); each row sums to 1
      over the visible keys, and rows that see no key are all zeros.
    """
    query_arr = _checks.as_array(query, "query")
    key_arr = _checks.as_array(key, "key")
    args = _canonical(query_arr, key_arr, key_arr, bias, mask, segment_ids, query_seq_lengths,
                      key_value_seq_lengths, local_window_size, scale, logits_soft_cap)
    probs = _reference.attention_probs(
        args["query"], args["key"], args["bias"], args["mask"], args["q_seg"], args["kv_seg"],
        args["q_len"], args["kv_len"], scale=args["scale"],
        band=_masks.make_band(bool(is_causal), args["window"]), softcap=args["softcap"],
    )
    return probs if args["batched"] else probs[0]
