"""Every attention backend against the same float64 NumPy reference, over the same cases.

Each test runs once per name in ``jaxla.attention.IMPLEMENTATIONS`` ("pallas" in interpret mode where
there is no GPU/TPU). A backend that cannot run a case is skipped for it with the reason its own
``unsupported_reason`` gives, never by a hand-written list. Checked: output, logsumexp (including
``EMPTY_ROW_LSE``), gradients of q, k, v and bias for output and logsumexp cotangents, rows that see
no key, odd lengths, non-finite inputs, empty shapes, bfloat16 and huge logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxla
from jaxla.attention import (
    EMPTY_ROW_LSE,
    IMPLEMENTATIONS,
    ChunkedBlockSizes,
    PallasBlockSizes,
    _api,
    pallas_attention,
)
from jaxla.attention._args import canonical_args
from tests.attention_cases import FOCUSES, draw_case, np_attention

PLATFORM = jax.default_backend()
# Pallas has no compiled kernel on CPU: there it runs its exact kernel bodies in interpret mode.
INTERPRET = PLATFORM not in ("gpu", "cuda", "rocm", "tpu")
# Small tiles, so that short sequences already span several blocks, partial blocks and skips.
TILES = {
    "chunked": ChunkedBlockSizes(block_q=8, block_k=16),
    "cpu": ChunkedBlockSizes(block_q=3, block_k=16),
    "pallas": PallasBlockSizes(16, 16, 16, 32, 32, 16),
}


def unsupported_reason(name, args):
    """The backend's own reason for declining ``args`` here (None when it runs them)."""
    module, reason = _api._load(name)
    if reason is not None:
        return reason
    if name == "pallas" and INTERPRET:
        return module.unsupported_reason(args, platform=PLATFORM, interpret=True)
    return module.unsupported_reason(args, platform=PLATFORM)


def attention(name, q, k, v, bias=None, mask=None, *, tiles=True, **kw):
    """(out, lse) of backend ``name`` through its public entry point."""
    sizes = TILES.get(name) if tiles else None
    if name == "pallas" and INTERPRET:
        assert bias is None and mask is None
        return pallas_attention(q, k, v, return_residual=True, interpret=True, block_sizes=sizes,
                                **kw)
    return jaxla.dot_product_attention(q, k, v, bias, mask, implementation=name,
                                       return_residual=True, block_sizes=sizes, **kw)


def skip_unless_supported(name, q, k, v, bias=None, mask=None, **kw):
    reason = unsupported_reason(name, canonical_args(q, k, v, bias, mask, **kw))
    if reason is not None:
        pytest.skip(f"{name} declines: {reason}")


def _f32(x):
    return None if x is None else jnp.asarray(x, bool if x.dtype == bool else jnp.float32)


def _fwd_bwd(name, mask, kw, tiles=True):
    """jit of (q, k, v, bias, d_out, d_lse) → (out, lse, (dq, dk, dv, dbias)): one compile."""

    def f(q, k, v, bias, d_out, d_lse):
        (out, lse), vjp = jax.vjp(
            lambda q, k, v, bias: attention(name, q, k, v, bias, mask, tiles=tiles, **kw),
            q, k, v, bias,
        )
        return out, lse, vjp((d_out.astype(out.dtype), d_lse))

    return jax.jit(f)


def _assert_matches(got, ref, *, msg, tol=2e-5, grad_tol=1e-4):
    out, lse, grads = got
    np.testing.assert_allclose(np.asarray(out), ref.out, atol=tol, rtol=tol, err_msg=f"out {msg}")
    empty = ref.lse == EMPTY_ROW_LSE
    np.testing.assert_array_equal(np.asarray(lse) == EMPTY_ROW_LSE, empty, err_msg=f"lse {msg}")
    np.testing.assert_allclose(np.asarray(lse)[~empty], ref.lse[~empty], atol=tol, rtol=tol,
                               err_msg=f"lse {msg}")
    for gname, g, r in zip(("dq", "dk", "dv", "dbias"), grads, ref[2:], strict=True):
        if r is None:
            assert g is None, gname
            continue
        g = np.asarray(g, np.float64)
        assert g.shape == r.shape and np.all(np.isfinite(g)), f"{gname} {msg}"
        scale = max(1.0, float(np.abs(r).max()))
        np.testing.assert_allclose(g / scale, r / scale, atol=grad_tol, rtol=grad_tol,
                                   err_msg=f"{gname} {msg}")


