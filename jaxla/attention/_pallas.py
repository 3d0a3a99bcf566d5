"""Flash attention as Pallas kernels: entry points, block sizes, padding, dispatch and ``custom_vjp``.

The attention front end calls ``unsupported_reason`` and, when it returns None, ``pallas_attention``.
Callers never see a block-multiple rule: T and S are padded here to multiples of every block size the
three kernels use, the padding is masked inside the kernels, and the results are sliced back.

Backends: Triton on GPU, Mosaic on TPU, and Pallas interpret mode anywhere (the CPU tests run the
exact kernel bodies that the GPU compiles). Mosaic GPU is not used: the Triton kernels are the one
GPU path that this package tests.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxla import _checks
from jaxla.attention import _pallas_common as c
from jaxla.attention._pallas_bwd import flash_backward
from jaxla.attention._pallas_fwd import flash_forward

SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_GPU_PLATFORMS = ("gpu", "cuda", "rocm")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the three kernels (rows of Q × rows of K/V per step) and Triton launch options.

    Sizes are upper bounds: a sequence shorter than a block uses the next power of two at or above
    its length instead (at least 16, the smallest tile a GPU matrix unit takes; 128 on TPU).
    """

    block_q: int = 128
    block_k: int = 64
    block_q_dq: int = 64
    block_k_dq: int = 64
    block_q_dkv: int = 64
    block_k_dkv: int = 64
    num_warps: int = 4
    num_stages: int = 2
    num_warps_bwd: int = 4
    num_stages_bwd: int = 2

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            _checks.check_positive_int(value, f"BlockSizes.{f.name}")
            if f.name.startswith("block_") and value & (value - 1):
                raise ValueError(f"BlockSizes.{f.name} must be a power of two, got {value}")

    @classmethod
    def default(cls, *, platform: str, head_dim: int) -> BlockSizes:
        """Defaults per platform and head dim (GPU values sized for Hopper's 228 KiB shared memory).

        Args:
          platform: "gpu"/"cuda"/"rocm", "tpu", or anything else for interpret mode.
          head_dim: H, the query/key head dimension.
        """
        if platform in _GPU_PLATFORMS:
            if head_dim <= 64:
                return cls(128, 64, 64, 64, 64, 64, num_warps=4, num_stages=3,
                           num_warps_bwd=4, num_stages_bwd=2)
            if head_dim <= 128:
                return cls(128, 64, 64, 64, 64, 64, num_warps=8, num_stages=2,
                           num_warps_bwd=8, num_stages_bwd=2)
            return cls(64, 32, 32, 32, 32, 32, num_warps=8, num_stages=1,
                       num_warps_bwd=8, num_stages_bwd=1)
        if platform == "tpu":
            return cls(128, 128, 128, 128, 128, 128)
        # Interpret mode: each grid step and loop trip costs Python-level overhead, not FLOPs.
        return cls(32, 32, 32, 32, 32, 32)


def _platform() -> str:
    return jax.default_backend()


def _fit(block: int, length: int, floor: int) -> int:
    need = max(floor, 1 << max(length - 1, 0).bit_length())
    return max(min(block, need), 1)


