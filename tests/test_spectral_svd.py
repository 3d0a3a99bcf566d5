"""Randomized SVD within the Halko–Martinsson–Tropp bounds; exact low-rank approximation errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxla import spectral
from jaxla.spectral._svd import _range_finder


def decaying(rng, m, n, sigma):
    u, _ = np.linalg.qr(rng.normal(size=(m, len(sigma))))
    v, _ = np.linalg.qr(rng.normal(size=(n, len(sigma))))
    return (u * sigma) @ v.T


def test_randomized_svd_top_values_and_vectors(x64, rng, key):
    sigma = 0.7 ** np.arange(30)
    a = decaying(rng, 50, 40, sigma)
    res = spectral.randomized_svd(jnp.asarray(a), 5, key=key)
    np.testing.assert_allclose(res.s, sigma[:5], rtol=1e-10)
    u_ref, _, vt_ref = np.linalg.svd(a)
    np.testing.assert_allclose(np.abs(np.sum(np.asarray(res.u) * u_ref[:, :5], axis=0)), 1.0,
                               atol=1e-8)
    np.testing.assert_allclose(np.abs(np.sum(np.asarray(res.vt) * vt_ref[:5], axis=1)), 1.0,
                               atol=1e-8)
    # Sign convention: the largest-magnitude entry of each column of u is positive.
    u = np.asarray(res.u)
    assert np.all(u[np.argmax(np.abs(u), axis=0), np.arange(5)] > 0)


@pytest.mark.parametrize("q", [0, 1])
def test_range_finder_within_hmt_bounds(x64, rng, q):
    k, p = 5, 5
    sigma = 1.0 / (1.0 + np.arange(40)) ** 1.5
    a = decaying(rng, 60, 45, sigma)
    tail = sigma[k:]
    errs, frob = [], []
    for i in range(8):
        qm = np.asarray(_range_finder(jnp.asarray(a), k + p, key=jax.random.key(i), n_iter=q))
        resid = a - qm @ (qm.T @ a)
        errs.append(np.linalg.norm(resid, 2))
        frob.append(np.linalg.norm(resid))
        # HMT Corollary 10.9 (q = 0), a deviation bound holding with prob >= 1 - 6 p^-p per draw,
        # also valid for q > 0 since power iterations only shrink the error.
        dev = (1 + 17 * np.sqrt(1 + k / p)) * sigma[k] + 8 * np.sqrt(k + p) / (p + 1) * np.sqrt(
            np.sum(tail**2))
        assert errs[-1] <= dev
    e = 2 * q + 1
    expected = ((1 + np.sqrt(k / (p - 1))) * sigma[k] ** e
                + np.e * np.sqrt(k + p) / p * np.sqrt(np.sum(tail ** (2 * e)))) ** (1 / e)
    assert np.mean(errs) <= expected  # HMT Corollary 10.10 (expectation)
    if q == 0:  # HMT Theorem 10.5 (expected Frobenius error)
        assert np.mean(frob) <= np.sqrt(1 + k / (p - 1)) * np.sqrt(np.sum(tail**2))


def test_truncated_error_adds_at_most_sigma_r_plus_1(x64, rng, key):
    sigma = 0.8 ** np.arange(30)
    a = decaying(rng, 40, 30, sigma)
    res = spectral.randomized_svd(jnp.asarray(a), 4, key=key, n_iter=0, oversample=4)
    approx = np.asarray(res.u) * np.asarray(res.s) @ np.asarray(res.vt)
    qm = np.asarray(_range_finder(jnp.asarray(a), 8, key=key, n_iter=0))
    sketch_err = np.linalg.norm(a - qm @ (qm.T @ a), 2)
    assert np.linalg.norm(a - approx, 2) <= sigma[4] + sketch_err + 1e-12


def test_randomized_svd_float32_batched_and_jit(rng, key):
    a = np.stack([decaying(rng, 30, 20, 0.5 ** np.arange(20)) for _ in range(2)])
    f = jax.jit(spectral.randomized_svd, static_argnames=("rank", "oversample", "n_iter"))
    res = f(jnp.asarray(a, jnp.bfloat16), 3, key=key)
    assert res.u.shape == (2, 30, 3) and res.s.dtype == jnp.float32
    np.testing.assert_allclose(res.s, np.linalg.svd(a, compute_uv=False)[:, :3], rtol=2e-2)


def test_low_rank_approx_eckart_young(x64, rng):
    a = rng.normal(size=(3, 7, 5))
    res = spectral.low_rank_approx(jnp.asarray(a), 2)
    s = np.linalg.svd(a, compute_uv=False)
    np.testing.assert_allclose(res.spectral_error, s[:, 2], rtol=1e-12)
    np.testing.assert_allclose(res.frobenius_error, np.sqrt(np.sum(s[:, 2:] ** 2, axis=1)),
                               rtol=1e-12)
    approx = np.asarray(res.reconstruct())
    np.testing.assert_allclose(np.linalg.norm(a - approx, 2, axis=(1, 2)), s[:, 2], rtol=1e-10)
    np.testing.assert_allclose(res.relative_frobenius_error,
                               res.frobenius_error / np.linalg.norm(a, axis=(1, 2)), rtol=1e-12)
    left, right = res.factors()
    assert left.shape == (3, 7, 2) and right.shape == (3, 2, 5)
    full = spectral.low_rank_approx(jnp.asarray(a[0]), 5)
    assert float(full.spectral_error) == 0.0 and float(full.frobenius_error) == 0.0


def test_low_rank_approx_degenerate(x64):
    zero = spectral.low_rank_approx(jnp.zeros((4, 3)), 1)
    assert float(zero.frobenius_error) == 0.0 and float(zero.relative_frobenius_error) == 0.0
    eye = spectral.low_rank_approx(jnp.eye(4), 2)  # repeated singular values
    assert float(eye.spectral_error) == pytest.approx(1.0)
    assert float(eye.frobenius_error) == pytest.approx(np.sqrt(2.0))


@pytest.mark.parametrize(
    ("w", "rank", "kwargs", "error", "match"),
    [
        (np.ones((4, 3)), 0, {}, ValueError, "> 0"),
        (np.ones((4, 3)), 4, {}, ValueError, "exceeds"),
        (np.ones(4), 1, {}, ValueError, "rank >= 2"),
        (np.full((4, 3), np.nan), 1, {}, ValueError, "NaN"),
        (np.ones((4, 3), np.int32), 1, {}, TypeError, "floating"),
        (np.ones((4, 3)), 1, {"oversample": -1}, ValueError, "oversample"),
        (np.ones((4, 3)), 1.5, {}, TypeError, "rank"),
        (np.ones((0, 3)), 1, {}, ValueError, "empty"),
    ],
)
def test_bad_input(key, w, rank, kwargs, error, match):
    with pytest.raises(error, match=match):
        spectral.randomized_svd(w, rank, key=key, **kwargs)
    if not kwargs:
        with pytest.raises(error, match=match):
            spectral.low_rank_approx(w, rank)
