"""Hutchinson trace and SLQ eigenvalue density of Hessians, against dense float64 Hessians."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jaxla import spectral


def mlp_problem(rng):
    """A small tanh MLP loss (P = 26 parameters), its batch and its dense float64 Hessian."""
    params = {
        "layer0": {"w": jnp.asarray(rng.normal(size=(3, 4)) * 0.8),
                   "b": jnp.asarray(rng.normal(size=(4,)) * 0.3)},
        "layer1": {"w": jnp.asarray(rng.normal(size=(4, 2)) * 0.8)},
    }
    batch = (jnp.asarray(rng.normal(size=(12, 3))), jnp.asarray(rng.normal(size=(12, 2))))

    def loss(p, batch):
        x, y = batch
        h = jnp.tanh(x @ p["layer0"]["w"] + p["layer0"]["b"][None, :])
        return jnp.mean(jnp.sum((h @ p["layer1"]["w"] - y) ** 2, axis=-1))

    flat, unravel = ravel_pytree(params)
    dense = np.asarray(jax.hessian(lambda f: loss(unravel(f), batch))(flat))
    return params, batch, loss, dense


def leaf_slices(params):
    """Flat index ranges of every leaf in ravel_pytree order, keyed by path name."""
    out, start = {}, 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = "/".join(str(p.key) for p in path)
        out[name] = slice(start, start + leaf.size)
        start += leaf.size
    return out


def rademacher_std(a):
    """Standard deviation of vᵀ A v for Rademacher v: √(2 (‖A‖_F² − Σ A_ii²))."""
    return np.sqrt(2.0 * (np.sum(a * a) - np.sum(np.diag(a) ** 2)))


def test_trace_within_its_stderr_over_seeds(x64, rng):
    params, batch, loss, dense = mlp_problem(rng)
    exact = np.trace(dense)
    run = jax.jit(jax.vmap(lambda k: spectral.hessian_trace(loss, params, batch, key=k,
                                                            num_probes=16)))
    res = run(jax.random.split(jax.random.key(3), 40))
    z = (np.asarray(res.trace) - exact) / np.asarray(res.stderr)
    # Standardised errors: on average about 0.8 in size (|N(0,1)|), none absurd.
    assert np.mean(np.abs(z)) < 1.3
    assert np.max(np.abs(z)) < 5.0
    # The reported stderr matches the analytic Rademacher standard deviation / √S.
    np.testing.assert_allclose(np.mean(np.asarray(res.stderr)), rademacher_std(dense) / 4.0,
                               rtol=0.25)
    # Averaging over seeds: within four combined standard errors of the exact trace.
    combined = rademacher_std(dense) / np.sqrt(16 * 40)
    assert abs(float(np.mean(res.trace)) - exact) < 4 * combined


def test_block_traces_add_up_and_match_dense_blocks(x64, rng, key):
    params, batch, loss, dense = mlp_problem(rng)
    res = spectral.hessian_trace(loss, params, batch, key=key, num_probes=256, blocks="leaves")
    slices = leaf_slices(params)
    assert res.block_names == tuple(slices)
    # Blocks partition the leaves: sample by sample they add up to the total.
    np.testing.assert_allclose(np.sum(res.block_traces), res.trace, rtol=1e-12)
    for name, est, se in zip(res.block_names, res.block_traces, res.block_stderr, strict=True):
        exact = np.trace(dense[slices[name], slices[name]])
        assert abs(float(est) - exact) < 4 * float(se) + 1e-12, name
    per_layer = spectral.hessian_trace(loss, params, batch, key=key, num_probes=256,
                                       blocks={"first": r"^layer0/", "second": r"^layer1/"})
    np.testing.assert_allclose(per_layer.block_traces[0],
                               res.block_traces[0] + res.block_traces[1], rtol=1e-12)
    assert "first" in str(per_layer) and "total" in str(per_layer)


def test_trace_of_diagonal_hessian_is_exact(x64, key):
    curv = jnp.array([3.0, -1.0, 0.5, 2.0])

    def loss(p, batch):
        return 0.5 * jnp.sum(curv * p * p * batch)

    res = spectral.hessian_trace(loss, jnp.ones(4), jnp.float64(1.0), key=key, num_probes=4)
    assert float(res.trace) == pytest.approx(4.5, rel=1e-12)
    assert float(res.stderr) == pytest.approx(0.0, abs=1e-12)


def test_trace_probe_batching_and_caller_jit_agree(rng, key):
    params, batch, loss, _ = mlp_problem(rng)
    params = jax.tree_util.tree_map(lambda t: t.astype(jnp.float32), params)
    batch = jax.tree_util.tree_map(lambda t: t.astype(jnp.float32), batch)
    eager = spectral.hessian_trace(loss, params, batch, key=key, num_probes=8)
    chunked = jax.jit(lambda p, b, k: spectral.hessian_trace(loss, p, b, key=k, num_probes=8,
                                                            probe_batch=3))(params, batch, key)
    assert eager.trace.dtype == jnp.float32
    np.testing.assert_allclose(chunked.samples, eager.samples, rtol=1e-5)


def test_slq_with_full_krylov_space_gives_the_eigenvalues(x64, rng, key):
    params, batch, loss, dense = mlp_problem(rng)
    p = dense.shape[0]
    res = spectral.hessian_density(loss, params, batch, key=key, num_probes=2, num_steps=p)
    np.testing.assert_allclose(np.sort(res.nodes, axis=1),
                               np.tile(np.linalg.eigvalsh(dense), (2, 1)), atol=1e-9)
    np.testing.assert_allclose(np.sum(res.weights, axis=1), 1.0, rtol=1e-12)


def test_slq_moments_match_dense_hessian(x64, rng, key):
    params, batch, loss, dense = mlp_problem(rng)
    p, s = dense.shape[0], 32
    res = spectral.hessian_density(loss, params, batch, key=key, num_probes=s, num_steps=6)
    mean, var = res.moments()
    ev = np.linalg.eigvalsh(dense)
    # Stated tolerance: 4 standard deviations of the probe average of vᵀHv/P and vᵀH²v/P (the
    # quadrature is exact for both moments, so only the Rademacher sampling error remains).
    tol1 = 4 * rademacher_std(dense) / p / np.sqrt(s)
    tol2 = 4 * rademacher_std(dense @ dense) / p / np.sqrt(s)
    assert abs(float(mean) - ev.mean()) < tol1
    assert abs(float(var + mean**2) - np.mean(ev**2)) < tol2
    grid, density = np.asarray(res.grid), np.asarray(res.density)
    assert np.all(density >= 0) and np.all(np.diff(grid) > 0)
    assert np.sum(density) * (grid[1] - grid[0]) == pytest.approx(1.0, abs=2e-3)
    # The density's own mean (broadening is symmetric) is the quadrature mean.
    dmean = np.sum(grid * density) / np.sum(density)
    assert dmean == pytest.approx(float(mean), abs=1e-3 * np.ptp(grid))


def test_slq_under_caller_jit_and_options(rng, key):
    params, batch, loss, _ = mlp_problem(rng)
    run = jax.jit(lambda p, b, k: spectral.hessian_density(
        loss, p, b, key=k, num_probes=2, num_steps=5, grid_size=64, sigma=0.05,
        grid_range=(-2.0, 4.0)))
    res = run(params, batch, key)
    assert res.grid.shape == (64,) and res.nodes.shape == (2, 5)
    assert float(res.grid[0]) == pytest.approx(-2.0) and float(res.grid[-1]) == pytest.approx(4.0)
    assert float(res.sigma) == pytest.approx(0.05)


def test_curvature_summary_against_the_dense_hessian_and_hessian_trace(x64, rng, key):
    """One loop serves both estimates: the Lanczos λ_max is the dense Hessian's largest
    eigenvalue, and the trace is hessian_trace's on the same probes (the same key)."""
    params, batch, loss, dense = mlp_problem(rng)
    _, k_trace = jax.random.split(key)

    def summary(p):
        return spectral.curvature_summary(loss, p, batch, key=key, learning_rate=0.1, num_probes=4)

    got = summary(params)
    assert bool(got.converged)
    np.testing.assert_allclose(float(got.sharpness), np.linalg.eigvalsh(dense)[-1], rtol=1e-8)
    assert float(got.threshold) == pytest.approx(20.0)
    assert float(got.ratio) == pytest.approx(float(got.sharpness) / 20.0)
    want = spectral.hessian_trace(loss, params, batch, key=k_trace, num_probes=4)
    np.testing.assert_allclose(float(got.trace), float(want.trace), rtol=1e-12)
    np.testing.assert_allclose(float(got.trace_stderr), float(want.stderr), rtol=1e-10)
    # Under vmap over two points (the demos' start and end), each equals its own call.
    half = jax.tree_util.tree_map(lambda x: 0.5 * x, params)
    pair = jax.jit(jax.vmap(summary))(jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]),
                                                             params, half))
    for i, one in enumerate((got, summary(half))):
        for a, b in zip(pair, one, strict=True):
            np.testing.assert_allclose(np.asarray(a)[i], np.asarray(b), rtol=1e-10)


