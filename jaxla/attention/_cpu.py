"""The ``"cpu"`` backend: jaxla's compiled CPU attention kernels, called through XLA's FFI.

``_cpu_ext.cc`` holds a tiled online-softmax forward pass and a blockwise backward pass (from the saved
logsumexp) in float32, each run as whole tiles per thread on XLA's CPU thread pool. They cover the
causal/window band, per-batch lengths and segment ids; arguments they do not cover (a bias or mask
array, a logit soft cap, head dims that are not a multiple of 8, float64) go to ``"chunked"``.
bfloat16/float16 inputs are computed in float32 and cast back, except that on a CPU with AVX512-BF16
the avx512 path takes bfloat16 q, k, v as they are in both passes (bf16 dot products accumulated in
float32, float32 softmax; ``_bf16_forward``). Those bf16 GEMMs run on AMX tiles where the CPU and OS
have AMX-BF16 (Intel Sapphire Rapids and later: ``_cpu_amx.inc``), else with AVX512-BF16 dot
products (``vdpbf16ps``); ``bf16_kernels()`` lists what this CPU runs, best first, and the
environment variable ``JAXLA_CPU_BF16`` (``amx`` or ``avx512bf16``) picks one, by the same rule as
``JAXLA_CPU_KERNEL``.

The extension is built by ``pip install`` (setup.py; optional, so an install without a C++ compiler
still works and uses ``"chunked"``). ``unsupported_reason`` says why the kernel cannot run.

Code paths: the tile code (``_cpu_kernels.inc``) is compiled for AVX-512 (16-float vectors, a 12 × 32
register tile), AVX2 + FMA (8-float vectors, 6 × 16) and the baseline target ("portable": 4-float
SSE2/NEON vectors, 6 × 8), plus an AVX512-BF16 copy for the bf16 forward pass, and one build runs on
any x86-64 CPU. ``supported_paths()`` lists what this CPU runs, best first; ``kernel_path()`` is the
path calls use: the best one, or the one the environment variable ``JAXLA_CPU_KERNEL``
(``avx512``, ``avx2`` or ``portable``) names, read once when this module is imported. A name the CPU
cannot run makes the kernel unavailable with that reason (``implementation="cpu"`` then raises it,
and importing this module warns, since ``implementation=None`` then picks another backend).
Tests and benchmarks pass ``path=`` to :func:`attend` to run a given path.

Dimension legend: B batch, T query length, S key length, N query heads, K kv heads, H query/key head
dim, Hv value head dim.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxla import _cpu_dispatch
from jaxla.attention import _reference, _vma
from jaxla.attention._args import AttentionArgs

try:
    from jaxla.attention import _cpu_ext
except ImportError as e:  # pragma: no cover - depends on the build
    _cpu_ext = None
    _IMPORT_ERROR = str(e)
else:
    _IMPORT_ERROR = None

_FWD, _BWD = "jaxla_attention_fwd", "jaxla_attention_bwd"
_registered = False
ENV_VAR = _cpu_dispatch.ENV_VAR
# What the extension's C++ side numbers each path (its `path` attribute), and those this CPU runs.
_PATH_IDS, _SUPPORTED = _cpu_ext.paths() if _cpu_ext is not None else ({}, [])
_SUPPORTED = tuple(_SUPPORTED)
# Whether the backward kernel takes bf16 operands where the forward one does (_bf16_forward); a
# build without the attribute computes the backward pass in f32.
_BF16_BACKWARD = bool(getattr(_cpu_ext, "BF16_BACKWARD", 0))
BF16_ENV_VAR = "JAXLA_CPU_BF16"
# The bf16 GEMM kernels of the avx512 path, best first: AMX tiles, AVX512-BF16 dot products.
_BF16_KERNELS = ("amx", "avx512bf16")


def _choose_path(env: str | None) -> tuple[str | None, str | None]:
    """(path, None) for the path calls use, or (None, why not) when ``env`` names one we cannot run
    (the rule every compiled jaxla kernel follows: :func:`jaxla._cpu_dispatch.choose_path`)."""
    return _cpu_dispatch.choose_path(env, _PATH_IDS, _SUPPORTED)


def _has_amx_attr(ext) -> bool:
    """Whether the extension's calls take the ``amx`` attribute (builds before it do not)."""
    return ext is not None and hasattr(ext, "amx_bf16")


