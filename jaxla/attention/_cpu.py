"""The ``"cpu"`` backend: jaxla's compiled CPU attention kernels, called through XLA's FFI.

``_cpu_ext.cc`` holds a tiled online-softmax forward pass and a blockwise backward pass (from the saved
logsumexp) in float32, each run as whole tiles per thread on XLA's CPU thread pool. They cover the
causal/window band, per-batch lengths and segment ids; arguments they do not cover (a bias or mask
array, a logit soft cap, head dims that are not a multiple of 8, float64) go to ``"chunked"``.
bfloat16/float16 inputs are computed in float32 and cast back.

The extension is built by ``pip install`` (setup.py; optional, so an install without a C++ compiler
still works and uses ``"chunked"``). ``unsupported_reason`` says why the kernel cannot run.

Dimension legend: B batch, T query length, S key length, N query heads, K kv heads, H query/key head
dim, Hv value head dim.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxla.attention import _reference
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
    if not _cpu_ext.cpu_supported():
        return "this CPU lacks the instruction set (AVX2 + FMA) the extension was compiled for"
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

    def attrs(self):
        return dict(scale=np.float32(self.scale), left=np.int64(self.left),
                    right=np.int64(self.right), has_seg=self.has_seg,
                    block_q=np.int64(self.block_q), block_k=np.int64(self.block_k))


def _call_fwd(cfg, q, k, v, q_len, kv_len, q_seg, kv_seg):
    shapes = (jax.ShapeDtypeStruct(q.shape[:-1] + v.shape[-1:], jnp.float32),
              jax.ShapeDtypeStruct(q.shape[:-1], jnp.float32))
    call = jax.ffi.ffi_call(_FWD, shapes, vmap_method="broadcast_all")
    return call(q, k, v, q_len, kv_len, q_seg, kv_seg, **cfg.attrs())


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg, q, k, v, q_len, kv_len, q_seg, kv_seg):
    out, lse2 = _call_fwd(cfg, q, k, v, q_len, kv_len, q_seg, kv_seg)
    return out, _reference.lse_from_base2(lse2)


def _attention_fwd(cfg, q, k, v, q_len, kv_len, q_seg, kv_seg):
    out, lse2 = _call_fwd(cfg, q, k, v, q_len, kv_len, q_seg, kv_seg)
    return (out, _reference.lse_from_base2(lse2)), (q, k, v, q_len, kv_len, q_seg, kv_seg, out, lse2)


def _attention_bwd(cfg, res, cotangents):
    q, k, v, q_len, kv_len, q_seg, kv_seg, out, lse2 = res
    d_out, d_lse = cotangents
    d_out = d_out.astype(jnp.float32)
    # d lse / d logits is the probability row, so the residual's cotangent shifts delta.
    delta = jnp.sum(d_out * out, axis=-1) - d_lse.astype(jnp.float32)
    shapes = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct(k.shape, jnp.float32),
              jax.ShapeDtypeStruct(v.shape, jnp.float32))
    call = jax.ffi.ffi_call(_BWD, shapes, vmap_method="broadcast_all")
    dq, dk, dv = call(q, k, v, d_out, lse2, delta, q_len, kv_len, q_seg, kv_seg, **cfg.attrs())
    return dq, dk, dv, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def default_block_sizes(g: int) -> tuple[int, int]:
    """(query positions, keys) per tile for G query heads per kv head: about 96 query rows × 256 keys.

    Measured on a 2-core AMD EPYC (Zen 3, 512 KB L2 per core), f32, N=K=8, H=64, T=2048 and 4096,
    causal and not, forward and forward+backward, best of 4 runs (benchmarks/RESULTS.md): among
    32-128 rows × 128-512 keys, 96 × 256 was fastest or within 8% of the fastest in every case;
    128-key tiles or 32-48 rows lost 10-25% on the backward pass. The score tile, the K/V panels and the
    output rows of one tile stay in one core's L2.
    """
    return max(1, 96 // g), 256


def attend(args: AttentionArgs, *, block_sizes=None) -> tuple[jax.Array, jax.Array]:
    """The backend entry point (see ``_base``) on arguments ``unsupported_reason`` accepted.

    Args:
      args: the canonical arguments (float32, bfloat16 or float16; no bias, mask or soft cap).
      block_sizes: a ``ChunkedBlockSizes`` whose ``(block_q, block_k)`` are the kernel's tiles, or
        None for ``default_block_sizes``.

    Returns:
      ``(out, lse)``: out (B, T, N, Hv) in the compute dtype; lse (B, T, N) float32.
    """
    _register()
    b, t, n, _ = args.query.shape
    s, kh = args.kv_len, args.num_kv_heads
    if block_sizes is None:
        block_q, block_k = default_block_sizes(n // kh)
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
    )
    q_len, kv_len = args.query_seq_lengths, args.key_value_seq_lengths
    q_len = jnp.full((b,), t, jnp.int32) if q_len is None else q_len
    kv_len = jnp.full((b,), s, jnp.int32) if kv_len is None else kv_len
    q_seg, kv_seg = args.q_segment_ids, args.kv_segment_ids
    if q_seg is None:
        q_seg, kv_seg = jnp.zeros((b, t), jnp.int32), jnp.zeros((b, s), jnp.int32)
    f32 = [x.astype(jnp.float32) for x in (args.query, args.key, args.value)]
    out, lse = _attention(cfg, *f32, q_len, kv_len, q_seg, kv_seg)
    return out.astype(args.dtype), lse


__all__ = ["attend", "available", "default_block_sizes", "unsupported_reason"]
