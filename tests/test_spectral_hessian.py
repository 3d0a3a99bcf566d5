"""Hessian eigenvalues via HVPs, the sharpness check, and Jacobian singular values, vs dense float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jaxla import spectral


def quadratic(rng, n=10):
    b = rng.normal(size=(n, n))
    a = (b + b.T) / 2
    params = {"w": jnp.asarray(rng.normal(size=(3, 2))), "b": jnp.asarray(rng.normal(size=(4,)))}

    def loss(p, batch):
        flat, _ = ravel_pytree(p)
        return 0.5 * flat @ (jnp.asarray(a) @ flat) + batch @ flat

    return a, params, loss, jnp.asarray(rng.normal(size=(n,)))


def test_hessian_of_quadratic_matches_eigh(x64, rng, key):
    a, params, loss, batch = quadratic(rng)
    ref = np.sort(np.linalg.eigvalsh(a))[::-1]
    res = spectral.hessian_top_eigenvalues(loss, params, batch, k=3, key=key, num_iters=10)
    np.testing.assert_allclose(res.eigenvalues, ref[:3], rtol=1e-9)
    assert bool(res.converged)
    assert res.eigenvectors["w"].shape == (3, 3, 2)
    low = spectral.hessian_top_eigenvalues(loss, params, batch, k=1, key=key, num_iters=10,
                                           which="smallest")
    np.testing.assert_allclose(low.eigenvalues, ref[-1:], rtol=1e-9)
    power = spectral.hessian_top_eigenvalues(loss, params, batch, k=1, key=key, method="power",
                                             num_iters=2000, tol=1e-9)
    assert abs(float(power.eigenvalues[0])) == pytest.approx(np.max(np.abs(ref)), rel=1e-8)


def test_hessian_of_small_mlp_matches_dense_hessian(x64, rng, key):
    params = {
        "w1": jnp.asarray(rng.normal(size=(3, 4)) * 0.7),
        "w2": jnp.asarray(rng.normal(size=(4, 2)) * 0.7),
    }
    x = jnp.asarray(rng.normal(size=(5, 3)))
    y = jnp.asarray(rng.normal(size=(5, 2)))

    def loss(p, batch):
        xb, yb = batch
        return jnp.mean((jnp.tanh(xb @ p["w1"]) @ p["w2"] - yb) ** 2)

    flat, unravel = ravel_pytree(params)
    dense = jax.hessian(lambda f: loss(unravel(f), (x, y)))(flat)
    ref = np.sort(np.linalg.eigvalsh(np.asarray(dense)))[::-1]
    res = spectral.hessian_top_eigenvalues(loss, params, (x, y), k=2, key=key, num_iters=20)
    np.testing.assert_allclose(res.eigenvalues, ref[:2], rtol=1e-8)
    hv = spectral.hvp(loss, params, (x, y), jax.tree_util.tree_map(lambda t: t[0], res.eigenvectors))
    np.testing.assert_allclose(ravel_pytree(hv)[0], np.asarray(dense) @ np.asarray(
        ravel_pytree(jax.tree_util.tree_map(lambda t: t[0], res.eigenvectors))[0]), atol=1e-10)


def test_sharpness_against_two_over_lr(x64, key):
    curv = jnp.array([8.0, 1.0, 0.5])

    def loss(p, batch):
        return 0.5 * jnp.sum(curv * p * p) + 0.0 * jnp.sum(batch)

    p = jnp.ones(3)
    stable = spectral.sharpness(loss, p, jnp.zeros(2), learning_rate=0.2, key=key)
    assert float(stable.sharpness) == pytest.approx(8.0, rel=1e-9)
    assert float(stable.threshold) == pytest.approx(10.0)
    assert float(stable.ratio) == pytest.approx(0.8) and not bool(stable.unstable)
    unstable = spectral.sharpness(loss, p, jnp.zeros(2), learning_rate=0.3, key=key)
    assert bool(unstable.unstable) and bool(unstable.converged)
    with pytest.raises(ValueError, match="learning_rate"):
        spectral.sharpness(loss, p, jnp.zeros(2), learning_rate=0.0, key=key)


def test_sharpness_callback_every_n_steps():
    def loss(p, batch):
        return 0.5 * jnp.sum(batch * p * p)

    cb = spectral.sharpness_callback(loss, learning_rate=0.1, every=5, num_iters=4)
    batch = jnp.array([3.0, 1.0, 2.0, 0.5], jnp.float32)
    assert cb(3, jnp.ones(4), batch) is None
    first = cb(0, jnp.ones(4), batch)
    again = cb(10, jnp.ones(4), batch)
    assert float(first.sharpness) == pytest.approx(3.0, rel=1e-5)
    assert float(again.sharpness) == pytest.approx(3.0, rel=1e-5)
    with pytest.raises(ValueError):
        spectral.sharpness_callback(loss, learning_rate=0.1, every=0)


def test_jacobian_singular_values_match_svd(x64, rng, key):
    m = jnp.asarray(rng.normal(size=(7, 5)))
    x = jnp.asarray(rng.normal(size=(5,)) * 0.3)

    def fn(v):
        return {"h": jnp.tanh(m @ v)}

    jac = np.asarray(jax.jacobian(lambda v: fn(v)["h"])(x))
    ref = np.linalg.svd(jac, compute_uv=False)
    res = spectral.jacobian_singular_values(fn, x, k=2, key=key, num_iters=5)
    np.testing.assert_allclose(res.singular_values, ref[:2], rtol=1e-8)
    for i in range(2):
        np.testing.assert_allclose(jac @ np.asarray(res.right[i]),
                                   ref[i] * np.asarray(res.left["h"][i]), atol=1e-9)
    assert bool(res.converged)


def test_nan_loss_is_flagged_not_converged(key):
    def loss(p, batch):
        return jnp.sum(p * p) * batch

    res = spectral.hessian_top_eigenvalues(loss, jnp.ones(3), jnp.float32(jnp.nan), key=key,
                                           num_iters=3)
    assert not bool(res.converged)


def test_bad_inputs(key):
    def vector_loss(p, batch):
        return p * batch

    with pytest.raises(ValueError, match="scalar"):
        spectral.hessian_top_eigenvalues(vector_loss, jnp.ones(3), 1.0, key=key)
    with pytest.raises(TypeError, match="floating"):
        spectral.hessian_top_eigenvalues(lambda p, b: jnp.sum(p), jnp.ones(3, jnp.int32), 0,
                                         key=key)
    with pytest.raises(ValueError, match="no array leaves"):
        spectral.hessian_top_eigenvalues(lambda p, b: 0.0, {}, 0, key=key)
    with pytest.raises(ValueError, match="larger than"):
        spectral.hessian_top_eigenvalues(lambda p, b: jnp.sum(p * p), jnp.ones(3), 0, k=4,
                                         key=key)
    with pytest.raises(ValueError, match="method"):
        spectral.hessian_top_eigenvalues(lambda p, b: jnp.sum(p * p), jnp.ones(3), 0, key=key,
                                         method="arnoldi")
    with pytest.raises(ValueError, match="power"):
        spectral.hessian_top_eigenvalues(lambda p, b: jnp.sum(p * p), jnp.ones(3), 0, key=key,
                                         method="power", which="smallest")
    with pytest.raises(ValueError, match="larger than"):
        spectral.jacobian_singular_values(jnp.sin, jnp.ones(3), k=5, key=key)
    with pytest.raises(TypeError, match="callable"):
        spectral.jacobian_singular_values(3, jnp.ones(3), key=key)


def _call_and_release(call):
    """Runs ``call(fn)`` with a fresh loss function and returns a weak reference to it."""
    import weakref

    scale = jnp.arange(1.0, 4.0)

    def loss(p, batch):
        return jnp.sum(scale * p * p) * batch

    call(loss)
    return weakref.ref(loss)


@pytest.mark.parametrize("which", ["hessian", "power", "sharpness", "jacobian", "lanczos"])
def test_no_cache_keeps_the_users_callable(which, key):
    """A fresh lambda per call must not be pinned by a library jit cache (issue 12)."""
    import gc

    p, b = jnp.ones(3), jnp.float32(1.0)
    calls = {
        "hessian": lambda f: spectral.hessian_top_eigenvalues(f, p, b, key=key, num_iters=3),
        "power": lambda f: spectral.hessian_top_eigenvalues(f, p, b, key=key, method="power",
                                                            num_iters=3),
        "sharpness": lambda f: spectral.sharpness(f, p, b, learning_rate=0.1, key=key,
                                                  num_iters=3),
        "jacobian": lambda f: spectral.jacobian_singular_values(lambda x: jax.grad(f)(x, b), p,
                                                                key=key, num_iters=3),
        "lanczos": lambda f: spectral.lanczos(lambda v: jax.grad(f)(v, b), like=p, key=key,
                                              num_iters=3),
    }
    ref = _call_and_release(calls[which])
    gc.collect()
    assert ref() is None, f"{which}: a cache still holds the loss function"


def test_composes_under_the_callers_jit(key):
    """Under the caller's jit the loss is traced once, however many times the jitted call runs."""
    traces = []

    def loss(p, batch):
        traces.append(1)
        return jnp.sum(p * p * p) * batch

    top = jax.jit(lambda p, b, k: spectral.hessian_top_eigenvalues(loss, p, b, key=k, num_iters=3))
    first = top(jnp.ones(3), jnp.float32(1.0), key)
    n = len(traces)
    second = top(2 * jnp.ones(3), jnp.float32(1.0), jax.random.fold_in(key, 1))
    assert len(traces) == n  # no retrace, no recompile for new values
    # H = diag(6 p): the top eigenvalue follows p.
    np.testing.assert_allclose(first.eigenvalues[0], 6.0, rtol=1e-4)
    np.testing.assert_allclose(second.eigenvalues[0], 12.0, rtol=1e-4)


def test_learning_rate_must_be_finite_and_positive(key):
    def loss(p, b):
        return jnp.sum(p * p)

    for lr in (float("inf"), float("nan"), -0.1, True, "0.1"):
        with pytest.raises(ValueError, match="learning_rate must be a finite number > 0"):
            spectral.sharpness(loss, jnp.ones(2), 0.0, learning_rate=lr, key=key)
        with pytest.raises(ValueError, match="learning_rate must be a finite number > 0"):
            spectral.sharpness_callback(loss, learning_rate=lr)
