"""The quantized array: packed integer codes plus scales as pytree leaves, decoded in jnp.

Dimension legend: ``...`` stacking axes (layers), R stored rows, C stored columns (the blocked
axis), I ``d_in``, O ``d_out``, nb blocks per row, bb bytes per block.

A :class:`QArray` stores a matrix row-major along its *blocked* axis, as GGUF does: a linear kernel
W (..., I, O) is stored as (..., O, I) rows with the blocks running along I (``axis=-2``, the
default), an embedding table (..., V, D) as its own rows with the blocks along D (``axis=-1``). The
stacking axes come from the leaves, not the static data, so ``lax.scan`` and ``tree.map(lambda v:
v[i], q)`` slice a stacked QArray into per-layer QArrays.

Formats (``bits/weight`` with the default block):

* ``"int8"``: symmetric per output channel, ``w = code · s`` with ``s = max|w| · f32(1/127)`` (8 + ε).
* ``"nf4"``: NormalFloat-4 of QLoRA (Dettmers et al. 2023), block 64, ``w = NF4[code] · absmax``
  (4.5); ``double_quant=True`` stores the absmax values as int8 around their per-row mean
  (4.125 + 64 / I;
  QLoRA uses FP8 blocks of 256 for this second level — the idea, not the bit layout).
* ``"int4"``: asymmetric blockwise, ``w = code · s + min`` with ``s = (max − min) / 15`` (5.0).
* ``"q8_0"``, ``"q4_0"``, ``"q4_1"``: GGUF's blocks of 32, kept as the file's raw bytes (uint8
  (..., R, nb, bb)) and decoded exactly as ``gguf.quants.dequantize`` does (8.5, 4.5, 5.0);
  ``"q4_k"``, ``"q6_k"``: GGUF's super-blocks of 256 (4.5, 6.5625), read from files only
  (:func:`from_gguf_blocks`; :func:`quantize` cannot write them).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["FORMATS", "GGUF_FORMATS", "NF4_TABLE", "QArray", "dequantize", "from_gguf_blocks",
           "is_qarray", "quantize"]

# The 16 NormalFloat values of QLoRA's Appendix E / bitsandbytes (exact float32 constants).
NF4_TABLE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)

# (block, bytes per block); the k-quants are read from files only (gguf cannot write them).
GGUF_FORMATS = {"q8_0": (32, 34), "q4_0": (32, 18), "q4_1": (32, 20), "q4_k": (256, 144),
                "q6_k": (256, 210)}
_READ_ONLY = ("q4_k", "q6_k")
FORMATS = ("int8", "nf4", "int4", *GGUF_FORMATS)
_DEFAULT_BLOCK = {"nf4": 64, "int4": 64}
_MAX_DIM = 1 << 24


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
    """A quantized matrix (or stack of matrices); see the module docstring.

    Attributes:
      codes: the packed codes (uint8/int8), or for GGUF formats the raw blocks (..., R, nb, bb).
      scales: per-block (or per-row) scales (..., R, nb) float32; int8 codes under double
        quantization; None for GGUF formats (the scales are inside the blocks).
      offsets: int4's per-block minimum; nf4 double quantization's per-row mean of the absmax.
      scale_scales: nf4 double quantization's per-row step of the int8 absmax codes.
      format: one of :data:`FORMATS` (static).
      columns: C, the stored row length (static; d_in of a kernel).
      block_size: values per block along C (static; C itself for int8).
      axis: -2 (a kernel: logical (..., C, R)) or -1 (a table: logical (..., R, C)) (static).
      dtype: the logical dtype that :func:`dequantize` returns by default (static).
    """

    codes: jax.Array
    scales: jax.Array | None
    offsets: jax.Array | None
    scale_scales: jax.Array | None
    format: str = dataclasses.field(metadata=dict(static=True))
    columns: int = dataclasses.field(metadata=dict(static=True))
    block_size: int = dataclasses.field(metadata=dict(static=True))
    axis: int = dataclasses.field(metadata=dict(static=True))
    dtype: Any = dataclasses.field(metadata=dict(static=True))

    @property
    def _row_axes(self) -> int:
        return 3 if self.format in GGUF_FORMATS else 2

    @property
    def stack_shape(self) -> tuple[int, ...]:
        return tuple(np.shape(self.codes))[:-self._row_axes]

    @property
    def rows(self) -> int:
        return int(np.shape(self.codes)[-self._row_axes])

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical shape: (..., C, R) for a kernel (``axis=-2``), (..., R, C) for a table."""
        inner = (self.columns, self.rows) if self.axis == -2 else (self.rows, self.columns)
        return (*self.stack_shape, *inner)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        """Resident bytes of the leaves."""
        return sum(int(np.prod(np.shape(x))) * jnp.dtype(x.dtype).itemsize
                   for x in (self.codes, self.scales, self.offsets, self.scale_scales)
                   if x is not None)

    def __repr__(self) -> str:
        try:
            shape = self.shape
        except (IndexError, TypeError):  # leaves replaced by non-arrays (e.g. by a tree.map)
            shape = "?"
        return (f"QArray(format={self.format!r}, shape={shape}, dtype={jnp.dtype(self.dtype)}, "
                f"block_size={self.block_size}, axis={self.axis})")


