"""The ``"pallas"`` backend: flash attention as Pallas kernels (block sizes, padding, ``custom_vjp``).

The attention front end calls ``unsupported_reason`` and, when it returns None, ``attend``;
``pallas_attention`` (public as ``jaxla.attention.pallas_attention``, with ``BlockSizes`` as
``jaxla.attention.PallasBlockSizes``) adds tile sizes and interpret mode. Callers never see a
block-multiple rule: T and S are padded here to multiples of every block size the three kernels
use, the padding is masked inside the kernels, and the results are sliced back.

Backends: Triton on GPU (``_pallas_fwd``/``_pallas_bwd``: one program per query or key block that
loops over the other axis), Mosaic on TPU (``_pallas_tpu``: the inner loop is an "arbitrary" grid
axis with VMEM scratch), and Pallas interpret mode anywhere, which runs either structure (the
"btnh" layout runs the Triton kernels, "bnth" the TPU ones). Mosaic GPU is not used: the Triton
kernels are the one GPU path that this package tests (the README says what a port would take).
``_pallas_lower`` lowers every kernel for both backends from a CPU host.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxla import _checks
from jaxla.attention import _args, _base, _pallas_bwd, _pallas_fwd, _pallas_tpu
from jaxla.attention import _pallas_common as c
from jaxla.attention._args import AttentionArgs

SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_GPU_PLATFORMS = ("gpu", "cuda", "rocm")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the three kernels (rows of Q × rows of K/V per step) and Triton launch options.

    Public as ``jaxla.attention.PallasBlockSizes``, the ``block_sizes`` of ``pallas_attention``.
    Sizes are upper bounds: a sequence shorter than a block uses the next power of two at or above
    its length instead (at least 16, the smallest tile a GPU matrix unit takes; 128 on TPU). Block
    sizes must be powers of two and, on a compiled backend, at least its floor (16 on Triton, 128 on
    Mosaic TPU; interpret mode takes any); ``num_warps``/``num_warps_bwd`` must be powers of two.
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
            if (f.name.startswith("block_") or f.name.startswith("num_warps")) and (
                    value & (value - 1)):
                raise ValueError(f"BlockSizes.{f.name} must be a power of two, got {value}")

    def check_floor(self, backend: str) -> None:
        """ValueError naming every block size below ``backend``'s smallest tile."""
        floor = c.BLOCK_FLOOR[backend]
        small = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                 if f.name.startswith("block_") and getattr(self, f.name) < floor]
        if small and backend != "interpret":
            raise ValueError(
                f"PallasBlockSizes too small for the {backend} backend: {', '.join(small)} "
                f"(every block size must be at least {floor} there)")

    @classmethod
    def default(cls, *, platform: str, head_dim: int, dtype=None) -> BlockSizes:
        """Defaults per platform, head dim and dtype (GPU: sized for Hopper's 227 KiB shared memory).

        Args:
          platform: "gpu"/"cuda"/"rocm", "tpu", or anything else for interpret mode.
          head_dim: H, the query/key head dimension.
          dtype: the input dtype; float32 tiles take twice the shared memory (None: 16-bit).
        """
        if platform in _GPU_PLATFORMS and dtype is not None and jnp.dtype(dtype).itemsize > 2:
            # float32 (exact IEEE dots, no tensor cores): half the 16-bit tiles' K/V bytes per
            # stage, so every kernel fits 227 KiB (the 16-bit defaults would need up to 272 KiB).
            if head_dim <= 64:
                return cls(128, 64, 64, 64, 64, 64, num_warps=4, num_stages=3,
                           num_warps_bwd=4, num_stages_bwd=2)
            if head_dim <= 128:
                return cls(128, 64, 64, 64, 64, 64, num_warps=8, num_stages=2,
                           num_warps_bwd=8, num_stages_bwd=2)
            return cls(64, 32, 32, 32, 32, 32, num_warps=8, num_stages=1,
                       num_warps_bwd=8, num_stages_bwd=1)
        if platform in _GPU_PLATFORMS:
            # Chosen with ``jaxla bench triton_compile`` (sm_90a, bf16/f16; table in
            # benchmarks/RESULTS.md): every kernel fits 227 KiB of shared memory, spills at most
            # 328 B per thread, and uses wgmma, except the H = 256 dK/dV kernel, whose two
            # (bk, 256) f32 accumulators spill >= 2.3 KB per thread at bk = 64: it keeps 32-row
            # mma.sync tiles, which do not spill.
            if head_dim <= 64:
                return cls(128, 128, 64, 64, 64, 64, num_warps=8, num_stages=3,
                           num_warps_bwd=4, num_stages_bwd=2)
            if head_dim <= 128:
                return cls(128, 128, 64, 64, 64, 64, num_warps=8, num_stages=2,
                           num_warps_bwd=8, num_stages_bwd=2)
            return cls(64, 64, 64, 64, 32, 32, num_warps=8, num_stages=2,
                       num_warps_bwd=8, num_stages_bwd=2)
        if platform == "tpu":
            return cls(128, 128, 128, 128, 128, 128)
        # Interpret mode: each grid step and loop trip costs Python-level overhead, not FLOPs.
        return cls(32, 32, 32, 32, 32, 32)


