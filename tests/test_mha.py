"""Tests of the multi-head attention block, rotary embeddings and the KV-cache decode step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxla


def _np_rope(x, pos, theta=10000.0):
    """RoPE from the definition: rotate (x[k], x[k + H/2]) by pos · theta^(-2k/H), in float64."""
    x = np.asarray(x, np.float64)
    h = x.shape[-1]
    freqs = theta ** (-np.arange(0, h, 2) / h)
    ang = np.asarray(pos, np.float64)[..., :, None, None] * freqs
    a, b = x[..., : h // 2], x[..., h // 2:]
    return np.concatenate([a * np.cos(ang) - b * np.sin(ang), b * np.cos(ang) + a * np.sin(ang)], -1)


def _np_mha(params, x, num_heads, *, causal, rope_pos=None, context=None):
    """Projections + attention in float64 NumPy (GQA by repeating kv heads)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(x, np.float64)
    c = x if context is None else np.asarray(context, np.float64)
    b, t, _ = x.shape
    s = c.shape[1]
    h = p["q"]["w"].shape[1] // num_heads
    kh = p["k"]["w"].shape[1] // h
    hv = p["v"]["w"].shape[1] // kh
    q = (x @ p["q"]["w"]).reshape(b, t, num_heads, h)
    k = (c @ p["k"]["w"]).reshape(b, s, kh, h)
    v = (c @ p["v"]["w"]).reshape(b, s, kh, hv)
    if rope_pos is not None:
        q, k = _np_rope(q, rope_pos), _np_rope(k, rope_pos)
    rep = num_heads // kh
    k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(h)
    if causal:
        logits = np.where(np.tril(np.ones((t, s), bool)), logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    out = np.einsum("bnts,bsnh->btnh", w, v).reshape(b, t, num_heads * hv)
    return out @ p["o"]["w"]


def test_init_mha_shapes_and_gqa(key):
    p = jax.eval_shape(lambda k: jaxla.init_mha(k, 32, 4, num_kv_heads=2, head_dim=16,
                                                value_head_dim=8, d_context=24), key)
    assert p["q"]["w"].shape == (32, 64) and p["k"]["w"].shape == (24, 32)
    assert p["v"]["w"].shape == (24, 16) and p["o"]["w"].shape == (32, 32)
    assert "b" not in p["q"]
    biased = jax.jit(lambda k: jaxla.init_mha(k, 32, 4, use_bias=True))(key)
    assert biased["o"]["b"].shape == (32,) and float(jnp.std(biased["q"]["w"])) > 0


@pytest.mark.parametrize("kv_heads,rope", [(4, False), (2, True), (1, True)])
def test_mha_matches_numpy(key, rng, kv_heads, rope, x64):
    p = jaxla.init_mha(key, 16, 4, num_kv_heads=kv_heads, dtype=jnp.float64)
    x = rng.normal(size=(2, 7, 16))
    kw = dict(rope_theta=10000.0) if rope else {}
    out = jax.jit(lambda p, x: jaxla.multi_head_attention(p, x, num_heads=4, is_causal=True, **kw))(
        p, jnp.asarray(x))
    want = _np_mha(p, x, 4, causal=True, rope_pos=np.arange(7) if rope else None)
    np.testing.assert_allclose(out, want, atol=1e-10)


def test_cross_attention_and_gradients(key, rng, x64):
    p = jaxla.init_mha(key, 8, 2, d_context=6, dtype=jnp.float64)
    x, c = jnp.asarray(rng.normal(size=(1, 3, 8))), jnp.asarray(rng.normal(size=(1, 5, 6)))
    f = jax.jit(lambda p, x, c: jaxla.multi_head_attention(p, x, num_heads=2, context=c))
    np.testing.assert_allclose(f(p, x, c), _np_mha(p, x, 2, causal=False, context=c), atol=1e-10)
    check_grads(f, (p, x, c), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_apply_rope_matches_definition_and_is_relative(rng):
    x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
    pos = rng.integers(0, 100, size=(2, 5))
    rope = jax.jit(jaxla.apply_rope)
    np.testing.assert_allclose(rope(x, pos), _np_rope(x, pos), atol=1e-4)
    np.testing.assert_allclose(jax.jit(jaxla.apply_rope)(x[0]), _np_rope(x[0], np.arange(5)),
                               atol=1e-5)
    # <rope(q, i), rope(k, j)> depends only on i - j.
    q, k = rng.normal(size=(1, 1, 1, 8)), rng.normal(size=(1, 1, 1, 8))

    @jax.jit
    def dot_at(i, j):
        qr = jaxla.apply_rope(jnp.asarray(q, jnp.float32), i[None])
        kr = jaxla.apply_rope(jnp.asarray(k, jnp.float32), j[None])
        return jnp.sum(qr * kr)

    def score(i, j):
        return float(dot_at(jnp.int32(i), jnp.int32(j)))

    assert score(7, 3) == pytest.approx(score(24, 20), abs=1e-4)
    assert jaxla.apply_rope(jnp.ones((1, 2, 1, 4), jnp.bfloat16)).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="head_dim must be even"):
        jaxla.apply_rope(np.ones((2, 1, 3), np.float32))
    with pytest.raises(ValueError, match="positions must have shape"):
        jaxla.apply_rope(x, np.arange(4))
    np.testing.assert_allclose(jaxla.rope_frequencies(4), [1.0, 0.01], rtol=1e-6)


def test_decode_with_cache_matches_full_causal_attention(key, rng):
    rope = 10000.0
    p = jaxla.init_mha(key, 16, 4, num_kv_heads=2)
    b, prompt, total = 2, 4, 7
    x = jnp.asarray(rng.normal(size=(b, total, 16)), jnp.float32)
    full = jax.jit(lambda p, x: jaxla.multi_head_attention(p, x, num_heads=4, is_causal=True,
                                                           rope_theta=rope))(p, x)
    cache = jaxla.init_kv_cache(b, 8, 2, 4)
    step = jax.jit(lambda p, x, c: jaxla.multi_head_attention_decode(p, x, c, num_heads=4,
                                                                      rope_theta=rope))
    y, cache = step(p, x[:, :prompt], cache)
    outs = [y]
    for t in range(prompt, total):
        y, cache = step(p, x[:, t:t + 1], cache)
        outs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=2e-5)
    assert cache["lengths"].tolist() == [total, total]
    np.testing.assert_array_equal(cache["k"][:, total:], 0)


