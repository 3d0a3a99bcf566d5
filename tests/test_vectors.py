"""Vectors against float64 NumPy references, under jit/vmap/grad, and on bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxla


def np_cos(a, b, eps=1e-8):
    na = np.maximum(np.linalg.norm(a, axis=-1), eps)
    nb = np.maximum(np.linalg.norm(b, axis=-1), eps)
    return np.sum(a * b, axis=-1) / (na * nb)


def test_dot_and_cosine_match_numpy(rng):
    a = rng.standard_normal((5, 3, 768))
    b = rng.standard_normal((5, 3, 768))
    got = jaxla.dot(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    np.testing.assert_allclose(got, np.sum(a * b, -1), rtol=1e-5, atol=1e-3)
    cos = jaxla.cosine_similarity(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    np.testing.assert_allclose(cos, np_cos(a, b), rtol=1e-5, atol=1e-6)


def test_leading_dims_broadcast(rng):
    a = rng.standard_normal((4, 2, 16))
    b = rng.standard_normal((16,))
    got = jaxla.cosine_similarity(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    assert got.shape == (4, 2)
    np.testing.assert_allclose(got, np_cos(a, np.broadcast_to(b, a.shape)), atol=1e-6)


def test_axis_argument(rng):
    a = rng.standard_normal((16, 3))
    b = rng.standard_normal((16, 3))
    got = jaxla.dot(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), axis=0)
    np.testing.assert_allclose(got, np.sum(a * b, 0), rtol=1e-5, atol=1e-5)


def test_zero_vector_cosine_is_zero_with_finite_grads():
    z = jnp.zeros((8,), jnp.float32)
    v = jnp.arange(1.0, 9.0, dtype=jnp.float32)
    assert float(jaxla.cosine_similarity(z, v)) == 0.0
    assert float(jaxla.cosine_similarity(z, z)) == 0.0
    ga, gb = jax.grad(lambda a, b: jaxla.cosine_similarity(a, b), argnums=(0, 1))(z, v)
    assert np.all(np.isfinite(ga)) and np.all(np.isfinite(gb))
    assert np.all(np.isfinite(jax.grad(lambda a: jaxla.normalize(a).sum())(z)))
    assert np.all(np.asarray(jaxla.normalize(z)) == 0)
    assert np.all(np.asarray(jaxla.project(v, z)) == 0)


def test_normalize_and_project(rng):
    u = rng.standard_normal((3, 32))
    v = rng.standard_normal((3, 32))
    n = jaxla.normalize(jnp.asarray(u, jnp.float32))
    np.testing.assert_allclose(n, u / np.linalg.norm(u, axis=-1, keepdims=True), rtol=1e-5, atol=1e-6)
    p = jaxla.project(jnp.asarray(u, jnp.float32), jnp.asarray(v, jnp.float32))
    expect = (np.sum(u * v, -1, keepdims=True) / np.sum(v * v, -1, keepdims=True)) * v
    np.testing.assert_allclose(p, expect, rtol=1e-4, atol=1e-5)
    # The residual is orthogonal to the direction projected onto.
    resid = np.asarray(jnp.asarray(u, jnp.float32) - p, np.float64)
    np.testing.assert_allclose(np.sum(resid * v, -1), 0.0, atol=1e-4)


def test_pairwise_cosine_and_top_k(rng):
    x = rng.standard_normal((2, 6, 24))
    y = rng.standard_normal((2, 40, 24))
    got = jaxla.pairwise_cosine(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
    xn = x / np.linalg.norm(x, axis=-1, keepdims=True)
    yn = y / np.linalg.norm(y, axis=-1, keepdims=True)
    ref = np.einsum("bnd,bmd->bnm", xn, yn)
    np.testing.assert_allclose(got, ref, atol=1e-6)
    scores, idx = jaxla.top_k_similar(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), 5)
    assert scores.shape == idx.shape == (2, 6, 5) and idx.dtype == jnp.int32
    np.testing.assert_array_equal(idx, np.argsort(-ref, axis=-1, kind="stable")[..., :5])
    np.testing.assert_allclose(scores, np.sort(ref, axis=-1)[..., ::-1][..., :5], atol=1e-6)


def test_top_k_single_query_and_dot_metric(rng):
    keys = rng.standard_normal((50, 16))
    q = keys[17] * 3.0
    s, i = jaxla.top_k_similar(jnp.asarray(q, jnp.float32), jnp.asarray(keys, jnp.float32), 1)
    assert s.shape == (1,) and int(i[0]) == 17
    s, i = jaxla.top_k_similar(jnp.asarray(q, jnp.float32), jnp.asarray(keys, jnp.float32), 3,
                               metric="dot")
    np.testing.assert_array_equal(i, np.argsort(-(keys @ q))[:3])


def test_bf16_accumulates_in_f32(rng):
    a = rng.standard_normal((4096,))
    b = rng.standard_normal((4096,))
    a16, b16 = jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)
    got = jaxla.dot(a16, b16)
    assert got.dtype == jnp.bfloat16
    exact = np.sum(np.asarray(a16, np.float64) * np.asarray(b16, np.float64))
    # One bf16 rounding of the f32-accumulated sum: relative error within 2^-8.
    assert abs(float(got) - exact) <= 2**-8 * abs(exact) + 1e-2


def test_jit_vmap_grad(rng):
    a = jnp.asarray(rng.standard_normal((7, 16)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((7, 16)), jnp.float32)
    direct = jaxla.cosine_similarity(a, b)
    np.testing.assert_allclose(jax.jit(jaxla.cosine_similarity)(a, b), direct, rtol=1e-6)
    np.testing.assert_allclose(jax.vmap(jaxla.cosine_similarity)(a, b), direct, rtol=1e-6)
    vm = jax.vmap(lambda q: jaxla.top_k_similar(q, b, 2)[1])(a)
    np.testing.assert_array_equal(vm, jaxla.top_k_similar(a, b, 2)[1])
    g = jax.jit(jax.grad(lambda x: jaxla.pairwise_cosine(x, b).sum()))(a)
    assert g.shape == a.shape and np.all(np.isfinite(g))


@pytest.mark.usefixtures("x64")
def test_check_grads_float64(rng):
    a = jnp.asarray(rng.standard_normal((3, 5)))
    b = jnp.asarray(rng.standard_normal((3, 5)))
    assert a.dtype == jnp.float64
    check_grads(jax.jit(lambda a, b: jaxla.cosine_similarity(a, b)), (a, b), order=2, modes=("fwd", "rev"))
    check_grads(jax.jit(lambda a, b: jaxla.project(a, b)), (a, b), order=1, modes=("rev",))
    check_grads(jax.jit(lambda a: jaxla.normalize(a)), (a,), order=1, modes=("rev",))
    check_grads(jax.jit(lambda a, b: jaxla.pairwise_cosine(a, b)), (a, b), order=1, modes=("rev",))
    check_grads(jax.jit(lambda a, b: jaxla.dot(a, b)), (a, b), order=1, modes=("rev",))


def test_bad_input():
    f = jnp.ones((3, 8), jnp.float32)
    with pytest.raises(TypeError, match="a must have a floating dtype"):
        jaxla.cosine_similarity(jnp.ones((3, 8), jnp.int32), f)
    with pytest.raises(ValueError, match="same vector dimension"):
        jaxla.dot(f, jnp.ones((3, 7), jnp.float32))
    with pytest.raises(ValueError, match="do not broadcast"):
        jaxla.dot(f, jnp.ones((4, 8), jnp.float32))
    with pytest.raises(ValueError, match=r"rank >= 1"):
        jaxla.normalize(jnp.float32(1.0))
    with pytest.raises(ValueError, match=r"k=5 is larger than the number of keys M=4"):
        jaxla.top_k_similar(f, jnp.ones((4, 8), jnp.float32), 5)
    with pytest.raises(ValueError, match="k must be > 0"):
        jaxla.top_k_similar(f, jnp.ones((4, 8), jnp.float32), 0)
    with pytest.raises(ValueError, match="metric"):
        jaxla.top_k_similar(f, jnp.ones((4, 8), jnp.float32), 1, metric="l2")
    with pytest.raises(ValueError, match=r"y must have rank >= 2"):
        jaxla.pairwise_cosine(f, jnp.ones((8,), jnp.float32))
