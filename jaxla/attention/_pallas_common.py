"""Pieces shared by the Pallas forward and backward kernels: version shims, the static plan, masks.

Everything here is either static (Python values fixed at trace time) or a small in-kernel helper
that the Triton, Mosaic TPU and interpret backends all lower. The kernels index refs with
``ref[pl.ds(start, size), ...]`` rather than ``pl.load``/``pl.store`` because plain ref indexing is
the one spelling every Pallas version since 0.4.3x accepts on every backend.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:  # The Triton backend module is missing from some jaxlib builds.
    from jax.experimental.pallas import triton as _plgpu
except ImportError:  # pragma: no cover - depends on the installed jaxlib
    _plgpu = None

try:
    from jax.experimental.pallas import tpu as _pltpu
except ImportError:  # pragma: no cover - depends on the installed jaxlib
    _pltpu = None

# Squeezed block dimension: ``pl.squeezed`` in newer jax, ``None`` before it existed (both still
# accepted by 0.10/0.11; prefer the explicit marker where it is available).
SQUEEZED = getattr(pl, "squeezed", None)

# Sentinel segment ids that never compare equal: query rows past ``query_seq_lengths`` (or padding)
# get Q_INVALID, key columns past ``key_value_seq_lengths`` (or padding) get KV_INVALID.
Q_INVALID = -(2**31)
KV_INVALID = -(2**31) + 1

LAYOUTS = ("btnh", "bnth")
BACKENDS = ("triton", "mosaic", "interpret")

# Smallest tile each compiled backend takes: Triton's ``tl.dot`` needs every dim >= 16; Mosaic TPU
# tiles the (time, head_dim) plane in (8|16, 128) vregs and the MXU in 128s.
BLOCK_FLOOR = {"triton": 16, "mosaic": 128, "interpret": 16}

# Scores are kept in base 2 inside the kernels: exp2(x·log2 e) is exp(x), and folding log2 e into
# the score scale saves one multiply per score (exp2 is the native instruction on GPUs).
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)

# jax 0.11 deprecates the Pallas Triton backend and warns on every lowering (a DeprecationWarning,
# hidden by Python's default filters outside __main__). Show it once per process instead: the
# message names the migration, and one line is enough. See the README's GPU/TPU paragraph for what a
# Mosaic GPU port takes.
TRITON_DEPRECATION = "The Pallas Triton backend is deprecated"


def show_triton_deprecation_once() -> None:
    """Puts a filter first that shows jax's Triton deprecation warning once per process."""
    warnings.filterwarnings("once", message=TRITON_DEPRECATION, category=DeprecationWarning)


show_triton_deprecation_once()


def triton_compiler_params(num_warps: int, num_stages: int):
    """Triton compiler parameters under the class name of the installed jax version."""
    if _plgpu is None:
        raise RuntimeError("jax.experimental.pallas.triton is not available in this jaxlib")
    cls = getattr(_plgpu, "CompilerParams", None) or _plgpu.TritonCompilerParams
    return cls(num_warps=num_warps, num_stages=num_stages)


def mosaic_compiler_params(dimension_semantics: tuple[str, ...]):
    """Mosaic TPU compiler parameters under the class name of the installed jax version."""
    if _pltpu is None:
        raise RuntimeError("jax.experimental.pallas.tpu is not available in this jaxlib")
    cls = getattr(_pltpu, "CompilerParams", None) or _pltpu.TPUCompilerParams
    return cls(dimension_semantics=dimension_semantics)


def triton_available() -> bool:
    return _plgpu is not None


