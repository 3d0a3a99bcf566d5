"""Public scaled dot-product attention: the canonical arguments, backend choice, and the one path out.

Every call goes the same way: ``_args.canonical_args`` validates the arguments into one
``AttentionArgs`` record; ``select_implementation`` picks a backend by asking each candidate's
``unsupported_reason``; ``_base.run`` calls its ``attend`` and normalises the result (dtype, empty
rows, empty shapes).

Adding a backend ``"name"``:

1. Write ``jaxla/attention/_name.py`` with ``unsupported_reason(args, *, platform) -> str | None``
   and ``attend(args, *, block_sizes) -> (out, lse)`` over ``AttentionArgs`` (the protocol is
   ``_base.Backend``; ``_reference.py`` is the shortest example). It needs no argument checks, no
   dtype cast, no empty-row or empty-shape handling: those happen once, outside it.
2. Register it in ``_BACKENDS`` below (module path) and, if ``implementation=None`` should prefer it
   somewhere, in ``_preferred``; add the name to the ``implementation`` docs of
   ``dot_product_attention``.
3. Nothing else to wire up for tests: ``tests/test_attention_conformance.py`` runs every name in
   ``IMPLEMENTATIONS`` over the shared cases of ``tests/attention_cases.py`` against the float64
   reference, skipping the cases its ``unsupported_reason`` declines. A backend that only runs on an
   accelerator needs a CPU mode there (as "pallas" runs in interpret mode, see ``attention()`` in
   that file). What is specific to the backend gets its own ``tests/test_attention_name.py``.

Dimension legend (used by every docstring here):
  B batch, T query length, S key/value length, N query heads, K key/value heads (N a multiple of K),
  H query/key head dim, Hv value head dim.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxla import _checks, _eager
from jaxla.attention import _base, _partition, _reference
from jaxla.attention._args import AttentionArgs, canonical_args
from jaxla.attention._chunked import ChunkedBlockSizes

_log = logging.getLogger("jaxla.attention")

# Every backend: its name (the ``implementation`` argument) and module, imported on first use so a
# backend whose dependencies are missing only declines (with the import error as its reason).
_BACKENDS = {
    "xla": "jaxla.attention._reference",
    "chunked": "jaxla.attention._chunked",
    "cpu": "jaxla.attention._cpu",
    "pallas": "jaxla.attention._pallas",
}
IMPLEMENTATIONS = tuple(_BACKENDS)
_ACCELERATORS = ("gpu", "cuda", "rocm", "tpu")

# implementation=None uses "chunked" from this many score entries per (batch, head) on; below it the
# scores are small and "xla" has no loop overhead. Measured on a 2-core CPU (f32, N=8, H=64, causal
# and not): at T = S = 64 chunked is ~1.2× faster forward but ~0.95× forward+backward,
# at 128 ~1.2-1.4× forward and ~1.07× forward+backward, at 256 ~1.4× and ~1.1×.
_CHUNKED_MIN_SCORES = 128 * 128


def _load(name: str) -> tuple[ModuleType | None, str | None]:
    """(backend module, None), or (None, why it cannot be imported)."""
    try:
        return importlib.import_module(_BACKENDS[name]), None
    except ImportError as e:
        what = "the Pallas kernel" if name == "pallas" else f"the {name!r} backend"
        return None, f"{what} is unavailable ({_BACKENDS[name]}: {e})"


_GPUS = ("gpu", "cuda", "rocm")


def _preferred(args: AttentionArgs, platform: str) -> tuple[str, ...]:
    """The order implementation=None tries: the platform's kernel, then plain JAX by size.

    float32 on GPU skips the Pallas kernel: it computes f32 with IEEE f32 dots (no tensor cores),
    while XLA's dots at default precision run on TF32 tensor cores (several times faster on
    Ampere/Hopper). ``implementation="pallas"`` still runs the exact-f32 kernel on request.
    """
    kernels = ("cpu",) if platform == "cpu" else ("pallas",) if platform in _ACCELERATORS else ()
    if platform in _GPUS and args.dtype == jnp.dtype(jnp.float32):
        kernels = ()
    plain = "chunked" if args.q_len * args.kv_len >= _CHUNKED_MIN_SCORES else "xla"
    return (*kernels, plain, "xla")


def _check_options(implementation, block_sizes) -> None:
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}"
        )
    if block_sizes is not None and not isinstance(block_sizes, ChunkedBlockSizes):
        raise TypeError(f"block_sizes must be a ChunkedBlockSizes, got {type(block_sizes).__name__}")


def _select(implementation: str | None, args: AttentionArgs, platform: str) -> tuple[str, ModuleType]:
    """(name, module) of the backend to run, raising ValueError when an explicit one declines."""
    names = (implementation,) if implementation is not None else _preferred(args, platform)
    for name in names:
        module, reason = _load(name)
        if reason is None:
            reason = module.unsupported_reason(args, platform=platform)
        if reason is None:
            return name, module
        if implementation is not None:
            raise ValueError(f'implementation="{name}" cannot run these arguments: {reason}')
        _log.debug("implementation=None: not using %r: %s", name, reason)
    raise AssertionError("the 'xla' backend declined, which it never does")  # pragma: no cover


def select_implementation(
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
) -> str:
    """Which backend :func:`dot_product_attention` runs for these arguments, without running it.

    Takes exactly the arguments of :func:`dot_product_attention` (so a caller can pass the same
    ones) and checks them the same way. With ``implementation=None`` the rule is: on CPU ``"cpu"``
    when the compiled kernel supports the arguments, on GPU/TPU ``"pallas"`` when the kernel supports
    them (not float32 on GPU, where XLA's TF32 tensor-core dots are faster), else ``"chunked"``
    when T·S >= 128², else ``"xla"``. Why a backend declined is logged at DEBUG level on the
    ``jaxla.attention`` logger. Only shapes, dtypes and options matter, so the
    answer is the same under ``jit`` and for any array values, and ``jax.ShapeDtypeStruct``s can
    stand in for the arrays (nothing is computed).

    Dimension legend: B batch, T query length, S key length, N query heads, K kv heads, H head dim,
    Hv value head dim.

    Args:
      query: BTNH (or TNH).
      key: BSKH (or SKH).
      value: BSKHv (or SKHv).
      bias, mask, scale, is_causal, query_seq_lengths, key_value_seq_lengths, local_window_size,
        segment_ids, logits_soft_cap, implementation, return_residual, block_sizes: as in
        :func:`dot_product_attention` (``return_residual`` does not change the choice).

    Returns:
      One of ``"xla"``, ``"chunked"``, ``"cpu"``, ``"pallas"``.

    Raises:
      ValueError / TypeError: as :func:`dot_product_attention` would for the same arguments
        (including an explicit ``implementation`` that cannot run them).

    Example:
      >>> q = jax.ShapeDtypeStruct((1, 4096, 8, 64), jnp.float32)
      >>> jaxla.attention.select_implementation(q, q, q, is_causal=True)  # doctest: +SKIP
      'cpu'
    """
    del return_residual
    _check_options(implementation, block_sizes)
    platform = jax.default_backend()
    chosen = []

    def choose(query, key, value, bias, mask, query_seq_lengths, key_value_seq_lengths,
               segment_ids):
        args = canonical_args(
            query, key, value, bias, mask, scale=scale, is_causal=is_causal,
            query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
            local_window_size=local_window_size, segment_ids=segment_ids,
            logits_soft_cap=logits_soft_cap,
        )
        chosen.append(_select(implementation, args, platform)[0])
        return ()

    # Traced abstractly: nothing is computed, and ShapeDtypeStructs work as well as arrays.
    jax.eval_shape(choose, query, key, value, bias, mask, query_seq_lengths,
                   key_value_seq_lengths, segment_ids)
    return chosen[0]


@_eager.compiled
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
      scale: logit scale, a finite Python number; ``1/sqrt(H)`` by default.
      is_causal: key j visible to query i only if ``j <= i``.
      query_seq_lengths: int (B,): query rows at or beyond the length see nothing (output zeros).
      key_value_seq_lengths: int (B,): keys at or beyond the length are hidden.
      local_window_size: ``(left, right)`` (an int w means ``(w, w)``): query i sees keys
        ``i - left .. i + right``.
      segment_ids: int (B, T) when T == S, or a pair ``(query ids (B, T), key ids (B, S))``
        ((T,), (S,) for rank 3): tokens attend only within their segment (packed sequences).
      logits_soft_cap: finite ``c > 0`` replaces the logits by ``c·tanh(logits / c)`` before
        masking.
      implementation: ``"xla"`` (materialises the T×S scores; the readable reference), ``"chunked"``
        (tiled online softmax in plain JAX, O(T + S) memory, skips blocks outside causal/window
        bands), ``"cpu"`` (jaxla's compiled CPU kernels: float32 compute, no bias/mask arrays or
        soft cap, head dims multiples of 8), ``"pallas"`` (fused GPU/TPU kernel, when available for
        the arguments), or None: Pallas on GPU/TPU when it supports the arguments; on CPU ``"cpu"``
        when it supports them; else ``"chunked"`` when T·S >= 128² (measured faster from there on
        CPU), else ``"xla"``; :func:`select_implementation` says which, and why the others declined
        is logged at DEBUG level on the ``jaxla.attention`` logger.
      return_residual: also return the logsumexp of the visible logits.
      block_sizes: tile sizes (query positions, keys) of ``"chunked"`` and ``"cpu"``; by default
        ``ChunkedBlockSizes.default()`` for chunked and ``_cpu.default_block_sizes`` for cpu.

    Returns:
      The output BTNHv (TNHv) in the query dtype, and with ``return_residual`` also the logsumexp
      BTN (TN) in float32 (float64 for float64 inputs). The logsumexp of a row that sees no key is
      ``EMPTY_ROW_LSE = -0.7 · float32 max`` (finite, so exp of it is 0 and no NaN appears
      downstream), and it is differentiable (its gradient is the probability row). Every
      implementation gives the same contract, also for empty shapes: T = 0 gives empty results;
      S = 0 makes every row one that sees no key. A NaN or inf in query, key, value or bias is never
      hidden: the rows that see it come out NaN (or inf), as in the ``"xla"`` definition.

    Raises:
      ValueError / TypeError: naming the argument and the shapes, for any inconsistent argument
        (including a non-finite ``scale`` or ``logits_soft_cap``), an unknown ``implementation``,
        or an explicit ``implementation`` that cannot run the arguments (the reason is given).
    """
    _check_options(implementation, block_sizes)
    args = canonical_args(
        query, key, value, bias, mask, scale=scale, is_causal=is_causal,
        query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size, segment_ids=segment_ids,
        logits_soft_cap=logits_soft_cap,
    )
    name, backend = _select(implementation, args, jax.default_backend())
    # A compiled kernel on batch/head-sharded inputs runs per shard (see _partition).
    attend = _partition.per_shard(name, backend.attend, args)
    out, lse = _base.run(attend, args, block_sizes=block_sizes)
    return (out, lse) if return_residual else out


@_eager.compiled
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
    args = canonical_args(
        query_arr, key_arr, key_arr, bias, mask, scale=scale, is_causal=is_causal,
        query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size, segment_ids=segment_ids,
        logits_soft_cap=logits_soft_cap,
    )
    if args.kv_len == 0:  # no key: every row is a row that sees nothing (and has no entries)
        b, n, t = args.batch, args.num_heads, args.q_len
        probs = jnp.zeros((b, n, t, 0), _checks.accum_dtype(args.dtype))
    else:
        probs = _reference.attention_probs(args)
    return probs if args.batched else probs[0]
