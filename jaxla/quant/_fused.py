"""The fused dequantize-and-multiply CPU kernel (``_cpu_qmm.cc``), called through XLA's FFI.

Dimension legend: ``...`` leading (batch, sequence) dimensions, folded into M rows; C the stored
row length (d_in of a kernel, the width D of a table); R the stored rows (d_out of a kernel, the
vocabulary V of a table).

:func:`rows_product` computes ``x · Rowsᵀ`` for the stored rows ``Rows (R, C)`` of a
:class:`QArray`: ``x @ dequantize(W)`` for a kernel W (C, R) (``axis=-2``) and the tied head's
``h @ dequantize(E).T`` for a table E (R, C) (``axis=-1``). The kernel decodes each chunk of 32
values in registers and multiplies it into every row of X with f32 fused multiply-adds, so the
packed blocks are read once and no decoded matrix exists; on XLA:CPU the jnp path decodes the whole
matrix per call instead. The result differs from ``x @ dequantize(q)`` only by the order of the f32
sums (and, for q4_1/int4, by at most half an ulp per weight where one of the two fuses the offset's
multiply-add): both lie within ``4·eps32·(|x| @ |W|)`` of the float64 product, which
tests/test_quant_fused.py checks for every format and code path.

When it runs (:func:`fused_reason` is None): the program's platform is CPU (``jax.default_backend``,
as the attention kernel decides), the extension is built, the format is q8_0, q4_0, q4_1, int8, or
nf4/int4 with blocks and rows of multiples of 32, the QArray is one matrix (inside ``lax.scan`` the
per-layer slice is), and X has at most :data:`MAX_FUSED_ROWS` rows. Otherwise the jnp path runs.
Gradients: ``dX = dY · Rows`` through the jnp decode (temporary, inside the backward program), none
to the QArray; a matrix whose decoded f32 rows exceed :data:`DECODE_BLOCK_BYTES` (the tied head's
table) is decoded one block of rows at a time there and in :func:`decoded_product`, so no decoded
copy of it exists at once. Under ``vmap`` the batch folds into X's rows; a batched QArray maps the kernel over
its slices.

The code path (``avx512``, ``avx2``, ``portable``) is chosen like the attention kernel's
(``jaxla/_cpu_dispatch.py``: ``JAXLA_CPU_KERNEL`` names one); ``JAXLA_FUSED_QMM=0`` turns the fused
kernel off (read once at import; benchmarks use it to time the jnp path). Products too small for
XLA's pool (a decode step's) share their rows with jaxla's spinning helper threads;
``JAXLA_CPU_TEAM_THREADS`` sets how many (``0``: the calling thread alone; read at the first one).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxla import _cpu_dispatch
from jaxla.quant._qarray import GGUF_FORMATS, QArray, _decode_rows

try:
    from jaxla.quant import _cpu_qmm as _ext
except ImportError as e:  # pragma: no cover - depends on the build
    _ext = None
    _IMPORT_ERROR = str(e)
else:
    _IMPORT_ERROR = None

__all__ = ["DECODE_BLOCK_BYTES", "MAX_FUSED_ROWS", "available", "decoded_product", "fused_reason",
           "kernel_path", "layer_product", "layer_reason", "product", "rows_product",
           "supported_paths"]

_TARGET = "jaxla_quant_matmul"
_LAYER_TARGET = "jaxla_quant_matmul_layer"
_FORMAT_IDS = {"q8_0": 0, "q4_0": 1, "q4_1": 2, "int8": 3, "int4": 4, "nf4": 5}
OFF_VAR = "JAXLA_FUSED_QMM"
# Rows of X up to which the fused kernel runs; above, the jnp path's decode is amortised over the
# rows and XLA's matmul is faster (measured crossover: benchmarks/quant.py "fused matmul" rows).
MAX_FUSED_ROWS = 128

_PATH_IDS, _SUPPORTED = _ext.paths() if _ext is not None else ({}, [])
_SUPPORTED = tuple(_SUPPORTED)
_PATH, _PATH_ERROR = (_cpu_dispatch.choose_path(os.environ.get(_cpu_dispatch.ENV_VAR), _PATH_IDS,
                                                _SUPPORTED) if _ext is not None else (None, None))
_OFF = os.environ.get(OFF_VAR, "").strip() == "0"
# Helper threads of the spinning team for small products (jaxla/_cpu_parallel.h reads it).
TEAM_VAR = "JAXLA_CPU_TEAM_THREADS"
_TEAM = os.environ.get(TEAM_VAR, "")
if _TEAM and not (_TEAM.isascii() and _TEAM.isdigit()):
    warnings.warn(f"{TEAM_VAR}={_TEAM!r} is not a non-negative integer (digits only); small "
                  "quantized products use the default helper team (cores - 1, at most 7)",
                  RuntimeWarning, stacklevel=2)
if _PATH_ERROR is not None:
    warnings.warn(f"the fused quantized matmul kernel is off: {_PATH_ERROR}", RuntimeWarning,
                  stacklevel=2)
_registered = False


def supported_paths() -> tuple[str, ...]:
    """The compiled code paths this CPU can run, best first (empty when the extension is not built)."""
    return _SUPPORTED


def available() -> str | None:
    """None when the compiled kernel can run on this machine, else why not."""
    if _ext is None:
        return f"the compiled extension jaxla.quant._cpu_qmm is not built ({_IMPORT_ERROR})"
    if _PATH_ERROR is not None:
        return _PATH_ERROR
    if _OFF:
        return f"{OFF_VAR}=0 turns it off"
    return None


def kernel_path() -> str | None:
    """The code path calls use, or None when the kernel is unavailable."""
    return _PATH if available() is None else None


def fused_reason(q: QArray, rows: int) -> str | None:
    """None when ``x · Rowsᵀ`` of ``q`` for ``rows`` rows of X runs in the fused kernel, else why not."""
    return _reason(q, rows, stacked=False)


def layer_reason(q: QArray, rows: int) -> str | None:
    """None when :func:`layer_product` runs layer ``i`` of the stacked ``q`` (L, ...) in place for
    ``rows`` rows of X, else why not."""
    if len(q.stack_shape) != 1:
        return f"the QArray must stack matrices along one axis, got stacking axes {q.stack_shape}"
    if q.scale_scales is not None:
        return "double-quantized nf4 scales are decoded per call (index a layer first)"
    return _reason(q, rows, stacked=True)


def _reason(q: QArray, rows: int, *, stacked: bool) -> str | None:
    platform = jax.default_backend()
    if platform != "cpu":
        return f"it runs on CPU only (the default backend is {platform})"
    reason = available()
    if reason is not None:
        return reason
    if q.format not in _FORMAT_IDS:
        return f"format {q.format!r} has no fused kernel (it has {tuple(_FORMAT_IDS)})"
    if q.stack_shape and not stacked:
        return f"the QArray stacks matrices {q.stack_shape}; index a layer first"
    if q.format in ("nf4", "int4") and (q.block_size % 32 or q.columns % 32):
        return f"{q.format} blocks of {q.block_size} (the kernel reads chunks of 32 values)"
    if rows > MAX_FUSED_ROWS:
        return f"{rows} rows of x (above {MAX_FUSED_ROWS} the jnp decode and XLA's matmul are faster)"
    return None


@dataclasses.dataclass(frozen=True)
class _Config:
    format: int
    columns: int
    block: int
    rows: int
    path: int


def _operands(q: QArray):
    """(codes, scales, offsets) as the kernel reads them; nf4's absmax decoded from double quant."""
    empty = jnp.zeros((0,), jnp.float32)
    if q.format in GGUF_FORMATS:
        return q.codes, empty, empty
    if q.format == "int8":
        return q.codes, q.scales.astype(jnp.float32), empty
    if q.format == "int4":
        return q.codes, q.scales.astype(jnp.float32), q.offsets.astype(jnp.float32)
    absmax = q.scales
    if q.scale_scales is not None:  # as _qarray._decode_rows: (R, nb) values, cheap to form
        absmax = q.scales.astype(jnp.float32) * q.scale_scales + q.offsets
    return q.codes, absmax.astype(jnp.float32), empty


