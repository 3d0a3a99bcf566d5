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


def test_project_of_tiny_vectors_inside_the_callers_jit():
    """XLA rewrites eps / s / s into eps / (s · s): for s = 2^-100 that was 0 / 0 = NaN under jit."""
    base_a, base_b = np.array([1.0, 2.0, -1.0, 3.0]), np.array([2.0, -1.0, 0.5, 1.0])
    a, b = (jnp.asarray(v * 1e-30, jnp.float32) for v in (base_a, base_b))
    want = base_a @ base_b / (base_b @ base_b) * base_b
    got = jax.jit(lambda a, b: jaxla.project(a, b, eps=1e-80))(a, b)
    np.testing.assert_allclose(np.asarray(got, np.float64) / 1e-30, want, rtol=1e-6)


def test_huge_and_tiny_vectors_do_not_overflow(x64):
    """1e30² overflows float32: norms are taken of x / 2^k, so cosines stay exact (issue 16)."""
    base_a = np.array([1.0, 2.0, -1.0, 3.0])
    base_b = np.array([2.0, -1.0, 0.5, 1.0])
    want = np_cos(base_a, base_b)
    # Below eps a vector counts as zero; with eps lowered, 1e-30 (whose squares underflow float32)
    # works like any other scale.
    for scale, eps in ((1e30, 1e-8), (1.0, 1e-8), (1e-30, 1e-40)):
        a = jnp.asarray(base_a * scale, jnp.float32)
        b = jnp.asarray(base_b * scale, jnp.float32)
        np.testing.assert_allclose(jaxla.cosine_similarity(a, b, eps=eps), want, rtol=1e-6)
        np.testing.assert_allclose(jaxla.pairwise_cosine(a[None], b[None], eps=eps)[0, 0], want,
                                   rtol=1e-6)
        np.testing.assert_allclose(jaxla.normalize(a, eps=eps), base_a / np.linalg.norm(base_a),
                                   rtol=1e-6)
        proj = base_a @ base_b / (base_b @ base_b) * base_b
        np.testing.assert_allclose(np.asarray(jaxla.project(a, b, eps=eps * eps), np.float64) / scale, proj,
                                   rtol=1e-6)
        scores, idx = jaxla.top_k_similar(a[None], jnp.stack([b, a]), 2, eps=eps)
        np.testing.assert_array_equal(idx, [[1, 0]])
        np.testing.assert_allclose(scores, [[1.0, want]], rtol=1e-6)
    # Gradients of the rescaled form equal the analytic gradient of the cosine.
    a, b = base_a * 1e30, base_b * 1e30
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    want_grad = b / (na * nb) - (a @ b) * a / (na**3 * nb)
    got = jax.grad(jaxla.cosine_similarity)(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    np.testing.assert_allclose(got, want_grad, rtol=1e-5)
    # The rescaling is by a power of two, so float64 results are the plain formula's to rounding.
    check_grads(lambda a, b: jaxla.cosine_similarity(a, b), (jnp.asarray(base_a * 1e200),
                jnp.asarray(base_b * 1e200)), order=1, modes=("rev",), eps=1e194)


def test_non_finite_input_is_nan_not_a_number():
    v = jnp.array([1.0, 2.0, 3.0], jnp.float32)
    for bad in (jnp.nan, jnp.inf):
        w = v.at[1].set(bad)
        assert np.isnan(float(jaxla.cosine_similarity(w, v)))
        assert np.all(np.isnan(np.asarray(jaxla.normalize(w))[1]))


def test_top_k_nan_never_wins():
    keys = jnp.array([[1.0, 0.0], [jnp.nan, 0.0], [0.0, 1.0], [-1.0, 0.0]], jnp.float32)
    queries = jnp.array([[1.0, 0.0], [jnp.nan, 1.0]], jnp.float32)
    for metric in ("cosine", "dot"):
        scores, idx = jaxla.top_k_similar(queries, keys, 4, metric=metric)
        # The NaN key ranks last for a good query, its score stays NaN.
        np.testing.assert_array_equal(idx[0], [0, 2, 3, 1])
        np.testing.assert_array_equal(scores[0, :3], [1.0, 0.0, -1.0])
        assert np.isnan(scores[0, 3])
        # A NaN query scores NaN everywhere and gets indices in order.
        np.testing.assert_array_equal(idx[1], [0, 1, 2, 3])
        assert np.all(np.isnan(scores[1]))
    # NaN ranks below -inf dot products too, and k < M never picks a NaN over a number.
    keys = jnp.array([[jnp.nan], [-jnp.inf], [2.0]], jnp.float32)
    scores, idx = jaxla.top_k_similar(jnp.ones((1,), jnp.float32), keys, 2, metric="dot")
    np.testing.assert_array_equal(idx, [2, 1])
    np.testing.assert_array_equal(scores, [2.0, -np.inf])
    # -0.0 and +0.0 still tie, keeping the lower index (also compiled as one program).
    def top2(q, k):
        return jaxla.top_k_similar(q, k, 2, metric="dot")[1]

    for fn in (top2, jax.jit(top2)):
        idx = fn(jnp.ones((1,), jnp.float32), jnp.array([[-0.0], [0.0]], jnp.float32))
        np.testing.assert_array_equal(idx, [0, 1])


def test_axis_out_of_range_is_a_value_error():
    f = jnp.ones((3, 8), jnp.float32)
    with pytest.raises(ValueError, match=r"axis=5 is out of range for rank 2 of a with shape \(3, 8\)"):
        jaxla.dot(f, f, axis=5)
    with pytest.raises(ValueError, match=r"axis=-3 is out of range for rank 2"):
        jaxla.cosine_similarity(f, f, axis=-3)
    with pytest.raises(ValueError, match=r"axis=2 is out of range for rank 2 of x"):
        jaxla.normalize(f, axis=2)
    with pytest.raises(TypeError, match="axis must be an int"):
        jaxla.project(f, f, axis=1.0)


def test_bad_eps_is_rejected():
    f = jnp.ones((3, 8), jnp.float32)
    for fn in (lambda eps: jaxla.cosine_similarity(f, f, eps=eps),
               lambda eps: jaxla.normalize(f, eps=eps),
               lambda eps: jaxla.project(f, f, eps=eps),
               lambda eps: jaxla.pairwise_cosine(f, f, eps=eps),
               lambda eps: jaxla.top_k_similar(f, f, 2, eps=eps)):
        for eps in (float("nan"), -1e-8, float("inf")):
            with pytest.raises(ValueError, match="eps must be finite and >= 0"):
                fn(eps)
        with pytest.raises(TypeError, match="eps must be a number"):
            fn("1e-8")