def _supported_bf16_kernels(ext) -> tuple[str, ...]:
    """The bf16 GEMM kernels of ``ext`` this CPU runs, best first."""
    if ext is None or not ext.bf16_dot():
        return ()
    return ("amx",) * bool(_has_amx_attr(ext) and ext.amx_bf16()) + ("avx512bf16",)


_PATH, _PATH_ERROR = _choose_path(os.environ.get(ENV_VAR)) if _cpu_ext is not None else (None, None)
_BF16_SUPPORTED = _supported_bf16_kernels(_cpu_ext)
_BF16_KERNEL, _BF16_ERROR = _cpu_dispatch.choose_path(
    os.environ.get(BF16_ENV_VAR), _BF16_KERNELS, _BF16_SUPPORTED, var=BF16_ENV_VAR)
if _PATH_ERROR is None:
    _PATH_ERROR = _BF16_ERROR
if _PATH_ERROR is not None:  # implementation=None would quietly fall back to "chunked": say so once
    warnings.warn(f"the compiled CPU attention kernel is off: {_PATH_ERROR}", RuntimeWarning,
                  stacklevel=2)


def supported_paths() -> tuple[str, ...]:
    """The compiled code paths this CPU can run, best first (empty when the extension is not built)."""
    return _SUPPORTED


def kernel_path() -> str | None:
    """The code path calls use (``"avx512"``, ``"avx2"`` or ``"portable"``), or None when unavailable."""
    return _PATH if available() is None else None


def _register() -> None:
    global _registered
    if not _registered:
        for name, capsule in _cpu_ext.registrations().items():
            jax.ffi.register_ffi_target(name, capsule, platform="cpu")
        _registered = True


def available() -> str | None:
    """None when the compiled kernels can run on this machine, else why not."""
    if _cpu_ext is None:
        return f"the compiled extension jaxla.attention._cpu_ext is not built ({_IMPORT_ERROR})"
    if _PATH_ERROR is not None:
        return _PATH_ERROR
    return None


def unsupported_reason(args: AttentionArgs, *, platform: str) -> str | None:
    """None when the kernels can run these arguments on ``platform``, else the reason."""
    if platform != "cpu":
        return f"it runs on CPU only (the default backend is {platform})"
    reason = available()
    if reason is not None:
        return reason
    if args.bias is not None:
        return "a bias array is not supported by the CPU kernel"
    if args.mask is not None:
        return "a mask array is not supported by the CPU kernel"
    if args.softcap is not None:
        return "logits_soft_cap is not supported by the CPU kernel"
    if args.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        return f"dtype {args.dtype} (the CPU kernel computes in float32; float64 uses chunked)"
    h, hv = args.head_dim, args.value_head_dim
    if h % 8 or hv % 8:
        return f"head dims H={h}, Hv={hv} must be multiples of 8 for the CPU kernel"
    return None


@dataclasses.dataclass(frozen=True)
class _Config:
    scale: float
    left: int
    right: int
    has_seg: bool
    block_q: int
    block_k: int
    path: int  # the extension's number for the code path (``_PATH_IDS``)
    amx: bool | None = None  # bf16 GEMMs on AMX tiles; None: a build without the attribute

    def attrs(self):
        attrs = dict(scale=np.float32(self.scale), left=np.int64(self.left),
                     right=np.int64(self.right), has_seg=self.has_seg,
                     block_q=np.int64(self.block_q), block_k=np.int64(self.block_k),
                     path=np.int64(self.path))
        if self.amx is not None:
            attrs["amx"] = self.amx
        return attrs


def _call_fwd(cfg, q, k, v, q_len, kv_len, q_seg, kv_seg):
    shapes = (jax.ShapeDtypeStruct(q.shape[:-1] + v.shape[-1:], jnp.float32),
              jax.ShapeDtypeStruct(q.shape[:-1], jnp.float32))
    call = jax.ffi.ffi_call(_FWD, shapes, vmap_method="broadcast_all")
    operands = (q, k, v, q_len, kv_len, q_seg, kv_seg)
    # The custom call's results are typed invariant inside shard_map: they vary as the operands do.
    return tuple(_vma.like(x, *operands) for x in call(*operands, **cfg.attrs()))


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg, q, k, v, q_len, kv_len, q_seg, kv_seg):
    out, lse2 = _call_fwd(cfg, q, k, v, q_len, kv_len, q_seg, kv_seg)
    return out, _reference.lse_from_base2(lse2)


