"""Power iteration and Lanczos against dense float64 eigh, on matrices and pytree operators."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxla import spectral


def known_spectrum(rng, eigenvalues):
    n = len(eigenvalues)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    a = (q * np.asarray(eigenvalues)) @ q.T
    return (a + a.T) / 2


def random_symmetric(rng, n):
    b = rng.normal(size=(n, n))
    return (b + b.T) / 2


def order(values, which):
    key = {"largest": -values, "smallest": values, "magnitude": -np.abs(values)}[which]
    return values[np.argsort(key, kind="stable")]


@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude"])
def test_lanczos_matches_eigh_float64(x64, rng, key, which):
    a = random_symmetric(rng, 24)
    res = spectral.lanczos(jnp.asarray(a), k=3, key=key, num_iters=24, which=which)
    ref_vals, ref_vecs = np.linalg.eigh(a)
    expected = order(ref_vals, which)[:3]
    np.testing.assert_allclose(res.eigenvalues, expected, rtol=1e-9, atol=1e-9)
    vecs = np.asarray(res.eigenvectors)
    for i in range(3):
        j = int(np.argmin(np.abs(ref_vals - expected[i])))
        assert abs(abs(vecs[i] @ ref_vecs[:, j]) - 1.0) < 1e-8
    assert bool(res.converged)
    assert np.all(np.asarray(res.residuals) < 1e-8 * np.max(np.abs(ref_vals)))


# Tests share n=24, k=3, num_iters=24 where they can: one compiled program serves them all.
def test_lanczos_stops_early_on_a_gapped_spectrum(x64, rng, key):
    ev = np.concatenate([[100.0, 50.0, 30.0], rng.uniform(0, 1, size=21)])
    a = known_spectrum(rng, ev)
    res = spectral.lanczos(jnp.asarray(a), k=3, key=key, num_iters=24, tol=1e-10)
    assert bool(res.converged)
    assert int(res.iterations) < 24
    np.testing.assert_allclose(res.eigenvalues, [100.0, 50.0, 30.0], rtol=1e-10)


def test_flags_unconverged_when_steps_are_too_few(x64, rng, key):
    a = known_spectrum(rng, np.linspace(0.0, 1.0, 24))
    res = spectral.power_iteration(jnp.asarray(a), k=2, key=key, num_iters=4, tol=1e-6)
    assert not bool(res.converged)
    assert int(res.iterations) == 4
    # The residual reported is the true one, large enough to explain the flag.
    assert float(res.residuals[0]) > 1e-6


def test_power_iteration_matches_eigh_float64(x64, rng, key):
    ev = np.concatenate([[-9.0, 6.0, 3.0], rng.uniform(-1, 1, size=21)])
    a = known_spectrum(rng, ev)
    res = spectral.power_iteration(jnp.asarray(a), k=2, key=key, num_iters=300, tol=1e-10)
    assert bool(res.converged)
    np.testing.assert_allclose(res.eigenvalues, [-9.0, 6.0], rtol=1e-9)
    np.testing.assert_allclose(np.abs(np.asarray(res.eigenvectors) @ a @ np.asarray(
        res.eigenvectors).T), np.diag([9.0, 6.0]), atol=1e-8)


def test_power_iteration_finds_a_repeated_top_eigenvalue(x64, rng, key):
    a = known_spectrum(rng, np.concatenate([[5.0, 5.0, 2.0], rng.uniform(-1, 1, size=21)]))
    res = spectral.power_iteration(jnp.asarray(a), k=2, key=key, num_iters=200, tol=1e-10)
    assert bool(res.converged)
    np.testing.assert_allclose(res.eigenvalues, [5.0, 5.0], rtol=1e-9)
    v = np.asarray(res.eigenvectors)
    np.testing.assert_allclose(v @ v.T, np.eye(2), atol=1e-9)


def test_lanczos_on_repeated_eigenvalues_returns_the_eigenspace(x64, rng, key):
    # One start vector spans one direction per eigenspace: the repeated value appears once, exactly.
    a = known_spectrum(rng, [4.0] * 3 + [1.0] * 10 + [-2.0] * 11)
    res = spectral.lanczos(jnp.asarray(a), k=3, key=key, num_iters=24)
    np.testing.assert_allclose(res.eigenvalues, [4.0, 1.0, -2.0], rtol=1e-10)
    assert bool(res.converged)
    assert int(res.iterations) == 3  # invariant Krylov subspace found (breakdown)
    v = np.asarray(res.eigenvectors)[0]
    np.testing.assert_allclose(a @ v, 4.0 * v, atol=1e-10)


def test_lanczos_rank_one_and_zero(x64, rng, key):
    u = rng.normal(size=24)
    res = spectral.lanczos(jnp.asarray(np.outer(u, u)), k=1, key=key, num_iters=24)
    np.testing.assert_allclose(res.eigenvalues[0], u @ u, rtol=1e-12)
    zero = spectral.lanczos(jnp.zeros((24, 24)), k=1, key=key, num_iters=24)
    assert float(zero.eigenvalues[0]) == 0.0 and bool(zero.converged)
    # Fewer independent directions than k: flagged, not silently padded.
    short = spectral.lanczos(jnp.asarray(np.outer(u, u)), k=3, key=key, num_iters=24)
    assert int(short.iterations) == 2
    assert not bool(short.converged)


def test_pytree_operator_matches_dense(x64, rng, key):
    a = random_symmetric(rng, 6)
    d = rng.uniform(1, 2, size=(2, 3))

    def matvec(t):
        return {"x": jnp.asarray(a) @ t["x"], "y": jnp.asarray(d) * t["y"]}

    like = {"x": jnp.zeros(6), "y": jnp.zeros((2, 3))}
    res = spectral.lanczos(matvec, k=2, key=key, like=like, num_iters=12)
    dense = np.sort(np.concatenate([np.linalg.eigvalsh(a), d.ravel()]))[::-1]
    np.testing.assert_allclose(res.eigenvalues, dense[:2], rtol=1e-10)
    assert res.eigenvectors["y"].shape == (2, 2, 3)
    pres = spectral.power_iteration(matvec, k=1, key=key, like=like, num_iters=500, tol=1e-9)
    assert abs(float(pres.eigenvalues[0])) == pytest.approx(np.max(np.abs(dense)), rel=1e-8)


def test_jit_matches_eager(rng, key):
    a = jnp.asarray(random_symmetric(rng, 24), jnp.float32)
    eager = spectral.lanczos(a, k=3, key=key, num_iters=24)
    jitted = jax.jit(lambda m, kk: spectral.lanczos(m, k=3, key=kk, num_iters=24))(a, key)
    np.testing.assert_allclose(jitted.eigenvalues, eager.eigenvalues, rtol=1e-5)
    pj = jax.jit(lambda m, kk: spectral.power_iteration(m, k=1, key=kk))(a, key)
    assert pj.eigenvalues.shape == (1,)


def test_start_vector_instead_of_key(x64, rng):
    a = random_symmetric(rng, 24)
    v0 = jnp.asarray(rng.normal(size=24))
    res = spectral.lanczos(jnp.asarray(a), k=1, v0=v0, num_iters=24)
    np.testing.assert_allclose(res.eigenvalues[0], np.linalg.eigvalsh(a)[-1], rtol=1e-10)
    with pytest.raises(ValueError, match="key"):
        spectral.power_iteration(jnp.asarray(a), k=2, v0=v0)


def test_nan_under_jit_is_flagged(key):
    a = jnp.eye(4).at[0, 0].set(jnp.nan)
    for solver in (spectral.lanczos, spectral.power_iteration):
        res = jax.jit(lambda m, kk, f=solver: f(m, k=1, key=kk))(a, key)
        assert not bool(res.converged)


@pytest.mark.parametrize(
    ("op", "kwargs", "error", "match"),
    [
        (np.ones((3, 4)), {}, ValueError, "square"),
        (np.array([[1.0, 2.0], [0.0, 1.0]]), {}, ValueError, "symmetric"),
        (np.eye(3), {"k": 4}, ValueError, "larger than"),
        (np.eye(3), {"k": 0}, ValueError, "> 0"),
        (np.eye(3) * np.nan, {}, ValueError, "NaN"),
        (np.diag([np.inf, 1.0, 1.0]), {}, ValueError, "inf"),
        (np.eye(3, dtype=np.int32), {}, TypeError, "floating"),
        (np.ones(3), {}, ValueError, "rank"),
        (np.eye(3), {"num_iters": 0}, ValueError, "num_iters"),
        (np.eye(3), {"tol": 0.0}, ValueError, "tol"),
    ],
)
def test_bad_matrix_input(key, op, kwargs, error, match):
    for solver in (spectral.lanczos, spectral.power_iteration):
        with pytest.raises(error, match=match):
            solver(op, key=key, **kwargs)


def test_bad_lanczos_options(key):
    with pytest.raises(ValueError, match="which"):
        spectral.lanczos(np.eye(3), key=key, which="top")
    with pytest.raises(ValueError, match="between k"):
        spectral.lanczos(np.eye(5), k=3, key=key, num_iters=2)
    with pytest.raises(ValueError, match="between k"):
        spectral.lanczos(np.eye(5), k=1, key=key, num_iters=6)


def test_bad_function_operator(key):
    with pytest.raises(ValueError, match="like"):
        spectral.lanczos(lambda v: v, key=key)
    with pytest.raises(ValueError, match="same structure"):
        spectral.lanczos(lambda v: jnp.concatenate([v, v]), key=key, like=jnp.zeros(3))
    with pytest.raises(ValueError, match="start vector"):
        spectral.lanczos(np.eye(3), v0=jnp.ones(4))
    with pytest.raises(ValueError, match="key"):
        spectral.lanczos(np.eye(3))
