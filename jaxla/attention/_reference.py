"""The ``"xla"`` implementation: the readable definition of attention, materialising all T×S scores.

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

# logsumexp reported for a query row that sees no key. Finite, so it never turns into NaN downstream,
# and so negative that exp(lse - anything finite) is 0: merging such a row's partial result with others
# (as blockwise/ring attention does) gives it zero weight. Same magnitude jax.nn uses for masked logits.
EMPTY_ROW_LSE = float(np.float32(-0.7 * float(np.finfo(np.float32).max)))


def lse_from_base2(lse2: jax.Array) -> jax.Array:
    """Natural-log logsumexp from the base-2 one the blockwise paths keep (+inf marks an empty row)."""
    return jnp.where(jnp.isfinite(lse2), lse2 * math.log(2.0), jnp.asarray(EMPTY_ROW_LSE, lse2.dtype))


def logits_and_visibility(
    query, key, bias, mask, q_seg, kv_seg, q_len, kv_len, *, scale, band, softcap
):
    """Scores (B, N, T, S) in the accumulation dtype and the visibility, broadcastable to BNTS."""
    b, t, n, h = query.shape
    s, k = key.shape[1], key.shape[2]
    acc = _checks.accum_dtype(query.dtype)
    q = query.reshape(b, t, k, n // k, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", q, key, preferred_element_type=acc)
    logits = logits.reshape(b, n, t, s) * jnp.asarray(scale, acc)
    if bias is not None:
        logits = logits + bias.astype(acc)
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    q_pos, k_pos = _masks.positions(0, t), _masks.positions(0, s)
    vis = _masks.band_visible(q_pos, k_pos, band, s)[None, None]
    dyn = _masks.dynamic_visible(
        q_pos, k_pos, q_len=q_len, kv_len=kv_len, q_seg=q_seg, kv_seg=kv_seg
    )
    if dyn is not None:
        vis = vis & dyn[:, None]
    if mask is not None:
        vis = vis & mask
    return logits, vis


def _masked_softmax(logits, vis):
    """Softmax over visible keys → (probabilities, logsumexp); rows with no visible key give 0, 0."""
    masked = jnp.where(vis, logits, -jnp.inf)
    row_max = jax.lax.stop_gradient(jnp.max(masked, axis=-1, keepdims=True))
    # The result does not depend on the shift, so its gradient is not needed (and -inf would poison it).
    row_max = jnp.where(jnp.isfinite(row_max), row_max, jnp.zeros_like(row_max))
    e = jnp.exp(masked - row_max)
    total = jnp.sum(e, axis=-1, keepdims=True)
    seen = total > 0
    probs = e / jnp.where(seen, total, jnp.ones_like(total))
    lse = jnp.where(
        seen,
        row_max + jnp.log(jnp.where(seen, total, jnp.ones_like(total))),
        jnp.asarray(EMPTY_ROW_LSE, logits.dtype),
    )
    return probs, lse[..., 0]


def attention_probs(query, key, bias, mask, q_seg, kv_seg, q_len, kv_len, *, scale, band, softcap):
    """Attention probabilities (B, N, T, S) in the accumulation dtype (rows of 0 where nothing is seen)."""
    logits, vis = logits_and_visibility(
        query, key, bias, mask, q_seg, kv_seg, q_len, kv_len,
        scale=scale, band=band, softcap=softcap,
    )
    return _masked_softmax(logits, vis)[0]


def xla_attention(
    query, key, value, bias, mask, q_seg, kv_seg, q_len, kv_len, *, scale, band, softcap
):
    """Reference attention on canonical rank-4 arguments.

    Returns:
      ``(out, lse)``: out (B, T, N, Hv) in the query dtype; lse (B, T, N) in the accumulation dtype.
    """
    logits, vis = logits_and_visibility(
        query, key, bias, mask, q_seg, kv_seg, q_len, kv_len,
        scale=scale, band=band, softcap=softcap,
    )
    probs, lse = _masked_softmax(logits, vis)
    b, t, n, _ = query.shape
    k = key.shape[2]
    probs = probs.reshape(b, k, n // k, t, key.shape[1]).astype(value.dtype)
    acc = _checks.accum_dtype(query.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, value, preferred_element_type=acc)
    out = out.reshape(b, t, n, value.shape[-1]).astype(query.dtype)
    return out, jnp.transpose(lse, (0, 2, 1))
