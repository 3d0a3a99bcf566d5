"""Tests of jaxla.dot_product_attention / attention_weights against a float64 NumPy reference."""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxla
from jaxla.attention import _api, _masks
from jaxla.attention._reference import EMPTY_ROW_LSE

IMPLS = ("xla", "chunked")
# Small tiles so that a handful of positions already spans several blocks, partial blocks and skips.
SMALL = jaxla.ChunkedBlockSizes(block_q=8, block_k=16)


# ---- float64 NumPy reference -----------------------------------------------------------------------


def np_attention(q, k, v, bias=None, mask=None, *, scale=None, causal=False, window=None,
                 q_len=None, kv_len=None, q_seg=None, kv_seg=None, softcap=None):
    """Attention from the definition, one (batch, head, query) row at a time, in float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    scale = 1 / np.sqrt(h) if scale is None else scale
    bias = None if bias is None else np.broadcast_to(np.asarray(bias, np.float64), (b, n, t, s))
    mask = None if mask is None else np.broadcast_to(np.asarray(mask), (b, n, t, s))
    if isinstance(window, int):
        window = (window, window)
    out = np.zeros((b, t, n, v.shape[-1]))
    lse = np.full((b, t, n), EMPTY_ROW_LSE)
    i_idx, j_idx = np.arange(t)[:, None], np.arange(s)[None, :]
    for bi in range(b):
        vis = np.ones((t, s), bool)
        if causal:
            vis &= j_idx <= i_idx
        if window is not None:
            vis &= (j_idx >= i_idx - window[0]) & (j_idx <= i_idx + window[1])
        if q_len is not None:
            vis &= i_idx < q_len[bi]
        if kv_len is not None:
            vis &= j_idx < kv_len[bi]
        if q_seg is not None:
            vis &= np.asarray(q_seg)[bi][:, None] == np.asarray(kv_seg)[bi][None, :]
        for ni in range(n):
            kv_head = ni // (n // kh)
            logits = scale * q[bi, :, ni] @ k[bi, :, kv_head].T
            if bias is not None:
                logits = logits + bias[bi, ni]
            if softcap is not None:
                logits = softcap * np.tanh(logits / softcap)
            row_vis = vis & (mask[bi, ni] if mask is not None else True)
            for ti in range(t):
                sel = row_vis[ti]
                if not sel.any():
                    continue
                z = logits[ti, sel]
                m = z.max()
                e = np.exp(z - m)
                out[bi, ti, ni] = e @ v[bi, sel, kv_head] / e.sum()
                lse[bi, ti, ni] = m + np.log(e.sum())
    return out, lse


def _draw_case(rng, *, max_len=40):
    """A random combination of attention features, as (arrays, kwargs for jaxla, kwargs for np)."""
    b = int(rng.integers(1, 3))
    t = int(rng.choice([1, 7, 20, max_len]))
    s = t if rng.random() < 0.5 else int(rng.choice([1, 9, 33]))
    kh = int(rng.choice([1, 2]))
    n = kh * int(rng.choice([1, 2]))
    h, hv = 8, int(rng.choice([8, 4]))
    q = rng.normal(size=(b, t, n, h))
    k = rng.normal(size=(b, s, kh, h))
    v = rng.normal(size=(b, s, kh, hv))
    kw = {}
    ref = {}
    if rng.random() < 0.4:
        kw["is_causal"] = ref["causal"] = True
    if rng.random() < 0.3:
        w = (int(rng.integers(0, 6)), int(rng.integers(0, 6)))
        kw["local_window_size"] = ref["window"] = w
    if rng.random() < 0.3:
        ql = rng.integers(0, t + 1, size=b).astype(np.int32)
        kw["query_seq_lengths"], ref["q_len"] = ql, ql
    if rng.random() < 0.3:
        kl = rng.integers(1, s + 1, size=b).astype(np.int32)
        kw["key_value_seq_lengths"], ref["kv_len"] = kl, kl
    if rng.random() < 0.3:
        qs = np.sort(rng.integers(0, 3, size=(b, t)), axis=1).astype(np.int32)
        ks = np.sort(rng.integers(0, 3, size=(b, s)), axis=1).astype(np.int32)
        kw["segment_ids"] = qs if (s == t and rng.random() < 0.5) else (qs, ks)
        ref["q_seg"], ref["kv_seg"] = qs, (qs if not isinstance(kw["segment_ids"], tuple) else ks)
    if rng.random() < 0.3:
        kw["logits_soft_cap"] = ref["softcap"] = 2.0
    if rng.random() < 0.3:
        kw["scale"] = ref["scale"] = 0.3
    bias = mask = None
    if rng.random() < 0.3:
        shape = (b if rng.random() < 0.5 else 1, n if rng.random() < 0.5 else 1, t, s)
        bias = rng.normal(size=shape)
    if rng.random() < 0.3:
        shape = (1, n if rng.random() < 0.5 else 1, t if rng.random() < 0.7 else 1, s)
        mask = rng.random(size=shape) < 0.7
    return (q, k, v, bias, mask), kw, ref


def _dpa(*arrays, **kw):
    """jaxla.dot_product_attention under jit (eager dispatch of the many small ops is slow)."""
    return jax.jit(lambda *a: jaxla.dot_product_attention(*a, **kw))(*arrays)


def _f32(*xs):
    return [None if x is None else jnp.asarray(x, jnp.float32 if x.dtype != bool else bool)
            for x in xs]


@pytest.mark.parametrize("seed", range(5))
def test_matches_numpy_reference_on_random_feature_combinations(seed):
    rng = np.random.default_rng(seed)
    (q, k, v, bias, mask), kw, ref = _draw_case(rng)
    want, want_lse = np_attention(q, k, v, bias, mask, **ref)
    for impl in IMPLS:
        out, lse = _dpa(*_f32(q, k, v, bias, mask), **kw, implementation=impl,
                        block_sizes=SMALL, return_residual=True)
        np.testing.assert_allclose(out, want, atol=2e-5, rtol=1e-5, err_msg=f"{impl} {kw}")
        np.testing.assert_allclose(lse, want_lse, atol=2e-5, rtol=1e-5, err_msg=f"{impl} {kw}")


@pytest.mark.parametrize("t,s", [(100, 257), (257, 100)])
def test_odd_lengths_causal_window_gqa(t, s, rng):
    q, k, v = rng.normal(size=(1, t, 4, 8)), rng.normal(size=(1, s, 2, 8)), rng.normal(size=(1, s, 2, 8))
    want, _ = np_attention(q, k, v, causal=True, window=(40, 3))
    for impl in IMPLS:
        out = _dpa(*_f32(q, k, v), is_causal=True, local_window_size=(40, 3),
                   implementation=impl, block_sizes=SMALL)
        np.testing.assert_allclose(out, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("impl,seed", [("xla", 0), ("chunked", 0), ("chunked", 1)])
def test_gradients_check_grads_float64(impl, seed, x64):
    rng = np.random.default_rng(100 + seed)
    (q, k, v, bias, mask), kw, _ = _draw_case(rng, max_len=9)
    # Differentiable inputs: q, k, v and the bias (random features keep the rest fixed).
    if bias is None:
        bias = rng.normal(size=(1, 1, q.shape[1], k.shape[1]))
    sizes = jaxla.ChunkedBlockSizes(4, 4)

    @jax.jit
    def f(q, k, v, bias):
        return jaxla.dot_product_attention(q, k, v, bias, mask, **kw, implementation=impl,
                                           block_sizes=sizes, return_residual=True)

    check_grads(f, tuple(jnp.asarray(x) for x in (q, k, v, bias)), order=1, modes=("rev",),
                atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(2))
def test_chunked_gradients_match_xla(seed):
    rng = np.random.default_rng(200 + seed)
    (q, k, v, bias, mask), kw, _ = _draw_case(rng)
    args = _f32(q, k, v, bias)

    def loss(impl, q, k, v, bias):
        out = jaxla.dot_product_attention(q, k, v, bias, None if mask is None else jnp.asarray(mask),
                                          **kw, implementation=impl, block_sizes=SMALL)
        return jnp.sum(out * jnp.cos(out))

    nums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
    g_x = jax.jit(jax.grad(functools.partial(loss, "xla"), argnums=nums))(*args)
    g_c = jax.jit(jax.grad(functools.partial(loss, "chunked"), argnums=nums))(*args)
    for a, c in zip(g_x, g_c, strict=True):
        np.testing.assert_allclose(c, a, atol=5e-5, rtol=1e-4)


JAX_NN_CASES = [
    dict(is_causal=True),
    dict(local_window_size=(3, 2)),
    dict(local_window_size=4, is_causal=True, query_seq_lengths=np.array([5, 11], np.int32)),
    dict(scale=0.5, key_value_seq_lengths=np.array([13, 6], np.int32)),
]


@pytest.mark.parametrize("case", range(len(JAX_NN_CASES)))
def test_matches_jax_nn_on_overlapping_arguments(case, rng):
    kw = JAX_NN_CASES[case]
    q, k, v = _f32(rng.normal(size=(2, 11, 4, 8)), rng.normal(size=(2, 13, 2, 8)),
                   rng.normal(size=(2, 13, 2, 8)))
    bias = jnp.asarray(rng.normal(size=(1, 4, 11, 13)), jnp.float32)
    mask = jnp.asarray(rng.random(size=(2, 1, 11, 13)) < 0.8)
    want, want_lse = jax.jit(functools.partial(jax.nn.dot_product_attention, **kw,
                                               return_residual=True))(q, k, v, bias, mask)
    # jax.nn averages all values for rows that see nothing (and zeros query-padding rows): compare
    # the rows that see at least one key, and check ours gives zeros elsewhere.
    _, ref_lse = np_attention(q, k, v, bias, mask, scale=kw.get("scale"),
                              causal=kw.get("is_causal", False),
                              window=kw.get("local_window_size"), q_len=kw.get("query_seq_lengths"),
                              kv_len=kw.get("key_value_seq_lengths"))
    seen = ref_lse > EMPTY_ROW_LSE
    assert seen.any()
    for impl in IMPLS:
        out, lse = _dpa(q, k, v, bias, mask, **kw, implementation=impl, block_sizes=SMALL,
                        return_residual=True)
        np.testing.assert_allclose(np.asarray(out)[seen], np.asarray(want)[seen], atol=2e-6,
                                   rtol=1e-5)
        np.testing.assert_allclose(np.asarray(lse)[seen], np.asarray(want_lse)[seen], atol=2e-6,
                                   rtol=1e-5)
        assert np.all(np.asarray(out)[~seen] == 0)


def test_rank3_inputs_match_jax_nn(rng):
    q, k, v = _f32(rng.normal(size=(6, 2, 8)), rng.normal(size=(5, 1, 8)), rng.normal(size=(5, 1, 8)))
    want, want_lse = jax.jit(functools.partial(jax.nn.dot_product_attention,
                                               return_residual=True))(q, k, v)
    for impl in IMPLS:
        out, lse = _dpa(q, k, v, implementation=impl, return_residual=True)
        assert out.shape == (6, 2, 8) and lse.shape == (6, 2)
        np.testing.assert_allclose(out, want, atol=2e-6)
        np.testing.assert_allclose(lse, want_lse, atol=2e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_inputs_within_bf16_tolerance(impl, rng):
    q, k, v = (jnp.asarray(rng.normal(size=sh), jnp.bfloat16)
               for sh in ((2, 40, 4, 16), (2, 40, 2, 16), (2, 40, 2, 16)))
    want, _ = np_attention(*(np.asarray(x.astype(jnp.float32)) for x in (q, k, v)), causal=True)
    out, lse = _dpa(q, k, v, is_causal=True, implementation=impl, block_sizes=SMALL,
                    return_residual=True)
    assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), want, atol=3e-2, rtol=3e-2)
    g = jax.jit(jax.grad(lambda q: jnp.sum(jaxla.dot_product_attention(
        q, k, v, is_causal=True, implementation=impl, block_sizes=SMALL).astype(jnp.float32))))(q)
    assert g.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(g.astype(jnp.float32))))


@pytest.mark.parametrize("impl", IMPLS)
def test_huge_logits_stay_finite_and_exact(impl, rng):
    q = rng.normal(size=(1, 20, 2, 8)) * 1e4 / np.sqrt(8)
    k, v = rng.normal(size=(1, 20, 2, 8)), rng.normal(size=(1, 20, 2, 8))
    want, want_lse = np_attention(q, k, v, scale=1 / np.sqrt(8), causal=True)
    out, lse = _dpa(*_f32(q, k, v), is_causal=True, implementation=impl, block_sizes=SMALL,
                    return_residual=True)
    assert np.abs(want_lse).max() > 1e3
    np.testing.assert_allclose(out, want, atol=1e-4)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5)
    g = jax.jit(jax.grad(lambda q: jnp.sum(jaxla.dot_product_attention(
        q, *_f32(k, v), is_causal=True, implementation=impl, block_sizes=SMALL))))(_f32(q)[0])
    assert bool(jnp.all(jnp.isfinite(g)))


@pytest.mark.parametrize("impl", IMPLS)
def test_fully_masked_rows_give_zeros_and_zero_gradients(impl, rng):
    q, k, v = _f32(rng.normal(size=(2, 10, 2, 8)), rng.normal(size=(2, 12, 2, 8)),
                   rng.normal(size=(2, 12, 2, 8)))
    mask = np.ones((2, 2, 10, 12), bool)
    mask[0, 1, 3] = False  # one (batch, head, query) row sees nothing
    seg_q = np.zeros((2, 10), np.int32)
    seg_q[1, 7] = 5  # a query whose segment has no keys
    kw = dict(mask=jnp.asarray(mask), query_seq_lengths=jnp.array([10, 8], jnp.int32),
              segment_ids=(seg_q, np.zeros((2, 12), np.int32)), implementation=impl,
              block_sizes=SMALL)

    @jax.jit
    def f(q, k, v):
        return jaxla.dot_product_attention(q, k, v, return_residual=True, **kw)

    out, lse = f(q, k, v)
    empty = [(0, 3, 1), (1, 7, 0), (1, 7, 1), (1, 8, 0), (1, 9, 1)]
    for b, t, n in empty:
        assert np.all(np.asarray(out[b, t, n]) == 0) and float(lse[b, t, n]) == EMPTY_ROW_LSE
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a)[0] ** 2), argnums=(0, 1, 2)))(q, k, v)
    for g in grads:
        assert bool(jnp.all(jnp.isfinite(g)))
    for b, t, n in empty:
        assert np.all(np.asarray(grads[0][b, t, n]) == 0)
    # Nothing visible anywhere: all zeros, all gradients zero.
    none = jnp.zeros((2, 1, 10, 12), bool)
    g = jax.jit(jax.grad(lambda q: jnp.sum(jaxla.dot_product_attention(
        q, k, v, mask=none, implementation=impl, block_sizes=SMALL))))(q)
    assert np.all(np.asarray(g) == 0)


def test_chunked_composes_with_jit_vmap_grad_checkpoint(rng):
    q, k, v = _f32(rng.normal(size=(3, 2, 20, 2, 8)), rng.normal(size=(3, 2, 20, 2, 8)),
                   rng.normal(size=(3, 2, 20, 2, 8)))

    def loss(impl, q, k, v):
        out = jaxla.dot_product_attention(q, k, v, is_causal=True, implementation=impl,
                                          block_sizes=SMALL)
        return jnp.sum(jnp.sin(out))

    def batched(impl):
        inner = jax.checkpoint(functools.partial(loss, impl))
        return jax.jit(jax.vmap(jax.grad(inner, argnums=(0, 1, 2))))

    for a, b in zip(batched("chunked")(q, k, v), batched("xla")(q, k, v), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_residual_is_differentiable(rng, x64):
    q, k, v = (jnp.asarray(rng.normal(size=(1, 6, 2, 4))) for _ in range(3))
    for impl in IMPLS:
        f = jax.jit(lambda q, k, impl=impl: jaxla.dot_product_attention(
            q, k, v, is_causal=True, implementation=impl, return_residual=True,
            block_sizes=jaxla.ChunkedBlockSizes(2, 4))[1])
        check_grads(f, (q, k), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_attention_weights_are_the_probabilities(rng):
    q, k, v = _f32(rng.normal(size=(2, 9, 4, 8)), rng.normal(size=(2, 11, 2, 8)),
                   rng.normal(size=(2, 11, 2, 8)))
    kw = dict(is_causal=True, key_value_seq_lengths=jnp.array([11, 4], jnp.int32))
    w = jax.jit(lambda q, k: jaxla.attention_weights(q, k, **kw))(q, k)
    assert w.shape == (2, 4, 9, 11) and w.dtype == jnp.float32
    np.testing.assert_allclose(jnp.sum(w, -1), 1.0, atol=1e-6)
    out = jnp.einsum("bkgts,bskh->btkgh", w.reshape(2, 2, 2, 9, 11), v).reshape(2, 9, 4, 8)
    np.testing.assert_allclose(out, _dpa(q, k, v, **kw), atol=1e-5)
    assert float(w[0, 0, 2, 3]) == 0.0  # causal
    assert jaxla.attention_weights(q[0], k[0]).shape == (4, 9, 11)


def test_implementation_none_dispatch(rng):
    small = _f32(rng.normal(size=(1, 8, 2, 4)), rng.normal(size=(1, 8, 2, 4)))
    assert _api._choose(None, _args(*small), None)[0] == "xla"
    long_q = _f32(rng.normal(size=(1, 300, 2, 4)), rng.normal(size=(1, 300, 2, 4)))
    assert _api._choose(None, _args(*long_q), None)[0] == "chunked"
    mid = _f32(rng.normal(size=(1, 127, 2, 4)), rng.normal(size=(1, 128, 2, 4)))
    assert _api._choose(None, _args(*mid), None)[0] == "xla"
    assert _api._choose("xla", _args(*long_q), None)[0] == "xla"
    q, k = long_q
    np.testing.assert_allclose(_dpa(q, k, k), _dpa(q, k, k, implementation="xla"), atol=1e-5)


def _args(q, k):
    return dict(query=q, key=k, value=k, bias=None, mask=None, softcap=None, window=None,
                is_causal=False)


def test_pallas_unavailable_is_a_clear_error_and_none_falls_back(rng):
    q = jnp.asarray(rng.normal(size=(1, 4, 1, 8)), jnp.float32)
    try:
        importlib.import_module("jaxla.attention._pallas")
    except ImportError:
        with pytest.raises(ValueError, match="Pallas kernel is unavailable"):
            jaxla.dot_product_attention(q, q, q, implementation="pallas")
    else:
        pytest.skip("the Pallas kernel is installed in this tree; its own tests cover it")


def test_classify_blocks_matches_brute_force(rng):
    for _ in range(30):
        t, s = int(rng.integers(1, 40)), int(rng.integers(1, 40))
        bq, bk = int(rng.integers(1, 9)), int(rng.integers(1, 9))
        left = None if rng.random() < 0.4 else int(rng.integers(0, 12))
        right = None if rng.random() < 0.4 else int(rng.integers(0, 12))
        band = _masks.Band(left, right)
        nq, nk = -(-t // bq), -(-s // bk)
        full, partial = _masks.classify_blocks(nq, nk, bq, bk, t=t, s=s, band=band)
        diff = np.arange(nk * bk)[None, :] - np.arange(nq * bq)[:, None]
        vis = (np.arange(nk * bk) < s)[None, :] & (diff >= -(left if left is not None else 10**9))
        vis &= diff <= (right if right is not None else 10**9)
        for i in range(nq):
            for j in range(nk):
                blk = vis[i * bq: min((i + 1) * bq, t), j * bk:(j + 1) * bk]
                expect = "skip" if not blk.any() else ("full" if blk.all() else "partial")
                got = "full" if (i, j) in full else ("partial" if (i, j) in partial else "skip")
                assert got == expect, (t, s, bq, bk, band, i, j)


def test_block_sizes_validation_and_split():
    with pytest.raises(ValueError, match="block_q"):
        jaxla.ChunkedBlockSizes(0, 8)
    assert jaxla.ChunkedBlockSizes.default("cpu") == jaxla.ChunkedBlockSizes(256, 512)
    from jaxla.attention._chunked import split_length

    assert split_length(7, 256) == 7
    assert split_length(257, 256) == 136  # two equal blocks rather than 256 + 1


# ---- bad input ------------------------------------------------------------------------------------

_Q = np.zeros((2, 5, 4, 8), np.float32)
_K = np.zeros((2, 6, 2, 8), np.float32)

BAD = [
    (dict(key=np.zeros((2, 6, 2, 4), np.float32)), ValueError, "head dim H"),
    (dict(key=np.zeros((2, 6, 3, 8), np.float32), value=np.zeros((2, 6, 3, 8), np.float32)),
     ValueError, "multiple of the kv heads"),
    (dict(value=np.zeros((2, 7, 2, 8), np.float32)), ValueError, "same S and K"),
    (dict(key=np.zeros((3, 6, 2, 8), np.float32)), ValueError, "batch size"),
    (dict(query=np.zeros((5, 4, 8, 1, 1), np.float32)), ValueError, "query must have rank 3 or 4"),
    (dict(query=np.zeros((2, 5, 4, 8), np.int32)), TypeError, "query must have a floating"),
    (dict(mask=np.ones((2, 4, 5, 6), np.float32)), TypeError, "mask must be boolean"),
    (dict(mask=np.ones((2, 4, 5, 7), bool)), ValueError, r"mask with shape \(2, 4, 5, 7\)"),
    (dict(bias=np.ones((3, 1, 5, 6), np.float32)), ValueError, r"bias with shape \(3, 1, 5, 6\)"),
    (dict(bias=np.ones((1, 2, 3, 5, 6), np.float32)), ValueError, "bias must have rank <= 4"),
    (dict(query_seq_lengths=np.array([1, 2, 3], np.int32)), ValueError,
     r"query_seq_lengths must have shape \(B,\) = \(2,\)"),
    (dict(key_value_seq_lengths=np.array([1.0, 2.0], np.float32)), TypeError,
     "key_value_seq_lengths must have an integer"),
    (dict(local_window_size=(-1, 2)), ValueError, "local_window_size sizes must be >= 0"),
    (dict(local_window_size=(1, 2, 3)), TypeError, "local_window_size must be an int or a pair"),
    (dict(segment_ids=np.zeros((2, 5), np.int32)), ValueError, "single segment_ids array needs T == S"),
    (dict(segment_ids=(np.zeros((2, 5), np.int32), np.zeros((2, 5), np.int32))), ValueError,
     r"key segment_ids must have shape \(2, 6\)"),
    (dict(segment_ids=(np.zeros((2, 5), np.float32), np.zeros((2, 6), np.int32))), TypeError,
     "query segment_ids must have an integer"),
    (dict(implementation="cudnn"), ValueError, "implementation must be one of"),
    (dict(logits_soft_cap=-1.0), ValueError, "logits_soft_cap must be > 0"),
    (dict(scale="big"), TypeError, "scale must be a static Python number"),
    (dict(block_sizes=(8, 8)), TypeError, "block_sizes must be a ChunkedBlockSizes"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_input_gives_clear_error(case):
    kw, exc, pattern = BAD[case]
    kw = dict(kw)
    args = dict(query=_Q, key=_K, value=kw.pop("value", None))
    args.update({n: kw.pop(n) for n in ("query", "key") if n in kw})
    if args["value"] is None:
        args["value"] = args["key"]
    with pytest.raises(exc, match=pattern):
        jaxla.dot_product_attention(args["query"], args["key"], args["value"], **kw)


def test_traced_scale_is_rejected():
    with pytest.raises(TypeError, match="scale must be a static Python number"):
        jax.jit(lambda s: jaxla.dot_product_attention(_Q, _K, _K, scale=s))(1.0)