def mosaic_available() -> bool:
    return _pltpu is not None


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static description of one kernel launch (hashable: a ``custom_vjp`` nondiff argument).

    Lengths ``t_len``/``s_len`` are the caller's; ``t_pad``/``s_pad`` are multiples of every query /
    key block size used by the three kernels. ``groups`` is N // K. ``layout`` is how the kernels see
    the arrays: "btnh" (the caller's layout, used by Triton and interpret mode) or "bnth" (heads
    before time, so the last two block dims are (time, head_dim) as Mosaic TPU tiles want).
    """

    scale: float
    causal: bool
    window_left: int | None
    window_right: int | None
    softcap: float | None
    t_len: int
    s_len: int
    t_pad: int
    s_pad: int
    groups: int
    has_segments: bool
    layout: str
    backend: str
    block_q: int
    block_k: int
    block_q_dq: int
    block_k_dq: int
    block_q_dkv: int
    block_k_dkv: int
    num_warps: int
    num_stages: int
    num_warps_bwd: int
    num_stages_bwd: int
    highest_precision: bool
    acc_dtype: str = "float32"
    reverse_q_blocks: bool = False

    @property
    def acc(self):
        """Accumulator dtype: f32, or f64 for f64 inputs (interpret mode only, for exact tests)."""
        return jnp.dtype(self.acc_dtype)

    @property
    def interpret(self) -> bool:
        return self.backend == "interpret"

    @property
    def precision(self):
        # f32 inputs: keep full f32 products (no TF32 / bf16 passes) so results match the reference.
        return lax.Precision.HIGHEST if self.highest_precision else None


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def lcm(*values: int) -> int:
    out = 1
    for v in values:
        out = out * v // math.gcd(out, v)
    return out


def exp2(x: jax.Array) -> jax.Array:
    """2**x; ``lax.exp2`` lowers to one ``ex2`` instruction on GPUs (exp is ex2 plus a multiply)."""
    return lax.exp2(x)


def dot_nt(a: jax.Array, b: jax.Array, plan: Plan) -> jax.Array:
    """``a @ b.T`` with f32 accumulation, contracting the last dims (no explicit transpose)."""
    return lax.dot_general(
        a, b, (((1,), (1,)), ((), ())), precision=plan.precision,
        preferred_element_type=plan.acc,
    )


def dot_nn(a: jax.Array, b: jax.Array, plan: Plan) -> jax.Array:
    """``a @ b`` with f32 accumulation."""
    return lax.dot_general(
        a, b, (((1,), (0,)), ((), ())), precision=plan.precision,
        preferred_element_type=plan.acc,
    )


def scores2(dots: jax.Array, plan: Plan) -> tuple[jax.Array, jax.Array | None]:
    """Scores in base 2, ``softcap(scale·q·k)·log2 e``, from the raw dot products; and the tanh.

    The soft cap is ``c·tanh(x/c)``; its tanh is returned for the backward (``1 - tanh²``), None
    without a cap. Without a soft cap the two constants fold into one multiply.
    """
    if plan.softcap is None:
        return dots * (plan.scale * LOG2E), None
    t = jnp.tanh(dots * (plan.scale / plan.softcap))
    return t * (plan.softcap * LOG2E), t


def probs(plan: Plan, dots: jax.Array, lse: jax.Array, mask: jax.Array | None):
    """Recomputes softmax probabilities from raw q·k dots (in base 2, as the forward), and the
    soft cap's tanh; shared by the Triton-layout and TPU backward kernels.

    Rows with lse = -inf (nothing visible) give exactly 0.
    """
    s, t = scores2(dots, plan)
    # +inf makes exp2() return 0 for empty rows; they are fully masked anyway.
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse * LOG2E)
    p = exp2(s - lse)
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    return p, t


def visible(
    plan: Plan,
    rows: jax.Array,
    cols: jax.Array,
    q_seg: jax.Array | None,
    kv_seg: jax.Array | None,
) -> jax.Array | None:
    """Boolean visibility of key ``cols`` to query ``rows`` (same-shape int32 position tiles).

    ``q_seg``/``kv_seg`` are already broadcast to the tile shape. Returns None when every entry is
    visible, so callers skip the select entirely.
    """
    mask = None

    def both(m, c):
        return c if m is None else jnp.logical_and(m, c)

    if plan.causal:
        mask = both(mask, cols <= rows)
    if plan.window_left is not None:
        mask = both(mask, cols >= rows - plan.window_left)
    if plan.window_right is not None:
        mask = both(mask, cols <= rows + plan.window_right)
    if plan.has_segments:
        # Padding and length masks are folded into the segment ids as never-equal sentinels.
        mask = both(mask, q_seg == kv_seg)
    elif plan.s_pad > plan.s_len:
        mask = both(mask, cols < plan.s_len)
    return mask


def kv_block_range(plan: Plan, q_start: jax.Array, block_q: int, block_k: int):
    """Key blocks [lo, hi) that can hold a key visible to the query rows [q_start, q_start+block_q).

    Blocks entirely hidden by causality, the local window or padding are never visited.
    """
    hi_pos = jnp.int32(plan.s_len)
    if plan.causal:
        hi_pos = jnp.minimum(hi_pos, q_start + block_q)
    if plan.window_right is not None:
        hi_pos = jnp.minimum(hi_pos, q_start + block_q + plan.window_right)
    hi = lax.div(hi_pos + (block_k - 1), jnp.int32(block_k))
    lo = jnp.int32(0)
    if plan.window_left is not None:
        lo = lax.div(jnp.maximum(q_start - plan.window_left, 0), jnp.int32(block_k))
    return lo, jnp.maximum(hi, lo)  # an empty range stays empty, so [lo, hi] brackets sub-ranges


def q_block_range(plan: Plan, k_start: jax.Array, block_q: int, block_k: int):
    """Query blocks [lo, hi) that can see a key in [k_start, k_start+block_k) (mirror of above)."""
    lo_pos = jnp.int32(0)
    if plan.causal:
        lo_pos = jnp.maximum(lo_pos, k_start)
    if plan.window_right is not None:
        lo_pos = jnp.maximum(lo_pos, k_start - plan.window_right)
    hi_pos = jnp.int32(plan.t_len)
    if plan.window_left is not None:
        hi_pos = jnp.minimum(hi_pos, k_start + block_k + plan.window_left)
    # A key block made only of padding contributes nothing: give it an empty range.
    hi_pos = jnp.where(k_start < plan.s_len, hi_pos, 0)
    lo = lax.div(lo_pos, jnp.int32(block_q))
    hi = lax.div(hi_pos + (block_q - 1), jnp.int32(block_q))
    return lo, jnp.maximum(hi, lo)


def _clip(x, lo, hi):
    return jnp.minimum(jnp.maximum(x, lo), hi)


def kv_unmasked_range(plan: Plan, q_start, block_q: int, block_k: int, lo, hi):
    """Key blocks [ulo, uhi) within [lo, hi) whose every entry is visible to the query block.

    Those blocks skip mask construction and the select. With segment ids nothing is known
    statically, so the range is empty.
    """
    if plan.has_segments:
        return lo, lo
    uhi = jnp.int32(plan.s_len // block_k)
    if plan.window_right is not None:
        uhi = jnp.minimum(uhi, lax.div(q_start + plan.window_right + 1, jnp.int32(block_k)))
    ulo = jnp.int32(0)
    if plan.window_left is not None:
        start = jnp.maximum(q_start + (block_q - 1 - plan.window_left), 0)
        ulo = lax.div(start + (block_k - 1), jnp.int32(block_k))
    ulo = _clip(ulo, lo, hi)
    return ulo, _clip(uhi, ulo, hi)


def q_unmasked_range(plan: Plan, k_start, block_q: int, block_k: int, lo, hi):
    """Query blocks [ulo, uhi) within [lo, hi) that see every key of the key block."""
    if plan.has_segments:
        return lo, lo
    ulo = jnp.int32(0)
    if plan.window_right is not None:
        start = jnp.maximum(k_start + (block_k - 1 - plan.window_right), 0)
        ulo = lax.div(start + (block_q - 1), jnp.int32(block_q))
    uhi = hi
    if plan.window_left is not None:
        uhi = lax.div(k_start + plan.window_left + 1, jnp.int32(block_q))
    # A key block that reaches into the padding needs the padding mask everywhere.
    uhi = jnp.where(k_start + block_k <= plan.s_len, uhi, ulo)
    ulo = _clip(ulo, lo, hi)
    return ulo, _clip(uhi, ulo, hi)


def split_loop(lo, ulo, uhi, hi, body, init):
    """``fori_loop`` over [lo, hi) with ``body(masked)(i, carry)``; [ulo, uhi) runs unmasked."""
    carry = lax.fori_loop(lo, ulo, body(True), init)
    carry = lax.fori_loop(ulo, uhi, body(False), carry)
    return lax.fori_loop(uhi, hi, body(True), carry)


def tile_mask(plan, masked: bool, q_start, k_start, shape: tuple[int, int], q_axis: int,
              q_seg: Callable[[], jax.Array], k_seg: Callable[[], jax.Array]) -> jax.Array | None:
    """Visibility of one score tile, or None when the tile is known to be fully visible.

    ``q_axis`` is the tile axis that holds queries (0 for forward/dQ tiles, 1 for the transposed
    dK/dV tiles). ``q_seg``/``k_seg`` load the tile's segment ids; they are called only when the
    plan has segments, so kernels without segment ids never read those refs.
    """
    if not masked:
        return None
    seg_q = seg_k = None
    if plan.has_segments:
        seg_q = jnp.broadcast_to(q_seg(), shape)
        seg_k = jnp.broadcast_to(k_seg(), shape)
    return visible(plan, positions(q_start, shape, q_axis), positions(k_start, shape, 1 - q_axis),
                   seg_q, seg_k)


def positions(start: jax.Array, shape: tuple[int, int], axis: int) -> jax.Array:
    """int32 tile of ``start + index along axis``."""
    return start + lax.broadcasted_iota(jnp.int32, shape, axis)


# ---- grids and block specs -------------------------------------------------------------------
# Triton launches grid axis 0 fastest, so query/key blocks go first there: programs that run together
# share one head's K/V in L2. Mosaic TPU walks the grid row-major, so blocks go last there.


def grid(plan: Plan, batch: int, heads: int, blocks: int) -> tuple[int, int, int]:
    return (blocks, heads, batch) if plan.backend == "triton" else (batch, heads, blocks)


def block_axis(plan: Plan) -> int:
    """The grid axis that enumerates query (or key) blocks, for ``pl.program_id``."""
    return 0 if plan.backend == "triton" else 2


def q_block_order(plan: Plan, count: int) -> Callable:
    """Maps a program's position along the query-block grid axis to the query block it runs.

    Causal rows get longer down the sequence, so on Triton (programs launch in grid order) the last
    query blocks are launched first (``plan.reverse_q_blocks``): the longest programs start early
    and the short ones fill the tail of the wave instead of leaving SMs idle. Otherwise identity.
    """
    if plan.reverse_q_blocks and count > 1:
        return lambda i: (count - 1) - i
    return lambda i: i


def _unpack(plan: Plan, g):
    i, h, b = g if plan.backend == "triton" else g[::-1]
    return b, h, i


def seq_spec(plan: Plan, rows: int, width: int, index, *, head_block: int | None = None):
    """BlockSpec over a (B, L, heads, width) array ("btnh") or (B, heads, L, width) ("bnth").

    ``index(b, h, i) -> (head_index, row_block_index)`` maps grid coordinates to the block; with
    ``head_block`` the head axis is kept as a block of that many heads instead of squeezed.
    """
    head = SQUEEZED if head_block is None else head_block

    def index_map(*g):
        b, h, i = _unpack(plan, g)
        hi, ri = index(b, h, i)
        return (b, ri, hi, 0) if plan.layout == "btnh" else (b, hi, ri, 0)

    shape = (SQUEEZED, rows, head, width) if plan.layout == "btnh" else (
        SQUEEZED, head, rows, width)
    return pl.BlockSpec(block_shape=shape, index_map=index_map)


def stat_spec(plan: Plan, rows: int, index, *, head_block: int | None = None, row: bool = False):
    """BlockSpec over a per-query statistic (logsumexp, delta) in f32.

    Stored (B, heads, Tp, 1) and read as a (rows, 1) column, or viewed (B, heads, 1, Tp) (a free
    reshape) and read as a (1, rows) row with ``row=True``. Keeping two trailing dims, one of them
    full-size, satisfies Mosaic TPU's tiling rule and lets tiles broadcast without transposes.
    """
    head = SQUEEZED if head_block is None else head_block
    shape = (SQUEEZED, head, 1, rows) if row else (SQUEEZED, head, rows, 1)

    def index_map(*g):
        b, h, i = _unpack(plan, g)
        hi, ri = index(b, h, i)
        return (b, hi, 0, ri) if row else (b, hi, ri, 0)

    return pl.BlockSpec(block_shape=shape, index_map=index_map)


def seg_spec(plan: Plan, rows: int, index, *, row: bool):
    """BlockSpec over int32 segment ids viewed (B, L, 1) (column) or (B, 1, L) (``row=True``)."""
    shape = (SQUEEZED, 1, rows) if row else (SQUEEZED, rows, 1)

    def index_map(*g):
        b, h, i = _unpack(plan, g)
        return (b, 0, index(b, h, i)) if row else (b, index(b, h, i), 0)

    return pl.BlockSpec(block_shape=shape, index_map=index_map)


def as_column(x: jax.Array) -> jax.Array:
    """(..., L) -> (..., L, 1); the same bytes as ``as_row``, so both views are free."""
    return x[..., None]


def as_row(x: jax.Array) -> jax.Array:
    """(..., L) -> (..., 1, L)."""
    return x[..., None, :]


def compiler_params(plan: Plan, *, backward: bool, grid_rank: int = 3):
    """Launch options; on Mosaic a 4-axis grid's last axis is the sequential ("arbitrary") one."""
    if plan.backend == "triton":
        if backward:
            return triton_compiler_params(plan.num_warps_bwd, plan.num_stages_bwd)
        return triton_compiler_params(plan.num_warps, plan.num_stages)
    if plan.backend == "mosaic":
        semantics = ("parallel",) * 3 + ("arbitrary",) * (grid_rank - 3)
        return mosaic_compiler_params(semantics)
    return None


def vmem(shape: tuple[int, ...], dtype):
    """A VMEM scratch buffer of ``shape`` (the TPU kernels' running statistics/accumulators)."""
    if _pltpu is None:
        raise RuntimeError("jax.experimental.pallas.tpu is not available in this jaxlib")
    return _pltpu.VMEM(shape, dtype)


def call_kwargs(plan: Plan, *, backward: bool, name: str, grid_rank: int = 3) -> dict:
    """Backend-specific ``pallas_call`` keywords (no compiler params in interpret mode)."""
    kwargs: dict = {"interpret": plan.interpret, "name": name}
    params = compiler_params(plan, backward=backward, grid_rank=grid_rank)
    if params is not None:
        kwargs["compiler_params"] = params
    return kwargs