def unsupported_reason(query, key, value, *, has_bias: bool, has_mask: bool, platform: str):
    """Why the Pallas kernel cannot run these arguments on ``platform``, or None when it can.

    Args:
      query: (B, T, N, H) array or ShapeDtypeStruct.
      key: (B, S, K, H).
      value: (B, S, K, Hv).
      has_bias: whether an additive bias was given (not supported).
      has_mask: whether an explicit boolean mask was given (not supported: use segment ids,
        lengths, causal or a window).
      platform: the JAX backend name ("gpu", "tpu", "cpu", ...).

    Returns:
      None if supported, else a human-readable reason.
    """
    if has_bias:
        return "bias is not supported by the Pallas kernel"
    if has_mask:
        return ("an explicit mask is not supported by the Pallas kernel (use causal, a local window, "
                "segment ids or sequence lengths)")
    if platform in _GPU_PLATFORMS:
        if not c.triton_available():
            return "jax.experimental.pallas.triton is not available in this jaxlib"
    elif platform == "tpu":
        if not c.mosaic_available():
            return "jax.experimental.pallas.tpu is not available in this jaxlib"
    else:
        return (f"platform {platform} has no compiled Pallas kernel (GPU and TPU only); use "
                "implementation=\"chunked\" on CPU, or jaxla.attention._pallas.pallas_attention(..., "
                "interpret=True) to debug the kernel in interpret mode")
    for name, x in (("query", query), ("key", key), ("value", value)):
        if len(x.shape) != 4:
            return f"{name} must have rank 4, got shape {tuple(x.shape)}"
        if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
            return f"{name} dtype {x.dtype} not in (float32, bfloat16, float16)"
    if not (query.dtype == key.dtype == value.dtype):
        return f"query/key/value dtypes differ ({query.dtype}, {key.dtype}, {value.dtype})"
    if query.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return f"head dim {query.shape[-1]} not in {SUPPORTED_HEAD_DIMS}"
    if value.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return f"value head dim {value.shape[-1]} not in {SUPPORTED_HEAD_DIMS}"
    if key.shape[-1] != query.shape[-1]:
        return f"key head dim {key.shape[-1]} != query head dim {query.shape[-1]}"
    n, k = query.shape[2], key.shape[2]
    if k == 0 or n % k:
        return f"query heads {n} not a multiple of kv heads {k}"
    return None


# ---- custom_vjp core: padded arrays in the plan's layout -------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_seg, kv_seg, plan):
    return flash_forward(q, k, v, q_seg, kv_seg, plan)


def _flash_fwd(q, k, v, q_seg, kv_seg, plan):
    out, lse = flash_forward(q, k, v, q_seg, kv_seg, plan)
    return (out, lse), (q, k, v, q_seg, kv_seg, out, lse)


def _flash_bwd(plan, residuals, cotangents):
    q, k, v, q_seg, kv_seg, out, lse = residuals
    d_out, d_lse = cotangents
    dq, dk, dv = flash_backward(q, k, v, q_seg, kv_seg, out, lse, d_out, d_lse, plan)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---- argument checks and preparation ---------------------------------------------------------


def _check_args(query, key, value, q_seg, kv_seg, q_len, kv_len, window, softcap):
    for name, x in (("query", query), ("key", key), ("value", value)):
        _checks.check_floating(x, name)
        _checks.check_rank(x, name, 4, "B, T|S, heads, head_dim")
    b, t, n, h = query.shape
    s, kh = key.shape[1], key.shape[2]
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(
            f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}"
        )
    _checks.check_axis_size(key, "key", 0, b, "batch of query")
    _checks.check_axis_size(key, "key", 3, h, "head dim of query")
    _checks.check_axis_size(value, "value", 0, b, "batch of query")
    _checks.check_axis_size(value, "value", 1, s, "sequence length of key")
    _checks.check_axis_size(value, "value", 2, kh, "kv heads of key")
    if kh == 0 or n % kh:
        raise ValueError(
            f"query heads N={n} must be a multiple of kv heads K={kh} (query {tuple(query.shape)}, "
            f"key {tuple(key.shape)})"
        )
    if (q_seg is None) != (kv_seg is None):
        raise ValueError("q_segment_ids and kv_segment_ids must be given together")
    for name, x, length in (("q_segment_ids", q_seg, t), ("kv_segment_ids", kv_seg, s)):
        if x is not None:
            _checks.check_integer(x, name)
            _checks.check_rank(x, name, 2, "B, T|S")
            _checks.check_axis_size(x, name, 0, b, "batch of query")
            _checks.check_axis_size(x, name, 1, length, "sequence length")
    for name, x in (("query_seq_lengths", q_len), ("key_value_seq_lengths", kv_len)):
        if x is not None:
            _checks.check_integer(x, name)
            _checks.check_rank(x, name, 1, "B")
            _checks.check_axis_size(x, name, 0, b, "batch of query")
    if window is not None:
        if len(window) != 2:
            raise ValueError(f"local_window_size must be (left, right), got {window!r}")
        for side, w in zip(("left", "right"), window, strict=True):
            if w is not None:
                _checks.check_positive_int(w, f"local_window_size {side}", allow_zero=True)
    if softcap is not None and not softcap > 0:
        raise ValueError(f"logits_soft_cap must be > 0, got {softcap}")


