"""Tests of the public attention API: dispatch, jax.nn parity, autodiff composition, weights, bad input.

What every backend must agree on (values, logsumexp, gradients, empty rows, odd lengths, non-finite
inputs, empty shapes) is in test_attention_conformance.py.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxla
import jaxla.attention
from jaxla.attention import EMPTY_ROW_LSE, _masks
from tests.attention_cases import draw_case, np_attention

IMPLS = ("xla", "chunked")
# Small tiles so that a handful of positions already spans several blocks, partial blocks and skips.
SMALL = jaxla.ChunkedBlockSizes(block_q=8, block_k=16)


def _dpa(*arrays, **kw):
    """jaxla.dot_product_attention under jit (eager dispatch of the many small ops is slow)."""
    return jax.jit(lambda *a: jaxla.dot_product_attention(*a, **kw))(*arrays)


def _f32(*xs):
    return [None if x is None else jnp.asarray(x, jnp.float32 if x.dtype != bool else bool)
            for x in xs]


@pytest.mark.parametrize("impl,seed", [("xla", 0), ("chunked", 1)])
def test_gradients_check_grads_float64(impl, seed, x64):
    rng = np.random.default_rng(100 + seed)
    (q, k, v, bias, mask), kw, _ = draw_case(rng, lengths=(1, 7, 9), head_dims=((8, 8), (8, 4)))
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
    ref_lse = np_attention(q, k, v, bias, mask, scale=kw.get("scale"),
                           causal=kw.get("is_causal", False), window=kw.get("local_window_size"),
                           q_len=kw.get("query_seq_lengths"),
                           kv_len=kw.get("key_value_seq_lengths")).lse
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
    assert jaxla.attention_weights(q[:, :0], k).shape == (2, 4, 0, 11)
    assert jaxla.attention_weights(q, k[:, :0]).shape == (2, 4, 9, 0)


def test_implementation_none_dispatch_and_select_implementation(rng, caplog):
    small = _f32(rng.normal(size=(1, 8, 2, 4)), rng.normal(size=(1, 8, 2, 4)))
    select = jaxla.attention.select_implementation
    # Head dim 4 is not a multiple of 8, so the compiled CPU kernel declines and plain JAX runs.
    with caplog.at_level("DEBUG", logger="jaxla.attention"):
        assert select(*small, small[1]) == "xla"
    if jax.default_backend() == "cpu":
        assert "not using 'cpu'" in caplog.text and "multiples of 8" in caplog.text
    long_q = _f32(rng.normal(size=(1, 300, 2, 4)), rng.normal(size=(1, 300, 2, 4)))
    assert select(*long_q, long_q[1]) == "chunked"
    mid = _f32(rng.normal(size=(1, 127, 2, 4)), rng.normal(size=(1, 128, 2, 4)))
    assert select(*mid, mid[1]) == "xla"
    assert select(*long_q, long_q[1], implementation="xla") == "xla"
    shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in long_q]
    assert select(*shapes, shapes[1], key_value_seq_lengths=jnp.array([3], jnp.int32)) == "chunked"
    # The same checks as dot_product_attention: bad arguments are errors, not a name.
    with pytest.raises(ValueError, match="implementation must be one of"):
        select(*small, small[1], implementation="cudnn")
    with pytest.raises(ValueError, match="logits_soft_cap must be > 0"):
        select(*small, small[1], logits_soft_cap=-1.0)
    q, k = long_q
    np.testing.assert_allclose(_dpa(q, k, k), _dpa(q, k, k, implementation="xla"), atol=1e-5)


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
    (dict(scale=float("nan")), ValueError, "scale must be a finite number, got nan"),
    (dict(scale=float("-inf")), ValueError, "scale must be a finite number, got -inf"),
    (dict(logits_soft_cap=float("nan")), ValueError, "logits_soft_cap must be a finite number"),
    (dict(logits_soft_cap=float("inf")), ValueError, "logits_soft_cap must be a finite number"),
    (dict(key=np.zeros((2, 6, 0, 8), np.float32), value=np.zeros((2, 6, 0, 8), np.float32)),
     ValueError, r"at least one kv head \(K >= 1\)"),
    (dict(query=np.zeros((2, 5, 4, 0), np.float32), key=np.zeros((2, 6, 2, 0), np.float32)),
     ValueError, "head dims H and Hv must be >= 1"),
    (dict(is_causal="yes"), TypeError, "is_causal must be a static Python bool"),
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


def test_attention_namespace_exports_documented_names():
    for name in jaxla.attention.__all__:
        obj = getattr(jaxla.attention, name)
        if callable(obj):
            assert obj.__doc__ and len(obj.__doc__) > 40, name


def test_traced_scale_is_rejected():
    with pytest.raises(TypeError, match="scale must be a static Python number"):
        jax.jit(lambda s: jaxla.dot_product_attention(_Q, _K, _K, scale=s))(1.0)