def _platform() -> str:
    return jax.default_backend()


def _fit(block: int, length: int, floor: int) -> int:
    need = max(floor, 1 << max(length - 1, 0).bit_length())
    return max(min(block, need), 1)


def unsupported_reason(args: AttentionArgs, *, platform: str, interpret: bool = False):
    """Why the Pallas kernels cannot run ``args`` on ``platform``, or None when they can.

    Args:
      args: the canonical arguments.
      platform: the JAX backend name ("gpu", "tpu", "cpu", ...).
      interpret: asking for Pallas interpret mode, which runs anywhere (and float64 too).

    Returns:
      None if supported, else a human-readable reason.
    """
    if args.bias is not None:
        return "bias is not supported by the Pallas kernel"
    if args.mask is not None:
        return ("an explicit mask is not supported by the Pallas kernel (use causal, a local window, "
                "segment ids or sequence lengths)")
    dtypes = SUPPORTED_DTYPES
    if interpret:
        dtypes = (*dtypes, jnp.dtype(jnp.float64))
    elif platform in _GPU_PLATFORMS:
        if not c.triton_available():
            return "jax.experimental.pallas.triton is not available in this jaxlib"
    elif platform == "tpu":
        if not c.mosaic_available():
            return "jax.experimental.pallas.tpu is not available in this jaxlib"
        # TPUs have no f16 VPU/MXU path (Mosaic would emulate it through f32 at best).
        dtypes = tuple(d for d in dtypes if d != jnp.dtype(jnp.float16))
    else:
        return (f"platform {platform} has no compiled Pallas kernel (GPU and TPU only); use "
                "implementation=\"chunked\" on CPU, or jaxla.attention.pallas_attention(..., "
                "interpret=True) to debug the kernel in interpret mode")
    if args.dtype not in dtypes:
        names = ", ".join(str(d) for d in dtypes)
        return f"dtype {args.dtype} not in ({names})"
    if args.head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head dim {args.head_dim} not in {SUPPORTED_HEAD_DIMS}"
    if args.value_head_dim not in SUPPORTED_HEAD_DIMS:
        return f"value head dim {args.value_head_dim} not in {SUPPORTED_HEAD_DIMS}"
    return None


# ---- custom_vjp core: padded arrays in the plan's layout -------------------------------------


def _kernels(plan):
    """The kernel module for the plan's layout: TPU-structured for "bnth", Triton-structured else."""
    if plan.layout == "bnth":
        return _pallas_tpu.flash_forward, _pallas_tpu.flash_backward
    return _pallas_fwd.flash_forward, _pallas_bwd.flash_backward


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_seg, kv_seg, plan):
    return _kernels(plan)[0](q, k, v, q_seg, kv_seg, plan)


def _flash_fwd(q, k, v, q_seg, kv_seg, plan):
    out, lse = _kernels(plan)[0](q, k, v, q_seg, kv_seg, plan)
    return (out, lse), (q, k, v, q_seg, kv_seg, out, lse)


