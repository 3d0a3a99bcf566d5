"""Heavy-tail metrics: power-law fit vs synthetic Pareto spectra and an independent NumPy fit; MP edge."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxla import spectral


def numpy_clauset_fit(x, min_tail, rtol):
    """Independent loop implementation of the Clauset–Shalizi–Newman fit (continuous MLE + KS)."""
    x = np.sort(np.asarray(x, np.float64))
    x = x[x > rtol * x[-1]]
    best = None
    for xmin in np.unique(x):
        tail = x[x >= xmin]
        n = tail.size
        if n < min_tail:
            continue
        total = np.sum(np.log(tail / xmin))
        if total <= 0:
            continue
        alpha = 1.0 + n / total
        fitted = 1.0 - (tail / xmin) ** (1.0 - alpha)
        # The empirical CDF jumps at each sorted point from (i-1)/n to i/n: check both sides.
        steps = np.arange(1, n + 1) / n
        d = max(np.max(np.abs(steps - fitted)), np.max(np.abs(steps - 1.0 / n - fitted)))
        if best is None or d < best[0]:
            best = (d, alpha, xmin, n)
    d, alpha, xmin, n = best
    return {"alpha": alpha, "xmin": xmin, "ks_distance": d, "num_tail": n,
            "alpha_stderr": (alpha - 1.0) / np.sqrt(n)}


def pareto(rng, alpha, xmin, n):
    """Samples of the density ∝ x^-alpha on [xmin, ∞) by inversion."""
    return xmin * (1.0 - rng.uniform(size=n)) ** (-1.0 / (alpha - 1.0))


@pytest.mark.parametrize("alpha", [2.0, 3.0, 4.5])
def test_fit_recovers_pareto_alpha(x64, rng, alpha):
    # Stated tolerance: |α̂ − α| <= 0.15 with 2,000 samples (the MLE's own stderr is ≈ 0.02–0.08).
    fit = spectral.power_law_fit(jnp.asarray(pareto(rng, alpha, 0.5, 2000)))
    assert abs(float(fit.alpha) - alpha) <= 0.15
    assert float(fit.alpha_stderr) == pytest.approx((float(fit.alpha) - 1) / np.sqrt(
        int(fit.num_tail)))
    assert int(fit.num_tail) >= 200


def test_fit_finds_the_tail_above_a_bulk(x64, rng):
    # 1,500 bulk values below xmin = 1 plus 1,500 Pareto(α = 2.5) values above it.
    x = np.concatenate([rng.uniform(0.05, 1.0, 1500), pareto(rng, 2.5, 1.0, 1500)])
    fit = spectral.power_law_fit(jnp.asarray(rng.permutation(x)))
    assert abs(float(fit.alpha) - 2.5) <= 0.15
    assert 0.9 <= float(fit.xmin) <= 1.6


@pytest.mark.parametrize("case", ["lognormal", "ties_and_zeros", "short"])
def test_fit_agrees_with_independent_numpy(x64, rng, case):
    if case == "lognormal":
        x = rng.lognormal(0.0, 1.5, 300)
    elif case == "ties_and_zeros":
        x = np.concatenate([np.round(rng.lognormal(0.0, 1.0, 200), 1), np.zeros(20)])
    else:
        x = rng.exponential(1.0, 9)
    fit = spectral.power_law_fit(jnp.asarray(x), min_tail=3)
    ref = numpy_clauset_fit(x, 3, x.size * np.finfo(np.float64).eps)
    for name, value in ref.items():
        assert float(getattr(fit, name)) == pytest.approx(value, rel=1e-9), name


def test_fit_in_float32_agrees(rng):
    x = rng.lognormal(0.0, 1.0, 500)
    fit = spectral.power_law_fit(jnp.asarray(x, jnp.float32))
    ref = numpy_clauset_fit(x.astype(np.float32), 5, 500 * np.finfo(np.float32).eps)
    assert fit.alpha.dtype == jnp.float32
    assert float(fit.alpha) == pytest.approx(ref["alpha"], rel=1e-3)
    assert int(fit.num_tail) == ref["num_tail"]


def test_esd_matches_gram_eigenvalues(x64, rng):
    w = rng.normal(size=(30, 12))
    ref = np.sort(np.linalg.eigvalsh(w.T @ w / 30))[::-1]
    np.testing.assert_allclose(spectral.esd(jnp.asarray(w)), ref, rtol=1e-10)
    np.testing.assert_allclose(spectral.esd(jnp.asarray(w.T)), ref, rtol=1e-10)
    a, b = rng.normal(size=(3, 12)), rng.normal(size=(30, 3))
    dw = 0.5 * (b @ a).T
    np.testing.assert_allclose(spectral.esd(a=jnp.asarray(a), b=jnp.asarray(b), scale=0.5),
                               np.linalg.svd(dw, compute_uv=False)[:3] ** 2 / 30, rtol=1e-10)


def test_marchenko_pastur_bulk_and_spikes(x64, rng):
    n, m, sigma = 600, 200, 0.5
    noise = rng.normal(size=(n, m)) * sigma
    u, _ = np.linalg.qr(rng.normal(size=(n, 3)))
    v, _ = np.linalg.qr(rng.normal(size=(m, 3)))
    spiked = noise + (u * np.array([60.0, 45.0, 30.0])) @ v.T
    rep = spectral.heavy_tail_report({"noise": jnp.asarray(noise), "spiked": jnp.asarray(spiked)})
    rows = {r["name"]: r for r in rep.rows()}
    edge = sigma**2 * (1 + np.sqrt(m / n)) ** 2
    assert float(spectral.marchenko_pastur_edge(sigma**2, n / m)) == pytest.approx(edge)
    for name in ("noise", "spiked"):
        assert rows[name]["mp_sigma2"] == pytest.approx(sigma**2, rel=0.05), name
        assert rows[name]["mp_edge"] == pytest.approx(edge, rel=0.05), name
    assert rows["noise"]["num_spikes"] <= 2
    assert rows["noise"]["lambda_max"] == pytest.approx(edge, rel=0.1)
    assert rows["spiked"]["num_spikes"] == 3
    assert rows["spiked"]["num_eigenvalues"] == m and rows["spiked"]["shape"] == (n, m)


def test_report_from_factors_matches_dense_update(x64, rng):
    a, b, scale = rng.normal(size=(6, 40)), rng.normal(size=(90, 6)), 0.25
    dense = spectral.heavy_tail_report({"dw": jnp.asarray(scale * (b @ a).T)}, min_tail=3)
    fact = spectral.heavy_tail_report(factors={"dw": (jnp.asarray(a), jnp.asarray(b), scale)},
                                      min_tail=3)
    for c in ("alpha", "xmin", "ks_distance", "lambda_max", "mp_sigma2", "mp_edge"):
        np.testing.assert_allclose(getattr(fact, c), getattr(dense, c), rtol=1e-8, atol=1e-14)
    assert int(fact.num_spikes[0]) == int(dense.num_spikes[0]) == 6
    assert int(fact.num_tail[0]) == int(dense.num_tail[0])
    assert fact.shapes == dense.shapes == ((40, 90),)


def test_report_stacks_names_and_jit(rng):
    params = {"blocks": jnp.asarray(rng.normal(size=(2, 16, 24)), jnp.float32),
              "bias": jnp.zeros(24, jnp.float32), "w": jnp.asarray(rng.normal(size=(24, 8)),
                                                                   jnp.float32)}
    rep = spectral.heavy_tail_report(params)
    assert rep.names == ("blocks[0]", "blocks[1]", "w")
    assert rep.num_eigenvalues == (16, 16, 8)
    jitted = jax.jit(spectral.heavy_tail_report)(params)
    np.testing.assert_allclose(jitted.alpha, rep.alpha, rtol=1e-5)
    single = spectral.heavy_tail_report({"b1": params["blocks"][1]})
    assert float(single.alpha[0]) == pytest.approx(float(rep.alpha[1]), rel=1e-5)
    table = str(rep)
    assert "blocks[1]" in table and "spikes" in table and rep.alpha.dtype == jnp.float32


def test_bad_inputs(rng):
    with pytest.raises(ValueError, match="NaN or inf"):
        spectral.heavy_tail_report({"w": jnp.array([[1.0, jnp.nan], [0.0, 1.0]])})
    with pytest.raises(ValueError, match="no matrices"):
        spectral.heavy_tail_report({"b": jnp.ones(3)})
    with pytest.raises(ValueError, match="min_tail must be >= 2"):
        spectral.power_law_fit(jnp.ones(5), min_tail=1)
    with pytest.raises(ValueError, match=r"eigenvalues must have rank 1|\(n,\)"):
        spectral.power_law_fit(jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="same r"):
        spectral.heavy_tail_report(factors={"x": (jnp.ones((2, 5)), jnp.ones((4, 3)), 1.0)})
    with pytest.raises(ValueError, match="triple"):
        spectral.heavy_tail_report(factors={"x": (jnp.ones((2, 5)), jnp.ones((4, 2)))})
    with pytest.raises(ValueError, match="aspect"):
        spectral.marchenko_pastur_edge(1.0, 0.5)
    # Too few distinct positive values for any tail: NaN, not a made-up exponent.
    fit = spectral.power_law_fit(jnp.array([0.0, 1.0, 1.0, 2.0]))
    assert np.isnan(float(fit.alpha)) and int(fit.num_tail) == 0


def test_report_from_adapter_objects_and_stacks(x64, rng):
    class Adapter:  # duck-typed like jaxla.lora.Adapter
        def __init__(self, a, b, scale):
            self.a, self.b, self.scale = a, b, scale

    a, b = jnp.asarray(rng.normal(size=(2, 4, 20))), jnp.asarray(rng.normal(size=(2, 30, 4)))
    stacked = spectral.heavy_tail_report(factors={"layers/w": Adapter(a, b, 0.5)}, min_tail=3)
    assert stacked.names == ("layers/w[0]", "layers/w[1]")
    one = spectral.heavy_tail_report(factors={"x": (a[1], b[1], 0.5)}, min_tail=3)
    np.testing.assert_allclose(stacked.lambda_max[1], one.lambda_max[0], rtol=1e-12)
    with pytest.raises(ValueError, match="leading"):
        spectral.heavy_tail_report(factors={"x": (a, b[:1], 0.5)})