def test_curvature_summary_caps_its_steps_and_keeps_nan(key):
    """More Lanczos steps than parameters are capped at P (the Krylov space is all of R^P, so
    λ_max is exact); a NaN loss gives NaN estimates and not converged, never a plausible number."""
    def loss(p, scale):  # H = diag(4, 1, 0.5): every Rademacher probe gives z·Hz = tr H exactly
        return scale * (2.0 * p[0] ** 2 + 0.5 * p[1] ** 2 + 0.25 * p[2] ** 2)

    got = spectral.curvature_summary(loss, jnp.ones(3), jnp.float32(1.0), key=key,
                                     learning_rate=0.5, num_probes=3, num_iters=48)
    assert bool(got.converged)
    np.testing.assert_allclose(float(got.sharpness), 4.0, rtol=1e-6)
    np.testing.assert_allclose(float(got.trace), 5.5, rtol=1e-6)
    assert float(got.trace_stderr) == pytest.approx(0.0, abs=1e-6)
    bad = spectral.curvature_summary(loss, jnp.ones(3), jnp.float32(jnp.nan), key=key,
                                     learning_rate=0.5, num_probes=3)
    assert np.isnan(float(bad.sharpness)) and np.isnan(float(bad.trace))
    assert not bool(bad.converged)


def test_nan_loss_gives_nan_not_a_number(key):
    def loss(p, batch):
        return jnp.sum(p * p) * batch

    nan = jnp.float32(jnp.nan)
    tr = spectral.hessian_trace(loss, jnp.ones(3), nan, key=key, num_probes=2)
    assert np.isnan(float(tr.trace))
    dens = spectral.hessian_density(loss, jnp.ones(3), nan, key=key, num_probes=1, num_steps=2)
    assert np.all(np.isnan(np.asarray(dens.density)))