def test_decode_ragged_lengths_and_window(key, rng):
    p = jaxla.init_mha(key, 8, 2)
    x = jnp.asarray(rng.normal(size=(2, 6, 8)), jnp.float32)
    decode = jax.jit(lambda x, c: jaxla.multi_head_attention_decode(p, x, c, num_heads=2,
                                                                     local_window_size=2))
    full = jax.jit(lambda x: jaxla.multi_head_attention(p, x, num_heads=2, is_causal=True,
                                                        local_window_size=(2, 0)))
    # Sequence 0 already holds 5 tokens, sequence 1 holds 2: the next token differs per sequence.
    one = jaxla.init_kv_cache(1, 6, 2, 4)
    c0, c1 = decode(x[:1, :5], one)[1], decode(x[1:, :2], one)[1]
    cache = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), c0, c1)
    new = jnp.stack([x[0, 5], x[1, 2]])[:, None]
    y, cache = decode(new, cache)
    assert cache["lengths"].tolist() == [6, 3]
    for b, n in ((0, 6), (1, 3)):
        seq = jnp.concatenate([x[b, : n - 1], new[b]])[None]
        np.testing.assert_allclose(y[b], full(seq)[:, -1], atol=2e-5)


def test_bad_params_and_cache_are_clear_errors(key):
    p = jaxla.init_mha(key, 8, 2)
    x = jnp.ones((1, 3, 8))
    with pytest.raises(ValueError, match="not divisible by num_heads=3"):
        jaxla.multi_head_attention(p, x, num_heads=3)
    with pytest.raises(TypeError, match='"q", "k", "v", "o"'):
        jaxla.multi_head_attention({"q": p["q"]}, x, num_heads=2)
    with pytest.raises(ValueError, match="x must have rank 3"):
        jaxla.multi_head_attention(p, jnp.ones((3, 8)), num_heads=2)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        jaxla.init_mha(key, 8, 3, num_kv_heads=2)
    with pytest.raises(ValueError, match="do not match"):
        jaxla.multi_head_attention_decode(p, x, jaxla.init_kv_cache(1, 8, 1, 4), num_heads=2)
    with pytest.raises(ValueError, match="at most L=2 tokens"):
        jaxla.multi_head_attention_decode(p, x, jaxla.init_kv_cache(1, 2, 2, 4), num_heads=2)