def _flash_bwd(plan, residuals, cotangents):
    q, k, v, q_seg, kv_seg, out, lse = residuals
    d_out, d_lse = cotangents
    dq, dk, dv = _kernels(plan)[1](q, k, v, q_seg, kv_seg, out, lse, d_out, d_lse, plan)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---- preparation -----------------------------------------------------------------------------


def _segments(seg, length, batch, size, padded, invalid):
    """int32 (B, padded) ids with positions past ``length`` or ``size`` set to ``invalid``."""
    ids = jnp.zeros((batch, size), jnp.int32) if seg is None else seg
    if length is not None:
        valid = jnp.arange(size, dtype=jnp.int32)[None, :] < length[:, None]
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


def attend(args: AttentionArgs, *, block_sizes=None, pallas_block_sizes: BlockSizes | None = None,
           interpret: bool | None = None, layout: str | None = None,
           reverse_q_blocks: bool | None = None):
    """The backend entry point (see ``_base``) on arguments ``unsupported_reason`` accepted.

    Args:
      args: the canonical arguments.
      block_sizes: the caller's ``ChunkedBlockSizes``; ignored (they tile "chunked" and "cpu").
      pallas_block_sizes: the kernels' tiles; None picks ``BlockSizes.default`` for the platform,
        H and dtype.
      interpret: run in Pallas interpret mode; None means only where there is no GPU/TPU.
      layout: "btnh" or "bnth" (how the kernels see the arrays); None picks the backend's own
        (the tests run Mosaic's "bnth" in interpret mode).
      reverse_q_blocks: launch causal query blocks longest-first; None means on Triton only (the
        tests force it in interpret mode).

    Returns:
      ``(out, lse)``: out (B, T, N, Hv) in the compute dtype, lse (B, T, N) with -inf on rows that
      see no key (``_base.normalize`` makes that ``EMPTY_ROW_LSE``).
    """
    del block_sizes
    platform = _platform()
    backend = _resolve_backend(interpret, platform)
    if layout is None:
        layout = "bnth" if backend == "mosaic" else "btnh"
    if layout not in c.LAYOUTS:
        raise ValueError(f"layout must be one of {c.LAYOUTS}, got {layout!r}")

    query, key, value = args.query, args.key, args.value
    b, t, n, h = query.shape
    s, kh = key.shape[1], key.shape[2]
    if pallas_block_sizes is not None:
        pallas_block_sizes.check_floor(backend)
    sizes = pallas_block_sizes or BlockSizes.default(platform=platform, head_dim=h,
                                                      dtype=args.dtype)
    floor = c.BLOCK_FLOOR[backend]
    bq, bq_dq, bq_dkv = (_fit(x, t, floor) for x in (sizes.block_q, sizes.block_q_dq,
                                                       sizes.block_q_dkv))
    bk, bk_dq, bk_dkv = (_fit(x, s, floor) for x in (sizes.block_k, sizes.block_k_dq,
                                                       sizes.block_k_dkv))
    t_pad = c.round_up(t, c.lcm(bq, bq_dq, bq_dkv))
    s_pad = c.round_up(s, c.lcm(bk, bk_dq, bk_dkv))
    q_lens, kv_lens = args.query_seq_lengths, args.key_value_seq_lengths
    has_segments = args.q_segment_ids is not None or q_lens is not None or kv_lens is not None
    is_f64 = args.dtype == jnp.float64
    plan = c.Plan(
        scale=args.scale, causal=args.is_causal, window_left=args.band.left,
        window_right=args.band.right, softcap=args.softcap,
        t_len=t, s_len=s, t_pad=t_pad, s_pad=s_pad, groups=n // kh, has_segments=has_segments,
        layout=layout, backend=backend, block_q=bq, block_k=bk, block_q_dq=bq_dq,
        block_k_dq=bk_dq, block_q_dkv=bq_dkv, block_k_dkv=bk_dkv, num_warps=sizes.num_warps,
        num_stages=sizes.num_stages, num_warps_bwd=sizes.num_warps_bwd,
        num_stages_bwd=sizes.num_stages_bwd,
        highest_precision=args.dtype in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)),
        acc_dtype="float64" if is_f64 else "float32",
        reverse_q_blocks=bool(args.is_causal and (
            backend == "triton" if reverse_q_blocks is None else reverse_q_blocks)),
    )

    q_seg = kv_seg = None
    if has_segments:
        q_seg = _segments(args.q_segment_ids, q_lens, b, t, t_pad, c.Q_INVALID)
        kv_seg = _segments(args.kv_segment_ids, kv_lens, b, s, s_pad, c.KV_INVALID)

    def prep(x, padded):
        x = jnp.pad(x, ((0, 0), (0, padded - x.shape[1]), (0, 0), (0, 0)))
        return x if layout == "btnh" else jnp.swapaxes(x, 1, 2)

    out, lse = _flash(prep(query, t_pad), prep(key, s_pad), prep(value, s_pad), q_seg, kv_seg,
                      plan)
    if layout == "bnth":
        out = jnp.swapaxes(out, 1, 2)
    return out[:, :t], jnp.swapaxes(lse[:, :, :t, 0], 1, 2)