def _call(cfg: _Config, x: jax.Array, q: QArray) -> jax.Array:
    out = jax.ShapeDtypeStruct((*x.shape[:-1], cfg.rows), jnp.float32)
    call = jax.ffi.ffi_call(_TARGET, out)
    return call(x, *_operands(q), format=np.int64(cfg.format), columns=np.int64(cfg.columns),
                block=np.int64(cfg.block), path=np.int64(cfg.path))


@functools.cache
def _batched_call(cfg: _Config):
    """``_call`` with a vmap rule: a batch of X is more rows; a batched QArray maps over slices."""

    @jax.custom_batching.custom_vmap
    def call(x, q):
        return _call(cfg, x, q)

    @call.def_vmap
    def _rule(axis_size, in_batched, x, q):
        x_batched, q_batched = in_batched
        if not any(jax.tree.leaves(q_batched)):
            if not x_batched:
                x = jnp.broadcast_to(x, (axis_size, *x.shape))
            return call(x, q), True
        q = jax.tree.map(lambda leaf, b: leaf if b else jnp.broadcast_to(leaf, (axis_size,
                                                                                *leaf.shape)),
                         q, q_batched)
        if not x_batched:
            return jax.lax.map(lambda qi: call(x, qi), q), True
        return jax.lax.map(lambda xq: call(*xq), (x, q)), True

    return call


