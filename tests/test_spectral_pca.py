"""PCA vs an independent NumPy implementation of scikit-learn's definitions, and vs scikit-learn."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxla import spectral


def np_pca(x, n_components=None):
    """scikit-learn's PCA(svd_solver='full') quantities, written from its documented definitions."""
    n, d = x.shape
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    # Sign rule of sklearn 1.9 (svd_flip, u_based_decision=False): the largest-|.| entry of each
    # component (row of vt) is positive.
    signs = np.sign(vt[np.arange(len(vt)), np.argmax(np.abs(vt), axis=1)])
    vt = vt * signs[:, None]
    ev = s**2 / (n - 1)
    ratio = ev / ev.sum()
    if n_components is None:
        c = min(n, d)
    elif isinstance(n_components, float):
        c = int(np.searchsorted(np.cumsum(ratio), n_components, side="right")) + 1
    else:
        c = n_components
    noise = ev[c:].mean() if c < min(n, d) else 0.0
    return dict(mean=mean, components=vt[:c], explained_variance=ev[:c],
                explained_variance_ratio=ratio[:c], singular_values=s[:c], noise_variance=noise)


def embeddings(rng, n=40, d=8):
    scales = np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.3, 0.2, 0.1])[:d]
    return rng.normal(size=(n, d)) * scales @ np.linalg.qr(rng.normal(size=(d, d)))[0] + 2.0


@pytest.mark.parametrize("n_components", [None, 3, 0.9])
def test_pca_matches_numpy_definitions(x64, rng, n_components):
    x = embeddings(rng)
    fit = spectral.pca(jnp.asarray(x), n_components, solver="full")
    ref = np_pca(x, n_components)
    for name, value in ref.items():
        np.testing.assert_allclose(getattr(fit, name), value, rtol=1e-10, atol=1e-12,
                                   err_msg=name)
    z = np.asarray(spectral.pca_transform(fit, x))
    np.testing.assert_allclose(z, (x - ref["mean"]) @ ref["components"].T, rtol=1e-10, atol=1e-10)
    back = spectral.pca_inverse_transform(fit, z)
    np.testing.assert_allclose(back, z @ ref["components"] + ref["mean"], rtol=1e-10)


def test_whiten_roundtrip_and_unit_variance(x64, rng):
    x = embeddings(rng)
    fit = spectral.pca(jnp.asarray(x), 8, whiten=True)
    z = np.asarray(spectral.pca_transform(fit, x))
    np.testing.assert_allclose(np.var(z, axis=0, ddof=1), 1.0, rtol=1e-10)
    np.testing.assert_allclose(spectral.pca_inverse_transform(fit, z), x, rtol=1e-10)
    assert fit.whiten and fit.n_components == 8


def test_against_scikit_learn(x64, rng, key):
    decomposition = pytest.importorskip("sklearn.decomposition")
    x = embeddings(rng, n=60)
    for n_components, whiten in [(4, False), (0.95, True), (None, False)]:
        sk = decomposition.PCA(n_components, whiten=whiten, svd_solver="full").fit(x)
        fit = spectral.pca(jnp.asarray(x), n_components, whiten=whiten, solver="full")
        np.testing.assert_allclose(fit.components, sk.components_, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(fit.explained_variance_ratio, sk.explained_variance_ratio_,
                                   rtol=1e-9)
        np.testing.assert_allclose(fit.noise_variance, sk.noise_variance_, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(spectral.pca_transform(fit, x[:5]), sk.transform(x[:5]),
                                   rtol=1e-8, atol=1e-10)
    # Randomized solver on a decaying spectrum agrees with scikit-learn's exact answer.
    sk = decomposition.PCA(3, svd_solver="full").fit(x)
    fit = spectral.pca(jnp.asarray(x), 3, solver="randomized", key=key)
    np.testing.assert_allclose(fit.components, sk.components_, atol=1e-6)
    np.testing.assert_allclose(fit.explained_variance_ratio, sk.explained_variance_ratio_,
                               rtol=1e-8)
    np.testing.assert_allclose(fit.noise_variance, sk.noise_variance_, rtol=1e-8)


def test_pca_under_jit_and_float32(rng):
    x = jnp.asarray(embeddings(rng), jnp.float32)
    fit = jax.jit(lambda a: spectral.pca(a, 2))(x)
    z = jax.jit(spectral.pca_transform)(fit, x)
    assert z.shape == (40, 2) and z.dtype == jnp.float32
    ref = np_pca(np.asarray(x, np.float64), 2)
    np.testing.assert_allclose(fit.explained_variance, ref["explained_variance"], rtol=1e-4)
    with pytest.raises(ValueError, match="jit"):
        jax.jit(lambda a: spectral.pca(a, 0.5))(x)


def test_rank_deficient_whitening_is_finite(x64, rng):
    x = np.repeat(rng.normal(size=(10, 1)), 3, axis=1)  # rank 1
    fit = spectral.pca(jnp.asarray(x), 3, whiten=True)
    assert np.all(np.isfinite(np.asarray(spectral.pca_transform(fit, x))))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n_components": 0}, ValueError, "between 1"),
        ({"n_components": 9}, ValueError, "between 1"),
        ({"n_components": 1.0}, ValueError, r"\(0, 1\)"),
        ({"n_components": -0.2}, ValueError, r"\(0, 1\)"),
        ({"n_components": "mle"}, TypeError, "n_components"),
        ({"n_components": True}, TypeError, "n_components"),
        ({"solver": "arpack"}, ValueError, "solver"),
        ({"solver": "randomized"}, ValueError, "key"),
        ({"n_components": 0.5, "solver": "randomized", "key": 0}, ValueError, "full"),
    ],
)
def test_bad_pca_options(rng, kwargs, error, match):
    with pytest.raises(error, match=match):
        spectral.pca(rng.normal(size=(20, 8)), **kwargs)


def test_bad_data(rng):
    with pytest.raises(ValueError, match="2 samples"):
        spectral.pca(np.ones((1, 3)))
    with pytest.raises(ValueError, match="rank 2"):
        spectral.pca(np.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        spectral.pca(np.array([[1.0, np.nan], [0.0, 1.0]]))
    fit = spectral.pca(rng.normal(size=(10, 4)), 2)
    with pytest.raises(ValueError, match="features"):
        spectral.pca_transform(fit, np.ones((3, 5)))
    with pytest.raises(ValueError, match="components"):
        spectral.pca_inverse_transform(fit, np.ones((3, 3)))
    with pytest.raises(TypeError, match="PCAResult"):
        spectral.pca_transform({"mean": 0}, np.ones((3, 4)))
