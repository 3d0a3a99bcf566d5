"""The attention backend protocol and the one output normalisation every backend goes through.

A backend is a module with two functions over the canonical :class:`~jaxla.attention._args.AttentionArgs`:

* ``unsupported_reason(args, *, platform) -> str | None``: None when it can run ``args`` on the JAX
  platform ``platform`` ("cpu", "gpu", "tpu", ...), else a sentence saying why not. It reads only
  static information (shapes, dtypes, which options are set), so it is free under ``jit``.
* ``attend(args, *, block_sizes) -> (out, lse)``: out (B, T, N, Hv), lse (B, T, N) (the natural-log
  logsumexp of each row's visible logits). ``block_sizes`` is the caller's ``ChunkedBlockSizes`` or
  None; a backend with no such tiles ignores it. A row that sees no key may come back with any
  finite output and an lse of ``-inf`` or ``<= EMPTY_ROW_LSE``; :func:`run` turns it into the contract.

:func:`run` handles what no backend has to: empty shapes (T = 0 or S = 0) and the normalisation
(output in the caller's query dtype, rows that see no key → zero output, ``EMPTY_ROW_LSE`` and zero
gradients, rank-3 callers get rank-3 results). A NaN stays a NaN: it compares false with the
empty-row test, so a non-finite input is never turned into a plausible number here.

Dimension legend: B batch, T query length, S key length, N query heads, Hv value head dim.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import jax
import jax.numpy as jnp

from jaxla import _checks
from jaxla.attention._args import AttentionArgs
from jaxla.attention._reference import EMPTY_ROW_LSE


class Backend(Protocol):
    """What a backend module provides (a module satisfies this protocol structurally)."""

    def unsupported_reason(self, args: AttentionArgs, *, platform: str) -> str | None: ...

    def attend(self, args: AttentionArgs, *, block_sizes) -> tuple[jax.Array, jax.Array]: ...


def empty_outputs(args: AttentionArgs) -> tuple[jax.Array, jax.Array] | None:
    """The result when there is nothing to compute (T = 0, S = 0, B = 0 or N = 0), else None.

    With no key every row sees nothing: zeros and ``EMPTY_ROW_LSE``. The result does not depend on
    the inputs, so every gradient is zero.
    """
    b, t, n, s = args.batch, args.q_len, args.num_heads, args.kv_len
    if b * t * n and s:
        return None
    acc = _checks.accum_dtype(args.dtype)
    return (jnp.zeros((b, t, n, args.value_head_dim), args.out_dtype),
            jnp.full((b, t, n), EMPTY_ROW_LSE, acc))


def normalize(args: AttentionArgs, out: jax.Array, lse: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A backend's raw ``(out, lse)`` → the documented contract (see the module docstring)."""
    acc = _checks.accum_dtype(args.dtype)
    lse = lse.astype(acc)
    # -inf and EMPTY_ROW_LSE both mark a row with no visible key; NaN compares false and stays.
    # (A row whose visible logits are all below -2.4e38 would count as empty too; no real one is.)
    empty = lse <= EMPTY_ROW_LSE
    out = jnp.where(empty[..., None], jnp.zeros((), out.dtype), out).astype(args.out_dtype)
    lse = jnp.where(empty, jnp.asarray(EMPTY_ROW_LSE, acc), lse)
    return out, lse


def run(attend: Callable[..., tuple[jax.Array, jax.Array]], args: AttentionArgs,
        **options) -> tuple[jax.Array, jax.Array]:
    """Runs a backend's ``attend(args, **options)`` with the empty-shape cases and normalisation.

    Returns:
      ``(out, lse)``: out BTNHv (TNHv for rank-3 callers) in the query dtype; lse BTN (TN) in
      float32 (float64 for float64 inputs), ``EMPTY_ROW_LSE`` on rows that see no key.
    """
    result = empty_outputs(args)
    out, lse = normalize(args, *attend(args, **options)) if result is None else result
    if not args.batched:
        out, lse = out[0], lse[0]
    return out, lse