def _attention_fwd(cfg, q, k, v, q_len, kv_len, q_seg, kv_seg):
    out, lse2 = _call_fwd(cfg, q, k, v, q_len, kv_len, q_seg, kv_seg)
    return (out, _reference.lse_from_base2(lse2)), (q, k, v, q_len, kv_len, q_seg, kv_seg, out, lse2)


def _attention_bwd(cfg, res, cotangents):
    q, k, v, q_len, kv_len, q_seg, kv_seg, out, lse2 = res
    dtypes = q.dtype, k.dtype, v.dtype  # bf16 when the forward pass took bf16 (see _bf16_forward)
    d_out, d_lse = cotangents
    if q.dtype == jnp.bfloat16 and _BF16_BACKWARD:
        # The backward kernel's GEMMs in bf16 too (_bf16_forward). d_out is the cotangent of the
        # bf16 output cast to f32 (attend), so rounding it back to bf16 loses nothing.
        d_out = d_out.astype(jnp.bfloat16)
    else:
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
        d_out = d_out.astype(jnp.float32)
    delta = _reference.output_delta(d_out, out, d_lse, jnp.float32)
    shapes = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct(k.shape, jnp.float32),
              jax.ShapeDtypeStruct(v.shape, jnp.float32))
    call = jax.ffi.ffi_call(_BWD, shapes, vmap_method="broadcast_all")
    operands = (q, k, v, d_out, lse2, delta, q_len, kv_len, q_seg, kv_seg)
    grads = call(*operands, **cfg.attrs())
    dq, dk, dv = (_vma.cotangent(_vma.like(g, *operands), x).astype(dt)
                  for g, x, dt in zip(grads, (q, k, v), dtypes, strict=True))
    return dq, dk, dv, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def bf16_dot() -> bool:
    """Whether the avx512 path can take bfloat16 inputs as they are (AVX512-BF16 dot products)."""
    return _cpu_ext is not None and bool(_cpu_ext.bf16_dot())


def amx_bf16() -> bool:
    """Whether the bf16 GEMMs can run on AMX tiles here (AMX-TILE and AMX-BF16, granted by the OS)."""
    return "amx" in _BF16_SUPPORTED


def bf16_kernels() -> tuple[str, ...]:
    """The bf16 GEMM kernels of the avx512 path this CPU runs, best first: ``"amx"`` (AMX tiles),
    ``"avx512bf16"`` (AVX512-BF16 dot products); empty without AVX512-BF16."""
    return _BF16_SUPPORTED


def bf16_kernel() -> str | None:
    """The bf16 GEMM kernel bf16 calls use: the best one, or the one ``JAXLA_CPU_BF16`` names."""
    return _BF16_KERNEL


def _bf16_forward(args: AttentionArgs, path: str) -> bool:
    """Whether this call's forward pass runs on bf16 q, k, v with AVX512-BF16 dot products.

    The products of bf16 values are exact in f32 and accumulate in f32; the softmax is f32 and the
    probabilities are rounded to bf16 for P·V (2^-9 relative), below the bf16 output's own rounding.
    The backward pass then runs its GEMMs in bf16 too (q, k, v, dO as they are; P and dS rounded to
    bf16 for Pᵀ·dO, dSᵀ·Q and dS·K; f32 softmax and accumulation). Needs H and Hv multiples of 32
    and a positive scale. The GEMMs run on AMX tiles or with AVX512-BF16 dot products
    (``bf16_kernel()``, or ``attend``'s ``bf16_kernel``), with the same roundings.
    """
    return (path == "avx512" and args.dtype == jnp.bfloat16 and bf16_dot()
            and args.head_dim % 32 == 0 and args.value_head_dim % 32 == 0 and args.scale > 0)