def is_qarray(x: Any) -> bool:
    return isinstance(x, QArray)


def _check_format(format: Any) -> str:
    if not isinstance(format, str) or format.lower() not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    return format.lower()


def _check_matrix(w: Any, stack_axes: int, name: str) -> jax.Array:
    w = jnp.asarray(w)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"{name} must be floating to be quantized, got {w.dtype} {tuple(w.shape)}")
    if isinstance(stack_axes, bool) or not isinstance(stack_axes, int) or stack_axes < 0:
        raise ValueError(f"stack_axes must be an int >= 0, got {stack_axes!r}")
    if w.ndim != 2 + stack_axes:
        hint = (f"; pass stack_axes={w.ndim - 2} if its leading axes stack layers"
                if w.ndim > 2 else "")
        raise ValueError(f"{name} must be a matrix (..., d_in, d_out) with {stack_axes} stacking "
                         f"axes, got shape {tuple(w.shape)}{hint}")
    return w


def _pack_nibbles(codes: jax.Array) -> jax.Array:
    """(..., C) values in [0, 16) -> (..., C/2) uint8, element 2j in the low nibble."""
    c = codes.astype(jnp.uint8).reshape(*codes.shape[:-1], -1, 2)
    return c[..., 0] | (c[..., 1] << 4)


def _unpack_nibbles(packed: jax.Array) -> jax.Array:
    low, high = packed & 0x0F, packed >> 4
    return jnp.stack([low, high], axis=-1).reshape(*packed.shape[:-1], -1)


