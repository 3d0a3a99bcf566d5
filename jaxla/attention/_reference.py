"""The ``"xla"`` backend: the readable definition of attention, materialising all T×S scores.

Every other implementation is tested against this one (and it against a float64 NumPy reference). It
is differentiated by plain JAX autodiff, so it is written to keep fully masked rows free of NaN in both
directions: masked scores are ``-inf`` only inside ``exp``, whose derivative there is exactly 0.

Dimension legend: B batch, T query length, S key length, N query heads, K kv heads, G = N // K query
heads per kv head, H query/key head dim, Hv value head dim.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxla import _checks
from jaxla.attention import _masks
from jaxla.attention._args import AttentionArgs

# logsumexp reported for a query row that sees no key. Finite, so it never turns into NaN downstream,
# and so negative that exp(lse - anything finite) is 0: merging such a row's partial result with others
# (as blockwise/ring attention does) gives it zero weight. Same magnitude jax.nn uses for masked logits.
EMPTY_ROW_LSE = float(np.float32(-0.7 * float(np.finfo(np.float32).max)))


def lse_from_base2(lse2: jax.Array) -> jax.Array:
    """Natural-log logsumexp from the base-2 one the blockwise paths keep.

    +inf (how they mark a row that sees no key) becomes -inf, the raw empty-row marker that
    ``_base.normalize`` turns into ``EMPTY_ROW_LSE``; NaN stays NaN.
    """
    return jnp.where(lse2 == jnp.inf, jnp.asarray(-jnp.inf, lse2.dtype), lse2 * math.log(2.0))


def output_delta(d_out: jax.Array, out: jax.Array, d_lse: jax.Array, acc) -> jax.Array:
    """The backward pass's per-row softmax correction Σ_h dO·O − d lse, in ``acc``.

    d_out, out (..., Hv); d_lse (...) → (...). d lse / d logits is the probability row, so the
    residual lse's cotangent just shifts it. Written as a contraction: XLA:CPU ran the equivalent
    ``sum(d_out * out, axis=-1)`` over a 64-wide minor axis as a reduction 10× slower than the dot
    (3.5–4.2 vs 0.27–0.36 ms at (1, 2048, 8, 64) f32, 2026-12-02), a fixed cost of every backward call.
    """
    prod = jnp.einsum("...h,...h->...", d_out.astype(acc), out.astype(acc),
                      precision=jax.lax.Precision.HIGHEST, preferred_element_type=acc)
    return prod - d_lse.astype(acc)


def unsupported_reason(args: AttentionArgs, *, platform: str) -> str | None:
    """The definition runs every argument on every platform."""
    del args, platform
    return None


def attend(args: AttentionArgs, *, block_sizes=None) -> tuple[jax.Array, jax.Array]:
    """The backend entry point (see ``_base``): out (B, T, N, Hv), lse (B, T, N).

    ``block_sizes`` is ignored: nothing is tiled.
    """
    del block_sizes
    probs, lse = _masked_softmax(*logits_and_visibility(args))
    b, t, n, _ = args.query.shape
    k, s = args.num_kv_heads, args.kv_len
    probs = probs.reshape(b, k, n // k, t, s).astype(args.value.dtype)
    acc = _checks.accum_dtype(args.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, args.value, preferred_element_type=acc)
    out = out.reshape(b, t, n, args.value_head_dim).astype(args.dtype)
    return out, jnp.transpose(lse, (0, 2, 1))


def logits_and_visibility(args: AttentionArgs) -> tuple[jax.Array, jax.Array]:
    """Scores (B, N, T, S) in the accumulation dtype and the visibility, broadcastable to BNTS."""
    query, key = args.query, args.key
    b, t, n, h = query.shape
    s, k = key.shape[1], key.shape[2]
    acc = _checks.accum_dtype(query.dtype)
    q = query.reshape(b, t, k, n // k, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", q, key, preferred_element_type=acc)
    logits = logits.reshape(b, n, t, s) * jnp.asarray(args.scale, acc)
    if args.bias is not None:
        logits = logits + args.bias.astype(acc)
    if args.softcap is not None:
        logits = args.softcap * jnp.tanh(logits / args.softcap)
    q_pos, k_pos = _masks.positions(0, t), _masks.positions(0, s)
    vis = _masks.band_visible(q_pos, k_pos, args.band, s)[None, None]
    dyn = _masks.dynamic_visible(
        q_pos, k_pos, q_len=args.query_seq_lengths, kv_len=args.key_value_seq_lengths,
        q_seg=args.q_segment_ids, kv_seg=args.kv_segment_ids,
    )
    if dyn is not None:
        vis = vis & dyn[:, None]
    if args.mask is not None:
        vis = vis & args.mask
    return logits, vis


def _masked_softmax(logits, vis):
    """Softmax over visible keys → (probabilities, logsumexp); rows with no visible key give 0, 0.

    A NaN logit (or a +inf one) makes its row's probabilities and logsumexp NaN, as the
    definition does; only a row with no visible key is special-cased.
    """
    masked = jnp.where(vis, logits, -jnp.inf)
    row_max = jax.lax.stop_gradient(jnp.max(masked, axis=-1, keepdims=True))
    # The result does not depend on the shift, so its gradient is not needed (and -inf would poison it).
    row_max = jnp.where(row_max == -jnp.inf, jnp.zeros_like(row_max), row_max)
    e = jnp.exp(masked - row_max)
    total = jnp.sum(e, axis=-1, keepdims=True)
    empty = total == 0
    safe_total = jnp.where(empty, jnp.ones_like(total), total)
    probs = e / safe_total
    lse = jnp.where(empty, jnp.asarray(EMPTY_ROW_LSE, logits.dtype), row_max + jnp.log(safe_total))
    return probs, lse[..., 0]


def attention_probs(args: AttentionArgs) -> jax.Array:
    """Attention probabilities (B, N, T, S) in the accumulation dtype (rows of 0 where nothing is seen)."""
    return _masked_softmax(*logits_and_visibility(args))[0]
