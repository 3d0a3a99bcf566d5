"""Matrix metrics vs NumPy float64 definitions, finite gradients at repeated singular values, report."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxla import spectral


def np_effective_rank(w):
    s = np.linalg.svd(w, compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return np.exp(-np.sum(p * np.log(p)))


def with_spectrum(rng, m, n, s):
    u, _ = np.linalg.qr(rng.normal(size=(m, len(s))))
    v, _ = np.linalg.qr(rng.normal(size=(n, len(s))))
    return (u * np.asarray(s)) @ v.T


def test_metrics_match_numpy_float64(x64, rng):
    w = rng.normal(size=(4, 7, 5))
    s = np.linalg.svd(w, compute_uv=False)
    np.testing.assert_allclose(spectral.spectral_norm(w), np.linalg.norm(w, 2, axis=(1, 2)),
                               rtol=1e-12)
    np.testing.assert_allclose(spectral.stable_rank(w),
                               np.linalg.norm(w, axis=(1, 2)) ** 2 / s[:, 0] ** 2, rtol=1e-12)
    np.testing.assert_allclose(spectral.effective_rank(w), [np_effective_rank(x) for x in w],
                               rtol=1e-12)
    np.testing.assert_allclose(spectral.condition_number(w), np.linalg.cond(w), rtol=1e-10)
    np.testing.assert_array_equal(spectral.numerical_rank(w), np.linalg.matrix_rank(w))
    np.testing.assert_allclose(spectral.singular_values(w), s, rtol=1e-12)


def test_known_and_degenerate_spectra(x64, rng):
    eye = jnp.eye(6)
    assert float(spectral.effective_rank(eye)) == pytest.approx(6.0)
    assert float(spectral.stable_rank(eye)) == pytest.approx(6.0)
    assert float(spectral.condition_number(eye)) == pytest.approx(1.0)
    low = with_spectrum(rng, 6, 5, [3.0, 1.0])  # rank 2
    assert int(spectral.numerical_rank(low)) == 2
    assert float(spectral.condition_number(low)) > 1e12  # sigma_min at rounding level, or inf
    assert float(spectral.stable_rank(low)) == pytest.approx(10.0 / 9.0)
    assert int(spectral.numerical_rank(low, rtol=0.5)) == 1
    zero = jnp.zeros((3, 4))
    assert float(spectral.stable_rank(zero)) == 0.0
    assert float(spectral.effective_rank(zero)) == 0.0
    assert int(spectral.numerical_rank(zero)) == 0
    assert float(spectral.spectral_norm(zero)) == 0.0
    assert np.isinf(float(spectral.condition_number(jnp.diag(jnp.array([1.0, 0.0])))))


def test_gradients_finite_with_repeated_singular_values(x64, rng):
    w = jnp.asarray(with_spectrum(rng, 5, 4, [2.0, 2.0, 1.0, 1.0]))
    for fn in (spectral.spectral_norm, spectral.stable_rank, spectral.effective_rank,
               spectral.condition_number):
        g = jax.grad(fn)(w)
        assert bool(jnp.all(jnp.isfinite(g))), fn.__name__
    # A symmetric function of the singular values is differentiable at repeated ones (Lewis 1995):
    # effective rank is, so its gradient must match finite differences there.
    check_grads(spectral.effective_rank, (w,), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)
    distinct = jnp.asarray(with_spectrum(rng, 5, 4, [3.0, 2.0, 1.5, 1.0]))
    for fn in (spectral.spectral_norm, spectral.stable_rank, spectral.condition_number):
        check_grads(fn, (distinct,), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)
    rank_deficient = jnp.asarray(with_spectrum(rng, 5, 4, [2.0, 1.0]))
    assert bool(jnp.all(jnp.isfinite(jax.grad(spectral.effective_rank)(rank_deficient))))
    assert bool(jnp.all(jnp.isfinite(jax.grad(spectral.stable_rank)(jnp.zeros((3, 3))))))


def test_weight_report(rng):
    params = {
        "dense": {"w": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32), "b": jnp.zeros(4)},
        "layers": jnp.asarray(rng.normal(size=(3, 5, 5)), jnp.float32),
        "emb": jnp.asarray(rng.normal(size=(10, 4)), jnp.bfloat16),
        "step": jnp.zeros((2, 2), jnp.int32),
    }
    rep = spectral.weight_report(params)
    assert rep.names == ("dense/w", "emb", "layers[0]", "layers[1]", "layers[2]")
    assert rep.shapes[2] == (5, 5)
    np.testing.assert_allclose(rep.spectral_norm[2:], spectral.spectral_norm(params["layers"]),
                               rtol=1e-6)
    np.testing.assert_allclose(rep.effective_rank[0], spectral.effective_rank(params["dense"]["w"]),
                               rtol=1e-6)
    np.testing.assert_allclose(rep.frobenius_norm[0], np.linalg.norm(params["dense"]["w"]),
                               rtol=1e-6)
    assert rep.numerical_rank.dtype == jnp.int32
    text = str(rep)
    assert "layers[1]" in text and "stable_rank" in text and text.count("\n") == 6
    rows = rep.rows()
    assert rows[0]["name"] == "dense/w" and isinstance(rows[0]["numerical_rank"], int)
    jitted = jax.jit(spectral.weight_report)(params)
    np.testing.assert_allclose(jitted.stable_rank, rep.stable_rank, rtol=1e-5)
    assert jitted.names == rep.names


def test_bad_input():
    with pytest.raises(ValueError, match="no floating matrices"):
        spectral.weight_report({"b": jnp.zeros(3)})
    with pytest.raises(ValueError, match="NaN"):
        spectral.weight_report({"w": jnp.full((2, 2), jnp.nan)})
    with pytest.raises(ValueError, match="rank >= 2"):
        spectral.spectral_norm(jnp.ones(3))
    with pytest.raises(TypeError, match="floating"):
        spectral.stable_rank(jnp.ones((2, 2), jnp.int32))
    with pytest.raises(ValueError, match="rtol"):
        spectral.numerical_rank(jnp.eye(2), rtol=-1.0)
    with pytest.raises(ValueError, match="inf"):
        spectral.effective_rank(jnp.array([[jnp.inf, 0.0], [0.0, 1.0]]))