def quantize(w: Any, *, format: str, block_size: int | None = None, stack_axes: int = 0,
             axis: int = -2, double_quant: bool = False) -> QArray:
    """Quantizes a floating matrix (or a stack of them).

    Args:
      w: ``(..., I, O)`` (a kernel, ``axis=-2``) or ``(..., R, C)`` (a table, ``axis=-1``).
      format: one of :data:`FORMATS`.
      block_size: values per block along the blocked axis; 64 for nf4/int4, fixed 32 for the GGUF
        formats, the whole row for int8. It must divide that axis (nothing is padded).
      stack_axes: leading axes that stack matrices (e.g. 1 for (L, I, O) layer kernels).
      axis: the blocked axis, -2 (d_in of a kernel) or -1 (the row of a table).
      double_quant: nf4 only: quantize the block absmax values to int8 as well.

    Returns:
      A :class:`QArray` with ``dtype`` = w's dtype. Outside jit, non-finite weights raise.

    GGUF formats quantize on the host with the ``gguf`` package (the stored bytes are then exactly
    what llama.cpp's converter writes).
    """
    format = _check_format(format)
    w = _check_matrix(w, stack_axes, "w")
    if axis not in (-1, -2):
        raise ValueError(f"axis must be -2 (blocks along d_in of a kernel) or -1 (along a row), "
                         f"got {axis!r}")
    if double_quant and format != "nf4":
        raise ValueError(f"double_quant is for format='nf4', got format={format!r}")
    try:
        host = np.asarray(w)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        host = None
    if host is not None and not np.all(np.isfinite(host)):
        raise ValueError(f"w has non-finite values (shape {tuple(w.shape)}); quantizing would hide them")
    rows_major = jnp.swapaxes(w, -1, -2) if axis == -2 else w       # (..., R, C)
    columns = int(rows_major.shape[-1])
    if format in _READ_ONLY:
        raise ValueError(f"format={format!r} is read from GGUF files only (jaxla.quant."
                         "from_gguf_blocks); quantize writes "
                         f"{tuple(f for f in FORMATS if f not in _READ_ONLY)}")
    if format in GGUF_FORMATS:
        fixed = GGUF_FORMATS[format][0]
        if block_size not in (None, fixed):
            raise ValueError(f"format={format!r} has a fixed block_size {fixed}, got {block_size!r}")
        block_size = fixed
    elif format == "int8":
        if block_size not in (None, columns):
            raise ValueError(f"format='int8' is per output channel (one scale per row of {columns}); "
                             f"block_size must be None, got {block_size!r}")
        block_size = columns
    else:
        block_size = _DEFAULT_BLOCK[format] if block_size is None else block_size
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2 or (
                block_size % 2):
            raise ValueError(f"block_size must be an even int >= 2, got {block_size!r}")
    if columns % block_size:
        raise ValueError(f"block_size={block_size} does not divide the blocked axis of length "
                         f"{columns} (w shape {tuple(w.shape)}, axis={axis}); jaxla does not pad: "
                         "choose a block size dividing it")
    kw = dict(format=format, columns=columns, block_size=block_size, axis=axis,
              dtype=jnp.dtype(w.dtype))
    x = rows_major.astype(jnp.float32)
    if format in GGUF_FORMATS:
        return _quantize_gguf(host, rows_major.shape, kw)
    if format == "int8":
        absmax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
        # times the float32 constant 1/127 (not a division, which XLA may rewrite to it anyway)
        scale = jnp.where(absmax == 0, jnp.ones_like(absmax), absmax * np.float32(1 / 127))
        codes = jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8)
        return QArray(codes, scale, None, None, **kw)
    blocks = x.reshape(*x.shape[:-1], columns // block_size, block_size)
    if format == "nf4":
        codes, absmax = _nf4_codes(blocks)                               # (..., R, nb, bs), (..., R, nb)
        packed = _pack_nibbles(codes.reshape(*x.shape))
        if not double_quant:
            return QArray(packed, absmax, None, None, **kw)
        mean = jnp.mean(absmax, axis=-1, keepdims=True)
        spread = jnp.max(jnp.abs(absmax - mean), axis=-1, keepdims=True)
        step = jnp.where(spread == 0, jnp.ones_like(spread), spread / 127.0)
        scodes = jnp.clip(jnp.round((absmax - mean) / step), -127, 127).astype(jnp.int8)
        return QArray(packed, scodes, mean, step, **kw)
    low, high = jnp.min(blocks, axis=-1), jnp.max(blocks, axis=-1)     # int4 asymmetric
    step = (high - low) / 15.0
    safe = jnp.where(step == 0, jnp.ones_like(step), step)
    codes = jnp.clip(jnp.round((blocks - low[..., None]) / safe[..., None]), 0, 15)
    return QArray(_pack_nibbles(codes.reshape(*x.shape)), step, low, None, **kw)


@jax.jit
def _nf4_codes(blocks: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each block's absmax and the index of the NF4 value nearest each weight over it (the first on
    a tie). Compiled so that XLA fuses the (..., 16) distances into the reduction: run op by op they
    were materialised twice, 32 bytes of f32 per weight (a 30-layer stacked 576 x 1536 kernel
    peaked at +3 GB)."""
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    safe = jnp.where(absmax == 0, jnp.ones_like(absmax), absmax)
    normed = blocks / safe[..., None]
    table = jnp.asarray(NF4_TABLE).reshape((1,) * normed.ndim + (16,))  # no rank promotion
    return jnp.argmin(jnp.abs(normed[..., None] - table), axis=-1), absmax


def _quantize_gguf(host: np.ndarray | None, shape: tuple[int, ...], kw: dict) -> QArray:
    if host is None:
        raise ValueError(f"format={kw['format']!r} quantizes on the host: call it outside jit")
    from gguf import GGMLQuantizationType, quants

    rows = np.ascontiguousarray(np.swapaxes(host, -1, -2) if kw["axis"] == -2 else host, np.float32)
    raw = quants.quantize(rows.reshape(-1, shape[-1]), GGMLQuantizationType[kw["format"].upper()])
    return from_gguf_blocks(raw.reshape(*shape[:-1], -1), kw["format"], columns=shape[-1],
                            axis=kw["axis"], dtype=kw["dtype"])


def from_gguf_blocks(raw: Any, format: str, *, columns: int, axis: int = -2,
                     dtype: Any = jnp.float32) -> QArray:
    """A QArray over a GGUF tensor's raw bytes, kept as stored.

    Args:
      raw: uint8 ``(..., R, nbytes)`` (what ``GGUFReader`` gives for a quantized tensor).
      format: ``"q8_0"``, ``"q4_0"`` or ``"q4_1"``.
      columns: C, the number of values per row (the GGUF tensor's first dimension).
      axis: as :func:`quantize` (-2: a kernel whose rows are output channels).
      dtype: the logical dtype.
    """
    format = _check_format(format)
    if format not in GGUF_FORMATS:
        raise ValueError(f"from_gguf_blocks reads {tuple(GGUF_FORMATS)}, got {format!r}")
    block, nbytes = GGUF_FORMATS[format]
    raw = np.asarray(raw)
    if raw.dtype != np.uint8 or raw.ndim < 2:
        raise ValueError(f"raw must be uint8 (..., rows, bytes), got {raw.dtype} {raw.shape}")
    if isinstance(columns, bool) or not isinstance(columns, int) or not 0 < columns <= _MAX_DIM or (
            columns % block):
        raise ValueError(f"columns must be a positive multiple of {block} (the {format} block), got "
                         f"{columns!r}")
    if raw.shape[-1] != columns // block * nbytes:
        raise ValueError(f"{format} rows of {columns} values take {columns // block * nbytes} bytes, "
                         f"raw has {raw.shape[-1]} per row (shape {raw.shape})")
    codes = jnp.asarray(raw.reshape(*raw.shape[:-1], columns // block, nbytes))
    return QArray(codes, None, None, None, format=format, columns=columns, block_size=block,
                  axis=axis, dtype=jnp.dtype(dtype))


def _f16(two_bytes: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(two_bytes, jnp.float16).astype(jnp.float32)


def _decode_rows(q: QArray) -> jax.Array:
    """The stored rows (..., R, C) in float32."""
    if q.format in GGUF_FORMATS:
        blocks = q.codes                                                    # (..., R, nb, bb)
        if q.format in _READ_ONLY:
            return _decode_k(q.format, blocks).reshape(*blocks.shape[:-2], q.columns)
        d = _f16(blocks[..., 0:2])[..., None]
        if q.format == "q8_0":
            values = jax.lax.bitcast_convert_type(blocks[..., 2:], jnp.int8).astype(jnp.float32) * d
        else:
            packed = blocks[..., 4:] if q.format == "q4_1" else blocks[..., 2:]
            nibbles = jnp.concatenate([packed & 0x0F, packed >> 4], axis=-1)  # GGUF: low half first
            if q.format == "q4_0":
                values = d * (nibbles.astype(jnp.int8) - jnp.int8(8)).astype(jnp.float32)
            else:
                values = d * nibbles.astype(jnp.float32) + _f16(blocks[..., 2:4])[..., None]
        return values.reshape(*blocks.shape[:-2], q.columns)
    if q.format == "int8":
        return q.codes.astype(jnp.float32) * q.scales
    codes = _unpack_nibbles(q.codes)
    lead = codes.shape[:-1]
    blocks = codes.reshape(*lead, q.columns // q.block_size, q.block_size)
    if q.format == "nf4":
        absmax = q.scales
        if q.scale_scales is not None:
            absmax = q.scales.astype(jnp.float32) * q.scale_scales + q.offsets
        values = jnp.asarray(NF4_TABLE)[blocks] * absmax[..., None]
    else:
        values = blocks.astype(jnp.float32) * q.scales[..., None] + q.offsets[..., None]
    return values.reshape(*lead, q.columns)


def _decode_k(format: str, blocks: jax.Array) -> jax.Array:
    """GGUF k-quant super-blocks (..., nb, bb) -> (..., nb, 256) float32, as ggml lays them out."""
    lead = blocks.shape[:-1]
    if format == "q4_k":
        d, dmin = _f16(blocks[..., 0:2])[..., None], _f16(blocks[..., 2:4])[..., None]
        sc = blocks[..., 4:16].reshape(*lead, 3, 4)  # 8 six-bit scales and 8 six-bit mins
        a, m, md = sc[..., 0, :], sc[..., 1, :], sc[..., 2, :]
        scales = jnp.concatenate([a & 0x3F, (md & 0x0F) | ((a >> 2) & 0x30)], axis=-1)
        mins = jnp.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
        step = (d * scales.astype(jnp.float32))[..., None]                  # (..., nb, 8, 1)
        low = (dmin * mins.astype(jnp.float32))[..., None]
        qs = blocks[..., 16:].reshape(*lead, 4, 1, 32)
        nibbles = jnp.concatenate([qs & 0x0F, qs >> 4], axis=-2).reshape(*lead, 8, 32)
        return (step * nibbles.astype(jnp.float32) - low).reshape(*lead, 256)
    ql = blocks[..., :128].reshape(*lead, 2, 1, 64)                          # q6_k
    qh = blocks[..., 128:192].reshape(*lead, 2, 1, 32)
    scales = jax.lax.bitcast_convert_type(blocks[..., 192:208], jnp.int8).astype(jnp.float32)
    d = _f16(blocks[..., 208:210])[..., None]
    step = (d * scales)[..., None]                                          # (..., nb, 16, 1)
    low = jnp.concatenate([ql & 0x0F, ql >> 4], axis=-2).reshape(*lead, 2, 4, 32)
    high = jnp.concatenate([(qh >> s) & 0x03 for s in (0, 2, 4, 6)], axis=-2)  # (..., 2, 4, 32)
    codes = (low | (high << 4)).astype(jnp.int8) - jnp.int8(32)
    return (step * codes.reshape(*lead, 16, 16).astype(jnp.float32)).reshape(*lead, 256)


def dequantize(q: QArray, *, dtype: Any = None) -> jax.Array:
    """The logical array of ``q`` (see :attr:`QArray.shape`) in ``dtype`` (``q.dtype`` by default);
    pure jnp, so under jit XLA fuses the decode into its consumer."""
    if not isinstance(q, QArray):
        raise TypeError(f"q must be a jaxla.quant.QArray, got {type(q).__name__}")
    rows = _decode_rows(q)
    out = jnp.swapaxes(rows, -1, -2) if q.axis == -2 else rows
    return out.astype(q.dtype if dtype is None else dtype)


def take_rows(q: QArray, ids: jax.Array, *, dtype: Any = None) -> jax.Array:
    """``dequantize(q)[ids]`` for a table (``axis=-1``) without decoding the whole table; ids out of
    range give NaN rows."""
    if q.axis != -1 or q.stack_shape:
        raise ValueError(f"take_rows needs an unstacked table QArray (axis=-1), got {q!r}")
    ids = jnp.asarray(ids)
    valid = (ids >= 0) & (ids < q.rows)
    safe = jnp.where(valid, ids, 0)
    picked = jax.tree.map(lambda leaf: jnp.take(leaf, safe, axis=0), q)
    rows = _decode_rows(picked)
    rows = jnp.where(valid[..., None], rows, jnp.nan)
    return rows.astype(q.dtype if dtype is None else dtype)