def test_bad_inputs(rng, key):
    params, batch, loss, _ = mlp_problem(rng)
    with pytest.raises(ValueError, match="num_probes must be >= 2"):
        spectral.hessian_trace(loss, params, batch, key=key, num_probes=1)
    with pytest.raises(ValueError, match="matches no parameter path"):
        spectral.hessian_trace(loss, params, batch, key=key, blocks={"x": "nowhere"})
    with pytest.raises(ValueError, match="invalid regex"):
        spectral.hessian_trace(loss, params, batch, key=key, blocks=["("])
    with pytest.raises(ValueError, match="'leaves'"):
        spectral.hessian_trace(loss, params, batch, key=key, blocks="layers")
    with pytest.raises(ValueError, match="num_steps=40 exceeds"):
        spectral.hessian_density(loss, params, batch, key=key, num_steps=40)
    with pytest.raises(ValueError, match="sigma"):
        spectral.hessian_density(loss, params, batch, key=key, num_steps=4, sigma=-1.0)
    with pytest.raises(ValueError, match="grid_range"):
        spectral.hessian_density(loss, params, batch, key=key, num_steps=4, grid_range=(1, 0))
    with pytest.raises(ValueError, match="floating scalar"):
        spectral.hessian_trace(lambda p, b: p["layer1"]["w"], params, batch, key=key)


def test_density_plot_rejects_bad_input_before_needing_matplotlib():
    with pytest.raises(ValueError, match="equal length"):
        spectral.plot_hessian_density((np.arange(3.0), np.ones(4)))
    with pytest.raises(ValueError, match="finite"):
        spectral.plot_hessian_density((np.arange(3.0), np.array([1.0, np.nan, 0.0])))
    with pytest.raises(ValueError, match="HessianDensity"):
        spectral.plot_hessian_density(np.ones(3))
