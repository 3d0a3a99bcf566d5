"""Linear layers, the feed-forward block and norms against float64 NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxla
from jaxla.benchmarks import specs_linear


def test_seed_fragment_a13(rng):
    """X (4, 768) @ W (768, 3072) + b (3072,) → (4, 3072), equal to NumPy."""
    batch, d_in, d_out = specs_linear.SEED_FRAGMENT
    x = rng.standard_normal((batch, d_in)).astype(np.float32)
    w = rng.standard_normal((d_in, d_out)).astype(np.float32)
    b = rng.standard_normal((d_out,)).astype(np.float32)
    y = jaxla.linear({"w": jnp.asarray(w), "b": jnp.asarray(b)}, jnp.asarray(x),
                     precision=jax.lax.Precision.HIGHEST)
    assert y.shape == (4, 3072) and y.dtype == jnp.float32
    ref = x.astype(np.float64) @ w.astype(np.float64) + b
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-3)


def test_init_linear_defaults_and_options(key):
    p = jaxla.init_linear(key, 768, 3072)
    assert p["w"].shape == (768, 3072) and p["b"].shape == (3072,)
    assert p["w"].dtype == jnp.float32 and np.all(np.asarray(p["b"]) == 0)
    # LeCun normal: variance 1/d_in.
    assert abs(float(jnp.var(p["w"])) * 768 - 1.0) < 0.05
    q = jaxla.init_linear(key, 4, 3, use_bias=False, kernel_init=jax.nn.initializers.ones,
                          dtype=jnp.bfloat16)
    assert set(q) == {"w"} and q["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(q["w"], np.float32), 1.0)
    r = jaxla.init_linear(key, 64, 8, kernel_init=jax.nn.initializers.glorot_uniform())
    assert float(jnp.abs(r["w"]).max()) <= np.sqrt(6 / 72) + 1e-6


def test_linear_leading_dims_and_no_bias(rng, key):
    p = jaxla.init_linear(key, 16, 5, use_bias=False)
    x = rng.standard_normal((2, 3, 16)).astype(np.float32)
    y = jaxla.linear(p, jnp.asarray(x), precision="highest")
    np.testing.assert_allclose(y, x @ np.asarray(p["w"], np.float64), rtol=1e-5, atol=1e-5)


def test_bf16_compute_accumulates_in_f32(rng):
    d_in = 4096
    x = jnp.asarray(rng.standard_normal((2, d_in)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((d_in, 3)) / 64, jnp.bfloat16)
    y = jaxla.linear({"w": w}, x)
    assert y.dtype == jnp.bfloat16
    exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    # Rounded once to bf16 from an f32 sum: within a couple of bf16 ulps of the exact value.
    np.testing.assert_allclose(np.asarray(y, np.float64), exact, rtol=2**-7, atol=2e-2)
    # f32 output from bf16 compute keeps the f32 accumulator.
    y32 = jaxla.linear({"w": w}, x, preferred_element_type=jnp.float32)
    assert y32.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y32, np.float64), exact, rtol=1e-4, atol=1e-3)


def test_param_dtype_separate_from_compute_dtype(rng, key):
    p = jaxla.init_linear(key, 8, 4, dtype=jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((3, 8)), jnp.float32)
    assert jaxla.linear(p, x).dtype == jnp.float32  # bf16 params promote with f32 input
    assert jaxla.linear(p, x, dtype=jnp.bfloat16).dtype == jnp.bfloat16


def test_mlp_plain_and_gated(rng, key):
    x = rng.standard_normal((2, 5, 12))
    p = jaxla.init_mlp(key, 12, 48)
    y = jaxla.mlp(p, jnp.asarray(x, jnp.float32), precision="highest")
    w1, b1 = np.asarray(p["up"]["w"], np.float64), np.asarray(p["up"]["b"], np.float64)
    w2, b2 = np.asarray(p["down"]["w"], np.float64), np.asarray(p["down"]["b"], np.float64)
    h = x @ w1 + b1
    gelu = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
    np.testing.assert_allclose(y, gelu @ w2 + b2, rtol=1e-4, atol=1e-5)

    g = jaxla.init_mlp(key, 12, 32, gated=True, use_bias=False, d_out=7)
    y = jaxla.mlp(g, jnp.asarray(x, jnp.float32), precision="highest")
    assert y.shape == (2, 5, 7)
    gate = x @ np.asarray(g["gate"]["w"], np.float64)
    up = x @ np.asarray(g["up"]["w"], np.float64)
    ref = (gate / (1 + np.exp(-gate)) * up) @ np.asarray(g["down"]["w"], np.float64)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)


def test_norms_and_embedding(rng, key):
    x = rng.standard_normal((3, 10)) * 5 + 2
    p = {"scale": jnp.asarray(rng.standard_normal(10), jnp.float32),
         "bias": jnp.asarray(rng.standard_normal(10), jnp.float32)}
    y = jaxla.layer_norm(p, jnp.asarray(x, jnp.float32), eps=1e-6)
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    ref = (x - mu) / np.sqrt(var + 1e-6) * np.asarray(p["scale"]) + np.asarray(p["bias"])
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
    r = jaxla.rms_norm({"scale": p["scale"]}, jnp.asarray(x, jnp.float32))
    ref = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) * np.asarray(p["scale"])
    np.testing.assert_allclose(r, ref, rtol=1e-4, atol=1e-5)
    ln = jaxla.init_layer_norm(10)
    assert set(ln) == {"scale", "bias"}
    e = jaxla.init_embedding(key, 11, 4)
    out = jaxla.embed(e, jnp.array([[0, 10], [3, 3]]))
    assert out.shape == (2, 2, 4)
    np.testing.assert_array_equal(out[1, 0], e["table"][3])


def test_jit_vmap_grad(rng, key):
    p = jaxla.init_mlp(key, 8, 16)
    x = jnp.asarray(rng.standard_normal((6, 8)), jnp.float32)
    direct = jaxla.mlp(p, x)
    np.testing.assert_allclose(jax.jit(jaxla.mlp)(p, x), direct, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.vmap(lambda r: jaxla.mlp(p, r))(x), direct, rtol=1e-5, atol=1e-6)
    grads = jax.jit(jax.grad(lambda q: jnp.sum(jaxla.mlp(q, x) ** 2)))(p)
    assert jax.tree.structure(grads) == jax.tree.structure(p)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


@pytest.mark.usefixtures("x64")
def test_check_grads_float64(rng):
    x = jnp.asarray(rng.standard_normal((3, 6)))
    p = {"w": jnp.asarray(rng.standard_normal((6, 4))), "b": jnp.asarray(rng.standard_normal(4))}
    check_grads(jax.jit(lambda p, x: jaxla.linear(p, x)), (p, x), order=1, modes=("fwd", "rev"))
    m = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), jaxla.init_mlp(jax.random.key(1), 6, 10))
    check_grads(jax.jit(lambda m, x: jaxla.mlp(m, x)), (m, x), order=1, modes=("rev",))
    ln = {"scale": jnp.asarray(rng.standard_normal(6)), "bias": jnp.asarray(rng.standard_normal(6))}
    check_grads(jax.jit(lambda ln, x: jaxla.layer_norm(ln, x)), (ln, x), order=1, modes=("rev",))
    check_grads(jax.jit(lambda ln, x: jaxla.rms_norm(ln, x)), ({"scale": ln["scale"]}, x), order=1,
                modes=("rev",))


def test_bad_input(key):
    p = jaxla.init_linear(key, 768, 3072)
    with pytest.raises(ValueError, match=r"x's last dimension 512 does not match W's d_in 768"):
        jaxla.linear(p, jnp.ones((4, 512), jnp.float32))
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        jaxla.linear(p, jnp.ones((4, 768), jnp.int32))
    with pytest.raises(ValueError, match=r'params\["w"\] must have rank 2'):
        jaxla.linear({"w": jnp.ones((3,), jnp.float32)}, jnp.ones((4, 3), jnp.float32))
    with pytest.raises(ValueError, match=r'params\["b"\] must have shape'):
        jaxla.linear({"w": jnp.ones((3, 2), jnp.float32), "b": jnp.ones((3,), jnp.float32)},
                     jnp.ones((4, 3), jnp.float32))
    with pytest.raises(TypeError, match='must be a dict with "w"'):
        jaxla.linear(jnp.ones((3, 2)), jnp.ones((4, 3), jnp.float32))
    with pytest.raises(ValueError, match="d_in must be > 0, got -3"):
        jaxla.init_linear(key, -3, 4)
    with pytest.raises(ValueError, match="d_out must be > 0, got 0"):
        jaxla.init_linear(key, 3, 0)
    with pytest.raises(TypeError, match="d_in must be an int"):
        jaxla.init_linear(key, 3.5, 4)
    with pytest.raises(TypeError, match="dtype must be a floating dtype"):
        jaxla.init_linear(key, 3, 4, dtype=jnp.int32)
    with pytest.raises(TypeError, match='"up" and "down"'):
        jaxla.mlp({"w": 1}, jnp.ones((2, 3), jnp.float32))
    with pytest.raises(ValueError, match=r'params\["scale"\] must have shape'):
        jaxla.layer_norm({"scale": jnp.ones(4)}, jnp.ones((2, 3), jnp.float32))
    with pytest.raises(TypeError, match="tokens must have an integer dtype"):
        jaxla.embed({"table": jnp.ones((4, 2))}, jnp.ones((3,), jnp.float32))


def test_non_floating_compute_or_result_dtype_is_rejected(key):
    """An integer dtype would truncate x and W and wrap the sums (issue 16)."""
    p = jaxla.init_linear(key, 4, 3)
    x = jnp.full((2, 4), 0.7, jnp.float32)
    for kwargs, name in (({"dtype": jnp.int32}, "dtype"),
                         ({"preferred_element_type": jnp.int8}, "preferred_element_type"),
                         ({"dtype": jnp.complex64}, "dtype"),
                         ({"dtype": "not a dtype"}, "dtype")):
        with pytest.raises(TypeError, match=f"^{name} must be a floating dtype"):
            jaxla.linear(p, x, **kwargs)
    m = jaxla.init_mlp(key, 4, 8)
    with pytest.raises(TypeError, match=r"^dtype must be a floating dtype"):
        jaxla.mlp(m, x, dtype=jnp.int8)
    with pytest.raises(TypeError, match=r"^dtype must be a floating dtype"):
        jaxla.init_mlp(key, 4, 8, dtype=jnp.int32)
    assert jaxla.linear(p, x, dtype=jnp.bfloat16, preferred_element_type=jnp.float32).dtype == \
        jnp.float32


def test_init_mlp_names_its_own_arguments(key):
    with pytest.raises(ValueError, match=r"^d_hidden must be > 0, got 0"):
        jaxla.init_mlp(key, 4, 0)
    with pytest.raises(ValueError, match=r"^d_model must be > 0, got -1"):
        jaxla.init_mlp(key, -1, 4)
    with pytest.raises(ValueError, match=r"^d_out must be > 0, got 0"):
        jaxla.init_mlp(key, 4, 8, d_out=0)
    with pytest.raises(TypeError, match=r"^d_hidden must be an int"):
        jaxla.init_mlp(key, 4, 8.0)


def test_mlp_width_mismatch_names_both_shapes(key):
    x = jnp.ones((2, 4), jnp.float32)
    m = jaxla.init_mlp(key, 4, 8, gated=True)
    m["gate"] = jaxla.init_linear(key, 4, 6)
    with pytest.raises(ValueError, match=r'gate.*up.*same shape, got up \(4, 8\), gate \(4, 6\)'):
        jaxla.mlp(m, x)
    m = jaxla.init_mlp(key, 4, 8)
    m["down"] = jaxla.init_linear(key, 6, 4)
    with pytest.raises(ValueError, match=r"d_hidden = 8.*got up \(4, 8\), down \(6, 4\)"):
        jaxla.mlp(m, x)


def test_norms_reject_bad_eps_and_integer_dtypes(key):
    x = jnp.ones((2, 4), jnp.float32)
    ln = jaxla.init_layer_norm(4)
    for fn in (jaxla.layer_norm, jaxla.rms_norm):
        with pytest.raises(ValueError, match="eps must be finite and >= 0, got nan"):
            fn(ln, x, eps=float("nan"))
        with pytest.raises(ValueError, match="eps must be finite and >= 0, got -1"):
            fn(ln, x, eps=-1.0)
    with pytest.raises(TypeError, match=r"^dtype must be a floating dtype"):
        jaxla.init_layer_norm(4, dtype=jnp.int32)
    with pytest.raises(TypeError, match=r"^dtype must be a floating dtype"):
        jaxla.init_embedding(key, 10, 4, dtype=jnp.int8)