def _zero_cotangent(q: QArray) -> QArray:
    def zero(leaf):
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            return jnp.zeros_like(leaf)
        return np.zeros(leaf.shape, jax.dtypes.float0)
    return jax.tree.map(zero, q)


# A decoded matrix above this many f32 bytes is decoded one block of rows at a time (the tied head's
# Q8_0 table, 49152 x 576, is 108 MiB decoded; a layer kernel of SmolLM2 is at most 3.4 MiB).
DECODE_BLOCK_BYTES = 8 << 20


class _RowBlocks(NamedTuple):
    size: int   # rows per block
    count: int  # full blocks, decoded inside a loop
    tail: int   # rows left after them, decoded once


def _row_blocks(q: QArray) -> _RowBlocks | None:
    """How to decode ``q``'s stored rows in blocks of at most :data:`DECODE_BLOCK_BYTES` f32 bytes,
    or None when the whole decoded matrix is that small (``q`` unstacked: rows are every leaf's
    axis 0)."""
    total = q.rows * q.columns * 4
    if total <= DECODE_BLOCK_BYTES or q.rows < 2:
        return None
    blocks = -(-total // DECODE_BLOCK_BYTES)
    size = -(-q.rows // blocks)
    return _RowBlocks(size, q.rows // size, q.rows % size)


def _row_slice(q: QArray, start, size: int) -> QArray:
    """Rows ``start : start + size`` of every leaf (``start`` may be traced)."""
    return jax.tree.map(lambda leaf: jax.lax.dynamic_slice_in_dim(leaf, start, size, axis=0), q)


def _rows_dot(x: jax.Array, q: QArray, compute, acc, precision) -> jax.Array:
    """``x (..., C) · Rowsᵀ -> (..., R)``, the rows decoded whole."""
    rows = _decode_rows(q).astype(compute)                                 # (R, C)
    return jax.lax.dot_general(x, rows, (((x.ndim - 1,), (1,)), ((), ())), precision=precision,
                               preferred_element_type=acc)


def _grad_dot(dy: jax.Array, q: QArray, compute, precision) -> jax.Array:
    """``dY (..., R) · Rows -> (..., C)`` in f32, the rows decoded whole."""
    rows = _decode_rows(q).astype(compute)
    return jax.lax.dot_general(dy.astype(compute), rows, (((dy.ndim - 1,), (0,)), ((), ())),
                               precision=precision, preferred_element_type=jnp.float32)


def _rows_grad(q: QArray, dy: jax.Array, compute, precision) -> jax.Array:
    """dX = dY · Rows, the rows decoded inside the backward program (a temporary, per call): whole,
    or for a large matrix one block of rows at a time with the partial products summed in f32, so
    at most one block is ever decoded."""
    blocks = _row_blocks(q)
    if blocks is None:
        return _grad_dot(dy, q, compute, precision)
    size = blocks.size

    def body(i, total):
        start = i * size
        part = jax.lax.dynamic_slice_in_dim(dy, start, size, axis=-1)
        return total + _grad_dot(part, _row_slice(q, start, size), compute, precision)

    total = jnp.zeros((*dy.shape[:-1], q.columns), jnp.float32)
    total = jax.lax.fori_loop(0, blocks.count, body, total)
    if blocks.tail:
        start = blocks.count * size
        total = total + _grad_dot(dy[..., start:], _row_slice(q, start, blocks.tail), compute,
                                  precision)
    return total


def _rows_product_decoded(x: jax.Array, q: QArray, compute, acc, precision) -> jax.Array:
    """``x · Rowsᵀ`` through the jnp decode: whole, or for a large matrix one block of rows at a
    time, each block's outputs written into their columns of the result."""
    blocks = _row_blocks(q)
    if blocks is None:
        return _rows_dot(x, q, compute, acc, precision)
    size = blocks.size

    def body(i, out):
        start = i * size
        part = _rows_dot(x, _row_slice(q, start, size), compute, acc, precision)
        return jax.lax.dynamic_update_slice_in_dim(out, part, start, axis=-1)

    out = jnp.zeros((*x.shape[:-1], q.rows), acc)
    out = jax.lax.fori_loop(0, blocks.count, body, out)
    if blocks.tail:
        start = blocks.count * size
        tail = _rows_dot(x, _row_slice(q, start, blocks.tail), compute, acc, precision)
        out = jax.lax.dynamic_update_slice_in_dim(out, tail, start, axis=-1)
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _product(cfg: _Config, x: jax.Array, q: QArray) -> jax.Array:
    return _batched_call(cfg)(x, q)


def _product_fwd(cfg, x, q):
    return _batched_call(cfg)(x, q), q


def _product_bwd(cfg, q, dy):
    return _rows_grad(q, dy, jnp.float32, None), _zero_cotangent(q)


_product.defvjp(_product_fwd, _product_bwd)


@dataclasses.dataclass(frozen=True)
class _Decoded:
    compute: Any
    acc: Any
    precision: Any


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _decoded(cfg: _Decoded, x: jax.Array, q: QArray) -> jax.Array:
    return _rows_product_decoded(x, q, cfg.compute, cfg.acc, cfg.precision)


def _decoded_fwd(cfg, x, q):
    # The residual is the packed QArray, so whatever autodiff and XLA would otherwise keep, no
    # decoded matrix is saved between the passes: the backward pass decodes again.
    return _decoded(cfg, x, q), q


def _decoded_bwd(cfg, q, dy):  # x is in cfg.compute, and so is its cotangent
    return _rows_grad(q, dy, cfg.compute, cfg.precision).astype(cfg.compute), _zero_cotangent(q)


_decoded.defvjp(_decoded_fwd, _decoded_bwd)


def decoded_product(x: jax.Array, q: QArray, *, compute: Any, acc: Any,
                    precision: Any = None) -> jax.Array:
    """``x · Rowsᵀ`` with the rows decoded in jnp (in ``compute``, accumulated in ``acc``) inside
    the program, forward and backward alike: the backward pass decodes again rather than keeping
    the decoded matrix alive. ``x (..., C)`` must already be in ``compute``; no gradient to ``q``."""
    _check_x(x, q)
    cfg = _Decoded(compute=jnp.dtype(compute), acc=jnp.dtype(acc), precision=precision)
    return _decoded(cfg, x, jax.tree.map(jax.lax.stop_gradient, q))


def _check_x(x: jax.Array, q: QArray) -> None:
    if not isinstance(q, QArray):
        raise TypeError(f"q must be a jaxla.quant.QArray, got {type(q).__name__}")
    if q.stack_shape:
        raise ValueError(f"q must be one matrix, got stacking axes {q.stack_shape} ({q!r}); index "
                         "a layer first")
    if x.ndim < 1 or x.shape[-1] != q.columns:
        raise ValueError(f"x must be (..., C) with C = {q.columns} (the stored rows of {q!r}), got "
                         f"shape {tuple(x.shape)}")


def product(x: jax.Array, q: QArray, *, compute: Any, acc: Any, precision: Any = None
            ) -> jax.Array:
    """``x · Rowsᵀ`` in ``acc``: the fused kernel where :func:`fused_reason` allows it (and the
    compute dtype is not float64), else :func:`decoded_product`."""
    rows = int(np.prod(x.shape[:-1]))
    if jnp.dtype(compute) != jnp.float64 and fused_reason(q, rows) is None:
        return rows_product(x, q).astype(acc)
    return decoded_product(x, q, compute=compute, acc=acc, precision=precision)


def _register() -> None:
    global _registered
    if not _registered:
        for name, capsule in _ext.registrations().items():
            jax.ffi.register_ffi_target(name, capsule, platform="cpu")
        _registered = True


def rows_product(x: jax.Array, q: QArray, *, path: str | None = None) -> jax.Array:
    """``x · Rowsᵀ`` in float32 through the fused kernel.

    Args:
      x: ``(..., C)`` floating (computed in float32).
      q: an unstacked :class:`QArray` whose stored rows are ``(R, C)`` (any ``axis``).
      path: a code path from :func:`supported_paths`, or None for :func:`kernel_path`.

    Returns:
      ``(..., R)`` float32; no gradient reaches ``q``.

    Raises:
      ValueError: the kernel cannot run this product here (:func:`fused_reason`, ignoring the row
        limit), or ``x`` does not fit ``q``.
    """
    x = jnp.asarray(x)
    _check_x(x, q)
    reason = fused_reason(q, 0)
    if reason is not None:
        raise ValueError(f"the fused quantized matmul cannot run: {reason}")
    if path is None:
        path = _PATH
    elif path not in _SUPPORTED:
        raise ValueError(f"path={path!r} is not a CPU kernel path this CPU runs; expected one of "
                         f"{list(_SUPPORTED)}")
    _register()
    cfg = _Config(format=_FORMAT_IDS[q.format], columns=q.columns, block=q.block_size,
                  rows=q.rows, path=_PATH_IDS[path])
    return _product(cfg, x.astype(jnp.float32), jax.tree.map(jax.lax.stop_gradient, q))


# ----------------------------------------------------------------------------------------------
# One layer of a stacked QArray, read in place. Inside ``lax.scan`` over layers, XLA:CPU copies each
# layer's slice of a stacked operand out into a buffer of its own before a custom call (measured:
# every kernel of SmolLM2 copied once per decoded token, 66 MB written and read again); passing the
# whole stack with the layer's index lets the kernel offset its pointers instead.


def _layer_call(cfg: _Config, stack: int, x: jax.Array, index: jax.Array, q: QArray) -> jax.Array:
    out = jax.ShapeDtypeStruct((*x.shape[:-1], cfg.rows), jnp.float32)
    call = jax.ffi.ffi_call(_LAYER_TARGET, out, vmap_method="sequential")
    return call(x, index, *_operands(q), format=np.int64(cfg.format), columns=np.int64(cfg.columns),
                block=np.int64(cfg.block), path=np.int64(cfg.path), stack=np.int64(stack))


def _take_layer(q: QArray, index: jax.Array) -> QArray:
    return jax.tree.map(lambda leaf: jax.lax.dynamic_index_in_dim(leaf, index, 0, keepdims=False), q)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _layer(cfg: _Config, stack: int, x: jax.Array, index: jax.Array, q: QArray) -> jax.Array:
    return _layer_call(cfg, stack, x, index, q)


def _layer_fwd(cfg, stack, x, index, q):
    return _layer_call(cfg, stack, x, index, q), (index, q)


def _layer_bwd(cfg, stack, res, dy):
    del cfg, stack
    index, q = res
    dx = _rows_grad(_take_layer(q, index), dy, jnp.float32, None)
    return dx, np.zeros(np.shape(index), jax.dtypes.float0), _zero_cotangent(q)


_layer.defvjp(_layer_fwd, _layer_bwd)


def layer_product(x: jax.Array, q: QArray, index: jax.Array) -> jax.Array:
    """``x · Rowsᵀ`` of layer ``index`` of a stacked QArray, in float32 through the fused kernel,
    reading that layer's blocks where they lie in the stack (no copy of the slice).

    Equals ``rows_product(x, q[index])`` exactly (the same kernel on the same bytes).

    Args:
      x: ``(..., C)`` floating (computed in float32).
      q: a :class:`QArray` stacked along one axis, ``(L, ...)`` with stored rows ``(R, C)`` per layer.
      index: an int scalar in [0, L) (traced is fine; out of range is an error of the kernel).

    Returns:
      ``(..., R)`` float32; gradients to ``x`` only.

    Raises:
      ValueError: :func:`layer_reason` (ignoring the row limit) says the kernel cannot run it, or
        ``x`` does not fit ``q``.
    """
    x = jnp.asarray(x)
    if not isinstance(q, QArray):
        raise TypeError(f"q must be a jaxla.quant.QArray, got {type(q).__name__}")
    reason = layer_reason(q, 0)
    if reason is not None:
        raise ValueError(f"the fused quantized matmul cannot run this layer product: {reason}")
    if x.ndim < 1 or x.shape[-1] != q.columns:
        raise ValueError(f"x must be (..., C) with C = {q.columns} (the stored rows of {q!r}), got "
                         f"shape {tuple(x.shape)}")
    index = jnp.asarray(index)
    if index.shape != () or not jnp.issubdtype(index.dtype, jnp.integer):
        raise ValueError(f"index must be an integer scalar, got {index.dtype} {index.shape}")
    _register()
    cfg = _Config(format=_FORMAT_IDS[q.format], columns=q.columns, block=q.block_size,
                  rows=q.rows, path=_PATH_IDS[_PATH])
    return _layer(cfg, q.stack_shape[0], x.astype(jnp.float32), index.astype(jnp.int32),
                  jax.tree.map(jax.lax.stop_gradient, q))