def _segments(seg, length, batch, size, padded, invalid):
    """int32 (B, padded) ids with positions past ``length`` or ``size`` set to ``invalid``."""
    ids = jnp.zeros((batch, size), jnp.int32) if seg is None else seg.astype(jnp.int32)
    if length is not None:
        valid = jnp.arange(size, dtype=jnp.int32)[None, :] < length.astype(jnp.int32)[:, None]
        ids = jnp.where(valid, ids, jnp.int32(invalid))
    return jnp.pad(ids, ((0, 0), (0, padded - size)), constant_values=invalid)


def _resolve_backend(interpret: bool | None, platform: str) -> str:
    if interpret is None:
        interpret = platform not in (*_GPU_PLATFORMS, "tpu")
    if interpret:
        return "interpret"
    if platform in _GPU_PLATFORMS:
        return "triton"
    if platform == "tpu":
        return "mosaic"
    raise ValueError(f"platform {platform} needs interpret mode (pass interpret=True or None)")


def pallas_attention(
    query,
    key,
    value,
    *,
    scale: float,
    is_causal: bool = False,
    local_window_size: tuple[int | None, int | None] | None = None,
    q_segment_ids=None,
    kv_segment_ids=None,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    logits_soft_cap: float | None = None,
    return_residual: bool = False,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
):
    """Flash attention with Pallas kernels (Triton on GPU, Mosaic on TPU, interpret mode on CPU).

    Dimensions: B batch, T query length, S key length, N query heads, K kv heads (N multiple of K;
    query head n reads kv head n // (N // K)), H query/key head dim, Hv value head dim.

    Key j is visible to query i iff (not causal or j <= i) and (no window or i - left <= j <=
    i + right) and i < query_seq_lengths[b] and j < key_value_seq_lengths[b] and
    q_segment_ids[b, i] == kv_segment_ids[b, j]. Logits are ``scale·q·kᵀ``, then ``c·tanh(x/c)``
    with a soft cap c; the softmax runs in f32 over visible keys. A query row with no visible key
    returns zeros (and zero gradients). Any T and S work: padding to block multiples is internal.

    Args:
      query: BTNH array, float32/bfloat16/float16 (float64 too in interpret mode).
      key: BSKH array, same dtype.
      value: BSKHv array, same dtype.
      scale: logit scale, a Python float (usually H ** -0.5).
      is_causal: top-left aligned causal mask (as ``jax.nn.dot_product_attention``).
      local_window_size: None or (left, right); either side may be None for unbounded.
      q_segment_ids: None or (B, T) integer ids; given together with ``kv_segment_ids``.
      kv_segment_ids: None or (B, S) integer ids.
      query_seq_lengths: None or (B,) integer valid query lengths.
      key_value_seq_lengths: None or (B,) integer valid key lengths.
      logits_soft_cap: None or c > 0.
      return_residual: also return the logsumexp of the visible logits.
      block_sizes: tile sizes; None picks ``BlockSizes.default`` for the platform and H.
      interpret: run in Pallas interpret mode; None means only where there is no GPU/TPU.

    Returns:
      out BTNHv in query's dtype, or ``(out, lse)`` with lse BTN in f32 (-inf on empty rows).
    """
    return _attention(
        query, key, value, scale=scale, is_causal=is_causal, local_window_size=local_window_size,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
        query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
        logits_soft_cap=logits_soft_cap, return_residual=return_residual,
        block_sizes=block_sizes, interpret=interpret, layout=None,
    )


