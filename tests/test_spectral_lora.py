"""LoRA rank suggestion and the adapter report, from ΔW or from the (a, b, scale) factors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxla import spectral


def with_spectrum(rng, m, n, s):
    u, _ = np.linalg.qr(rng.normal(size=(m, len(s))))
    v, _ = np.linalg.qr(rng.normal(size=(n, len(s))))
    return (u * np.asarray(s)) @ v.T, u, v


def test_suggest_rank_energy(x64, rng):
    dw, _, _ = with_spectrum(rng, 8, 6, [3.0, 2.0, 1.0])
    # energies 9, 4, 1 of 14: 9/14 = 0.64, 13/14 = 0.93, 14/14 = 1.
    assert int(spectral.suggest_rank(dw, energy=0.5)) == 1
    assert int(spectral.suggest_rank(dw, energy=0.9)) == 2
    assert int(spectral.suggest_rank(dw, energy=1.0)) == 3
    assert int(spectral.suggest_rank(jnp.zeros((4, 4)))) == 0
    batched = spectral.suggest_rank(np.stack([dw, dw[:, ::-1]]), energy=0.9)
    np.testing.assert_array_equal(batched, [2, 2])


def test_report_from_factors_equals_report_from_delta(x64, rng):
    d_in, d_out, r, scale = 9, 7, 3, 0.5
    w = rng.normal(size=(d_in, d_out))
    a = rng.normal(size=(r, d_in))
    b = rng.normal(size=(d_out, r))
    dw = scale * (b @ a).T
    from_factors = spectral.adapter_report(w, a=a, b=b, scale=scale, top_k=2)
    from_delta = spectral.adapter_report(w, delta_w=dw, top_k=2)
    s_ref = np.linalg.svd(dw, compute_uv=False)
    np.testing.assert_allclose(from_factors.singular_values, s_ref[:r], rtol=1e-10)
    np.testing.assert_allclose(from_delta.singular_values[:r], s_ref[:r], rtol=1e-10)
    for field in ("input_cosines", "output_cosines", "amplification", "relative_norm",
                  "stable_rank"):
        np.testing.assert_allclose(getattr(from_factors, field), getattr(from_delta, field),
                                   rtol=1e-8, atol=1e-10, err_msg=field)
    np.testing.assert_allclose(from_delta.relative_norm, np.linalg.norm(dw) / np.linalg.norm(w),
                               rtol=1e-12)
    # Amplification (Hu et al. 2021): ‖ΔW‖_F / ‖U_qᵀ W V_q‖_F with ΔW's top-2 singular vectors.
    u, _, vt = np.linalg.svd(dw)
    amp = np.linalg.norm(dw) / np.linalg.norm(u[:, :2].T @ w @ vt[:2].T)
    np.testing.assert_allclose(from_factors.amplification, amp, rtol=1e-8)
    text = str(from_factors)
    assert "suggested rank" in text and "amplification" in text


def test_alignment_cosines(x64, rng):
    w, uw, vw = with_spectrum(rng, 10, 8, [5.0, 4.0, 1.0, 0.5, 0.2])
    aligned = 0.1 * uw[:, :2] @ np.diag([2.0, 1.0]) @ vw[:, :2].T
    rep = spectral.adapter_report(w, delta_w=aligned, top_k=2)
    np.testing.assert_allclose(rep.input_cosines, [1.0, 1.0], atol=1e-8)
    np.testing.assert_allclose(rep.output_cosines, [1.0, 1.0], atol=1e-8)
    # An update living in W's weakest directions: orthogonal to W's top-2 subspaces.
    weak = 0.1 * np.outer(uw[:, 4], vw[:, 4]) + 0.05 * np.outer(uw[:, 3], vw[:, 3])
    rep = spectral.adapter_report(w, delta_w=weak, top_k=2)
    np.testing.assert_allclose(rep.input_cosines, [0.0, 0.0], atol=1e-8)
    # U_qᵀ W V_q = diag(0.2, 0.5) on those directions.
    expected = np.hypot(0.1, 0.05) / np.hypot(0.2, 0.5)
    assert float(rep.amplification) == pytest.approx(expected, rel=1e-8)


def test_report_jit_and_float32(rng):
    w = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
    a = jnp.asarray(rng.normal(size=(2, 6)), jnp.bfloat16)
    b = jnp.asarray(rng.normal(size=(5, 2)), jnp.bfloat16)
    rep = jax.jit(lambda w, a, b: spectral.adapter_report(w, a=a, b=b, scale=2.0))(w, a, b)
    assert rep.singular_values.shape == (2,) and rep.singular_values.dtype == jnp.float32
    assert rep.energy == 0.9
    zero = spectral.adapter_report(w, delta_w=jnp.zeros((6, 5)))
    assert float(zero.amplification) == 0.0 and int(zero.suggested_rank) == 0


def test_bad_input(rng):
    w = rng.normal(size=(6, 5))
    with pytest.raises(ValueError, match="energy"):
        spectral.suggest_rank(w, energy=0.0)
    with pytest.raises(ValueError, match="energy"):
        spectral.suggest_rank(w, energy=1.5)
    with pytest.raises(ValueError, match="either"):
        spectral.adapter_report(w, delta_w=w, a=np.ones((2, 6)), b=np.ones((5, 2)))
    with pytest.raises(ValueError, match="pass delta_w"):
        spectral.adapter_report(w)
    with pytest.raises(ValueError, match="d_in, d_out"):
        spectral.adapter_report(w, delta_w=w.T)
    with pytest.raises(ValueError, match=r"a \(r, d_in\)"):
        spectral.adapter_report(w, a=np.ones((2, 5)), b=np.ones((6, 2)))
    with pytest.raises(ValueError, match="top_k"):
        spectral.adapter_report(w, delta_w=w, top_k=0)
    with pytest.raises(ValueError, match="NaN"):
        spectral.adapter_report(w, delta_w=np.full((6, 5), np.nan))


def _angles64(q1, q2):
    """Principal angles in float64 from the sines (accurate for small angles)."""
    c = q1.T @ q2
    s = np.linalg.svd(q2 - q1 @ c, compute_uv=False)
    return np.sort(np.arcsin(np.clip(s, 0, 1)))


def test_report_against_a_reference_update(x64, rng):
    d_in, d_out, k = 12, 9, 3
    u, _ = np.linalg.qr(rng.normal(size=(d_in, k)))
    v, _ = np.linalg.qr(rng.normal(size=(d_out, k)))
    sigma = np.array([2.0, 1.5, 1.0])
    truth = (u * sigma) @ v.T
    # A learned update close to the truth: a small perturbation of its factors.
    a = (u + 1e-3 * rng.normal(size=u.shape)).T        # (k, d_in)
    b = v * sigma + 1e-3 * rng.normal(size=v.shape)    # (d_out, k)
    dw = a.T @ b.T
    want_err = np.linalg.norm(dw - truth) / np.linalg.norm(truth)
    uw, _, vwt = np.linalg.svd(dw)
    want_in = _angles64(uw[:, :k], u)
    want_out = _angles64(vwt[:k].T, v)
    dense = spectral.adapter_report(None, a=a, b=b, scale=1.0, top_k=k, reference=truth)
    factored = spectral.adapter_report(None, a=a, b=b, scale=1.0, top_k=k,
                                       reference=(u.T, v * sigma, 1.0))
    for rep in (dense, factored):
        np.testing.assert_allclose(rep.reference_relative_error, want_err, rtol=1e-8)
        np.testing.assert_allclose(rep.reference_input_angles, want_in, rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(rep.reference_output_angles, want_out, rtol=1e-6, atol=1e-12)
        assert rep.relative_norm is None and rep.input_cosines is None
    assert "angles to ref" in str(factored) and "cosines with W" not in str(factored)
    # With w the report still compares with W as before.
    w = rng.normal(size=(d_in, d_out))
    with_w = spectral.adapter_report(w, a=a, b=b, scale=1.0, top_k=k, reference=truth)
    plain = spectral.adapter_report(w, a=a, b=b, scale=1.0, top_k=k)
    np.testing.assert_allclose(with_w.input_cosines, plain.input_cosines, rtol=1e-12)
    assert plain.reference_relative_error is None


def test_small_angles_survive_float32(rng):
    """arccos of a float32 cosine rounds angles below ~0.02° to 0; the report keeps them."""
    d, k = 64, 2
    q, _ = np.linalg.qr(rng.normal(size=(d, 2 * k)))
    theta = np.radians([0.003, 0.01])
    rotated = q[:, :k] * np.cos(theta) + q[:, k:] * np.sin(theta)
    a = jnp.asarray(rotated.T, jnp.float32)
    b = jnp.asarray(np.eye(k) * [2.0, 1.0], jnp.float32)[:, :]  # d_out = k
    ref = (jnp.asarray(q[:, :k].T, jnp.float32), b, 1.0)
    rep = jax.jit(lambda a, b: spectral.adapter_report(None, a=a, b=b, reference=ref))(a, b)
    assert rep.reference_input_angles.dtype == jnp.float32
    np.testing.assert_allclose(np.degrees(rep.reference_input_angles), [0.003, 0.01], rtol=0.02)


def test_bad_reference(rng):
    a, b = rng.normal(size=(2, 6)), rng.normal(size=(5, 2))
    with pytest.raises(ValueError, match="reference"):
        spectral.adapter_report(None, a=a, b=b, reference=np.ones((5, 6)))
    with pytest.raises(ValueError, match="tuple"):
        spectral.adapter_report(None, a=a, b=b, reference=(a, b))