def pallas_attention(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: ArrayLike | None = None,
    key_value_seq_lengths: ArrayLike | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    segment_ids: ArrayLike | tuple[ArrayLike, ArrayLike] | None = None,
    logits_soft_cap: float | None = None,
    return_residual: bool = False,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Flash attention with jaxla's Pallas kernels: Triton on GPU, Mosaic on TPU, or interpret mode.

    ``dot_product_attention(..., implementation="pallas")`` with two extra controls: the kernels'
    tile sizes and interpret mode, which runs the exact kernel bodies anywhere (slowly), e.g. to
    debug them or to test them on CPU. Arguments, visibility rule and results are those of
    :func:`jaxla.dot_product_attention` (no ``bias`` or ``mask`` arrays: the kernels build
    visibility from causal, the window, lengths and segments).

    Dimension legend: B batch, T query length, S key length, N query heads, K kv heads (N a
    multiple of K), H query/key head dim, Hv value head dim (H and Hv in 64, 128, 256).

    Args:
      query: BTNH (or TNH); bfloat16, float16 (not on TPU) or float32 (float64 too in interpret
        mode). float32 runs exact IEEE f32 dots, without tensor cores on GPU; there
        ``dot_product_attention(implementation=None)`` sends float32 to XLA instead.
      key: BSKH (or SKH).
      value: BSKHv (or SKHv).
      scale, is_causal, query_seq_lengths, key_value_seq_lengths, local_window_size, segment_ids,
        logits_soft_cap, return_residual: as in :func:`jaxla.dot_product_attention`.
      block_sizes: a ``PallasBlockSizes`` (tiles of the forward, dQ and dK/dV kernels and Triton
        launch options); None picks ``PallasBlockSizes.default`` for the platform, H and dtype.
      interpret: run in Pallas interpret mode; None means only where there is no GPU or TPU.

    Returns:
      As :func:`jaxla.dot_product_attention`: the output BTNHv in the query dtype, and with
      ``return_residual`` the logsumexp BTN (``EMPTY_ROW_LSE`` on rows that see no key).

    Raises:
      ValueError / TypeError: for inconsistent arguments (naming them), or arguments the kernels
        cannot run (the reason is in the message).
    """
    args = _args.canonical_args(
        query, key, value, scale=scale, is_causal=is_causal, query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths, local_window_size=local_window_size,
        segment_ids=segment_ids, logits_soft_cap=logits_soft_cap,
    )
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise TypeError(f"block_sizes must be a PallasBlockSizes, got {type(block_sizes).__name__}")
    platform = _platform()
    interpret = platform not in (*_GPU_PLATFORMS, "tpu") if interpret is None else bool(interpret)
    reason = unsupported_reason(args, platform=platform, interpret=interpret)
    if reason is not None:
        raise ValueError(f"pallas_attention cannot run these arguments: {reason}")
    out, lse = _base.run(attend, args, pallas_block_sizes=block_sizes,
                         interpret=interpret)
    return (out, lse) if return_residual else out