def _attention(query, key, value, *, scale, is_causal, local_window_size, q_segment_ids,
               kv_segment_ids, query_seq_lengths, key_value_seq_lengths, logits_soft_cap,
               return_residual, block_sizes, interpret, layout):
    """``pallas_attention`` with the kernel layout selectable (tests run the TPU layout on CPU)."""
    query = _checks.as_array(query, "query")
    key = _checks.as_array(key, "key")
    value = _checks.as_array(value, "value")
    window = None if local_window_size is None else tuple(local_window_size)
    _check_args(query, key, value, q_segment_ids, kv_segment_ids, query_seq_lengths,
                key_value_seq_lengths, window, logits_soft_cap)
    platform = _platform()
    backend = _resolve_backend(interpret, platform)
    if backend != "interpret":
        reason = unsupported_reason(query, key, value, has_bias=False, has_mask=False,
                                    platform=platform)
        if reason is not None:
            raise ValueError(f"pallas_attention cannot run these arguments: {reason}")
    # Interpret mode also runs float64 (the exact-reference tests rely on it).
    elif jnp.dtype(query.dtype) not in (*SUPPORTED_DTYPES, jnp.dtype(jnp.float64)):
        raise TypeError(f"query dtype {query.dtype} not in (float32, bfloat16, float16)")
    if layout is None:
        layout = "bnth" if backend == "mosaic" else "btnh"
    if layout not in c.LAYOUTS:
        raise ValueError(f"layout must be one of {c.LAYOUTS}, got {layout!r}")

    _, t, n, h = query.shape
    s, kh = key.shape[1], key.shape[2]
    sizes = block_sizes or BlockSizes.default(platform=platform, head_dim=h)
    floor = 128 if backend == "mosaic" else 16
    bq, bq_dq, bq_dkv = (_fit(x, t, floor) for x in (sizes.block_q, sizes.block_q_dq,
                                                       sizes.block_q_dkv))
    bk, bk_dq, bk_dkv = (_fit(x, s, floor) for x in (sizes.block_k, sizes.block_k_dq,
                                                       sizes.block_k_dkv))
    t_pad = c.round_up(t, c.lcm(bq, bq_dq, bq_dkv))
    s_pad = c.round_up(s, c.lcm(bk, bk_dq, bk_dkv))
    has_segments = any(x is not None for x in (q_segment_ids, query_seq_lengths,
                                               kv_segment_ids, key_value_seq_lengths))
    left, right = (None, None) if window is None else window
    if is_causal:
        right = 0 if right is None else min(right, 0)
    is_f64 = jnp.dtype(query.dtype) == jnp.float64
    plan = c.Plan(
        scale=float(scale), causal=bool(is_causal), window_left=left, window_right=right,
        softcap=None if logits_soft_cap is None else float(logits_soft_cap),
        t_len=t, s_len=s, t_pad=t_pad, s_pad=s_pad, groups=n // kh, has_segments=has_segments,
        layout=layout, backend=backend, block_q=bq, block_k=bk, block_q_dq=bq_dq,
        block_k_dq=bk_dq, block_q_dkv=bq_dkv, block_k_dkv=bk_dkv, num_warps=sizes.num_warps,
        num_stages=sizes.num_stages, num_warps_bwd=sizes.num_warps_bwd,
        num_stages_bwd=sizes.num_stages_bwd,
        highest_precision=jnp.dtype(query.dtype) in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)),
        acc_dtype="float64" if is_f64 else "float32",
    )

    q_seg = kv_seg = None
    if has_segments:
        q_seg = _segments(q_segment_ids, query_seq_lengths, query.shape[0], t, t_pad, c.Q_INVALID)
        kv_seg = _segments(kv_segment_ids, key_value_seq_lengths, query.shape[0], s, s_pad, c.KV_INVALID)

    def prep(x, padded):
        x = jnp.pad(x, ((0, 0), (0, padded - x.shape[1]), (0, 0), (0, 0)))
        return x if layout == "btnh" else jnp.swapaxes(x, 1, 2)

    out, lse = _flash(prep(query, t_pad), prep(key, s_pad), prep(value, s_pad), q_seg, kv_seg,
                      plan)
    if layout == "bnth":
        out = jnp.swapaxes(out, 1, 2)
    out = out[:, :t]
    if not return_residual:
        return out
    return out, jnp.swapaxes(lse[:, :, :t, 0], 1, 2)