@pytest.mark.parametrize("seed", range(2 * len(FOCUSES)))
@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_random_feature_combinations(name, seed):
    """Seed i forces the feature group FOCUSES[i % 4] on and samples the rest."""
    rng = np.random.default_rng(seed)
    case = draw_case(rng, focus=FOCUSES[seed % len(FOCUSES)])
    q, k, v, bias, mask = (_f32(x) for x in case.arrays)
    skip_unless_supported(name, q, k, v, bias, mask, **case.kwargs)
    d_out = rng.normal(size=(*q.shape[:-1], v.shape[-1]))
    d_lse = rng.normal(size=q.shape[:-1])
    ref = np_attention(*case.arrays, **case.ref, d_out=d_out, d_lse=d_lse)
    got = _fwd_bwd(name, mask, case.kwargs)(q, k, v, bias, _f32(d_out), _f32(d_lse))
    _assert_matches(got, ref, msg=f"{name} {case.shape} {case.kwargs}")


@pytest.mark.parametrize("t,s,causal", [(1, 257, True), (257, 100, False)])
@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_odd_lengths_window_gqa_default_tiles(name, t, s, causal):
    rng = np.random.default_rng(t + s)
    arrays = (rng.normal(size=(1, t, 4, 64)), rng.normal(size=(1, s, 2, 64)),
              rng.normal(size=(1, s, 2, 128)))
    kv_len = np.array([s - 3], np.int32)
    kw = dict(is_causal=causal, local_window_size=(40, 3), key_value_seq_lengths=kv_len)
    q, k, v = (_f32(x) for x in arrays)
    skip_unless_supported(name, q, k, v, **kw)
    d_out, d_lse = rng.normal(size=(1, t, 4, 128)), rng.normal(size=(1, t, 4))
    ref = np_attention(*arrays, causal=causal, window=(40, 3), kv_len=kv_len, d_out=d_out,
                       d_lse=d_lse)
    got = _fwd_bwd(name, None, kw, tiles=False)(q, k, v, None, _f32(d_out), _f32(d_lse))
    _assert_matches(got, ref, msg=f"{name} T={t} S={s} causal={causal}")


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_rows_that_see_no_key_give_zeros_empty_lse_and_zero_gradients(name):
    rng = np.random.default_rng(7)
    q, k, v = (_f32(rng.normal(size=sh)) for sh in ((2, 10, 2, 64), (2, 12, 2, 64), (2, 12, 2, 64)))
    seg_q = np.zeros((2, 10), np.int32)
    seg_q[1, 7] = 5  # a query whose segment has no keys
    kw = dict(query_seq_lengths=np.array([10, 8], np.int32),
              segment_ids=(seg_q, np.zeros((2, 12), np.int32)))
    skip_unless_supported(name, q, k, v, **kw)
    d_out, d_lse = _f32(rng.normal(size=(2, 10, 2, 64))), _f32(rng.normal(size=(2, 10, 2)))
    out, lse, (dq, dk, dv, _) = _fwd_bwd(name, None, kw)(q, k, v, None, d_out, d_lse)
    empty = [(1, 7), (1, 8), (1, 9)]
    for b, t in empty:
        assert np.all(np.asarray(out[b, t]) == 0), (b, t)
        assert np.all(np.asarray(lse[b, t]) == EMPTY_ROW_LSE), (b, t)
        assert np.all(np.asarray(dq[b, t]) == 0), (b, t)
    assert np.all(np.asarray(lse[0]) > -1e30)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in (dq, dk, dv))
    # Nothing visible anywhere: all zeros, all gradients zero.
    none = dict(key_value_seq_lengths=np.zeros((2,), np.int32))
    out, lse, grads = _fwd_bwd(name, None, none)(q, k, v, None, d_out, d_lse)
    assert np.all(np.asarray(out) == 0) and np.all(np.asarray(lse) == EMPTY_ROW_LSE)
    assert all(np.all(np.asarray(g) == 0) for g in grads[:3])


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_nan_and_inf_inputs_propagate_to_the_rows_that_see_them(name):
    rng = np.random.default_rng(3)
    base = [rng.normal(size=sh).astype(np.float32)
            for sh in ((1, 20, 2, 64), (1, 20, 2, 64), (1, 20, 2, 64))]
    skip_unless_supported(name, *base)
    def f(q, k, v):
        (out, lse), vjp = jax.vjp(lambda q: attention(name, q, k, v, tiles=False), q)
        return out, lse, vjp((jnp.ones_like(out), jnp.zeros_like(lse)))[0]

    f = jax.jit(f)
    # Query head 1 reads kv head 1; the bad entry is feature 3 of position 5 (query, key or value).
    for which, bad in [(w, x) for w in range(3) for x in (np.nan, np.inf)]:
        arrays = [x.copy() for x in base]
        arrays[which][0, 5, 1, 3] = bad
        out, lse, dq = (np.asarray(x) for x in f(*arrays))
        bad_out = np.zeros(out.shape, bool)
        if which == 0:  # that query row
            bad_out[0, 5, 1] = True
        elif which == 1:  # every row whose logit for key 5 is NaN or +inf (a -inf logit is a 0 weight)
            bad_out[0, :, 1] = (base[0][0, :, 1, 3] * bad > 0)[:, None] | np.isnan(bad)
        else:  # feature 3 of every row that sees key 5
            bad_out[0, :, 1, 3] = True
        what = f"{name}: {bad} in {'qkv'[which]}"
        np.testing.assert_array_equal(~np.isfinite(out), bad_out, err_msg=what)
        np.testing.assert_array_equal(~np.isfinite(lse), bad_out.all(-1), err_msg=what)
        if which == 0:  # and the backward pass does not hide it either
            np.testing.assert_array_equal(~np.isfinite(dq).all(-1), bad_out.all(-1), err_msg=what)


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_empty_sequences(name):
    rng = np.random.default_rng(0)
    q, k = _f32(rng.normal(size=(2, 3, 4, 64))), _f32(rng.normal(size=(2, 5, 2, 64)))
    skip_unless_supported(name, q, k, k)

    def loss(q, k, v):
        out, lse = attention(name, q, k, v)
        return jnp.sum(out**2) + jnp.sum(jnp.where(lse > -1e30, lse, 0.0)), (out, lse)

    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    # T = 0: empty results.
    (_, (out, lse)), grads = f(q[:, :0], k, k)
    assert out.shape == (2, 0, 4, 64) and lse.shape == (2, 0, 4)
    assert [g.shape for g in grads] == [(2, 0, 4, 64), (2, 5, 2, 64), (2, 5, 2, 64)]
    assert all(np.all(np.asarray(g) == 0) for g in grads)
    # S = 0: every row sees no key.
    (_, (out, lse)), grads = f(q, k[:, :0], k[:, :0])
    assert out.shape == (2, 3, 4, 64) and out.dtype == jnp.float32
    assert np.all(np.asarray(out) == 0) and np.all(np.asarray(lse) == EMPTY_ROW_LSE)
    assert [g.shape for g in grads] == [(2, 3, 4, 64), (2, 0, 2, 64), (2, 0, 2, 64)]
    assert np.all(np.asarray(grads[0]) == 0)


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_bfloat16_inputs_within_bf16_tolerance(name):
    rng = np.random.default_rng(1)
    arrays = [rng.normal(size=sh) for sh in ((2, 40, 4, 64), (2, 40, 2, 64), (2, 40, 2, 64))]
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in arrays)
    skip_unless_supported(name, q, k, v, is_causal=True)
    ref = np_attention(*(np.asarray(x.astype(jnp.float32)) for x in (q, k, v)), causal=True)
    out, lse = jax.jit(lambda q, k, v: attention(name, q, k, v, is_causal=True))(q, k, v)
    assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), ref.out, atol=3e-2, rtol=3e-2)
    np.testing.assert_allclose(np.asarray(lse), ref.lse, atol=3e-2, rtol=1e-2)
    g = jax.jit(jax.grad(lambda q: jnp.sum(
        attention(name, q, k, v, is_causal=True)[0].astype(jnp.float32))))(q)
    assert g.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(g.astype(jnp.float32))))


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_huge_logits_stay_finite_and_exact(name):
    rng = np.random.default_rng(2)
    q = rng.normal(size=(1, 20, 2, 64)) * 1e4 / np.sqrt(64)
    k, v = rng.normal(size=(1, 20, 2, 64)), rng.normal(size=(1, 20, 2, 64))
    skip_unless_supported(name, *(_f32(x) for x in (q, k, v)), is_causal=True)
    ref = np_attention(q, k, v, causal=True)
    assert np.abs(ref.lse).max() > 1e3
    out, lse = jax.jit(lambda q, k, v: attention(name, q, k, v, is_causal=True))(
        *(_f32(x) for x in (q, k, v)))
    np.testing.assert_allclose(out, ref.out, atol=1e-4)
    np.testing.assert_allclose(lse, ref.lse, rtol=1e-5)
    g = jax.jit(jax.grad(lambda q: jnp.sum(attention(name, q, *(_f32(x) for x in (k, v)),
                                                     is_causal=True)[0])))(_f32(q))
    assert bool(jnp.all(jnp.isfinite(g)))