def default_block_sizes(g: int, path: str | None = None) -> tuple[int, int]:
    """(query positions, keys) per tile for G query heads per kv head on code path ``path``.

    About 96 query rows × 256 keys on AVX2 and portable, 96 × 512 on AVX-512 (None: ``kernel_path()``).
    AVX2: measured on a 2-core AMD EPYC (Zen 3, 512 KB L2 per core), f32, N=K=8, H=64, T=2048 and
    4096, causal and not, forward and forward+backward, best of 4 runs (benchmarks/RESULTS.md): among
    32-128 rows × 128-512 keys, 96 × 256 was fastest or within 8% of the fastest in every case;
    128-key tiles or 32-48 rows lost 10-25% on the backward pass. AVX-512 (12-row register tiles, so
    96 rows are 8 of them): on the AVX-512 EPYC of 2026-12-01 (1 MB L2 per core), 512-key tiles
    were 5-30% faster forward+backward than 256 in three sweeps and level forward (RESULTS.md, noisy
    machine). The score tile, the K/V panels and the output rows of one tile stay in one core's L2.
    """
    path = kernel_path() if path is None else path
    return max(1, 96 // g), 512 if path == "avx512" else 256


def attend(args: AttentionArgs, *, block_sizes=None, path: str | None = None,
           bf16_kernel: str | None = None) -> tuple[jax.Array, jax.Array]:
    """The backend entry point (see ``_base``) on arguments ``unsupported_reason`` accepted.

    Args:
      args: the canonical arguments (float32, bfloat16 or float16; no bias, mask or soft cap).
      block_sizes: a ``ChunkedBlockSizes`` whose ``(block_q, block_k)`` are the kernel's tiles, or
        None for ``default_block_sizes``.
      path: a code path from ``supported_paths()``, or None for ``kernel_path()``.
      bf16_kernel: for bf16 inputs on the avx512 path, a GEMM kernel from ``bf16_kernels()``, or
        None for ``bf16_kernel()``.

    Raises:
      ValueError: ``path`` or ``bf16_kernel`` is not one this CPU runs.

    Returns:
      ``(out, lse)``: out (B, T, N, Hv) in the compute dtype; lse (B, T, N) float32.
    """
    if path is None:
        path = kernel_path()
        if path is None:
            raise ValueError(f"the CPU attention kernel cannot run here: {available()}")
    elif path not in _SUPPORTED:
        raise ValueError(f"path={path!r} is not a CPU kernel path this CPU runs; expected one of "
                         f"{list(_SUPPORTED)}")
    if bf16_kernel is None:
        bf16_kernel = _BF16_KERNEL
    elif bf16_kernel not in _BF16_SUPPORTED:
        raise ValueError(f"bf16_kernel={bf16_kernel!r} is not a bf16 kernel this CPU runs; expected "
                         f"one of {list(_BF16_SUPPORTED)}")
    _register()
    b, t, n, _ = args.query.shape
    s, kh = args.kv_len, args.num_kv_heads
    if block_sizes is None:
        block_q, block_k = default_block_sizes(n // kh, path)
    else:
        block_q, block_k = block_sizes.block_q, block_sizes.block_k
    band = args.band
    cfg = _Config(
        scale=args.scale,
        left=-1 if band.left is None else int(band.left),
        right=-1 if band.right is None else int(band.right),
        has_seg=args.q_segment_ids is not None,
        block_q=int(block_q),
        block_k=int(block_k),
        path=_PATH_IDS[path],
        amx=(_bf16_forward(args, path) and bf16_kernel == "amx") if _has_amx_attr(_cpu_ext) else None,
    )
    q_len, kv_len = args.query_seq_lengths, args.key_value_seq_lengths
    q_len = jnp.full((b,), t, jnp.int32) if q_len is None else q_len
    kv_len = jnp.full((b,), s, jnp.int32) if kv_len is None else kv_len
    q_seg, kv_seg = args.q_segment_ids, args.kv_segment_ids
    if q_seg is None:
        q_seg, kv_seg = jnp.zeros((b, t), jnp.int32), jnp.zeros((b, s), jnp.int32)
    qkv = (args.query, args.key, args.value)
    if not _bf16_forward(args, path):
        qkv = [x.astype(jnp.float32) for x in qkv]
    out, lse = _attention(cfg, *qkv, q_len, kv_len, q_seg, kv_seg)
    return out.astype(args.dtype), lse


__all__ = ["BF16_ENV_VAR", "ENV_VAR", "amx_bf16", "attend", "available", "bf16_dot", "bf16_kernel",
           "bf16_kernels", "default_block_sizes", "kernel_path", "supported_paths",
           "unsupported_reason"]
