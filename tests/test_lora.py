"""jaxla.lora core: init, linear, merge/unmerge, wrap, stacking axes, PiSSA, accounting, batching."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxla
from jaxla import lora
from jaxla.benchmarks import specs_lora


def _f64(x):
    return np.asarray(x).astype(np.float64)


def _randomise_b(key, adapters, scale=0.5):
    """Adapters with a nonzero b, so the update is visible."""
    g = np.random.default_rng(int(np.asarray(jax.random.key_data(key)).sum()) % 2**31)
    return {k: dataclasses.replace(ad, b=jnp.asarray(scale * g.standard_normal(np.shape(ad.b)),
                                                     jnp.result_type(ad.b)))
            for k, ad in sorted(adapters.items())}


def _np_delta(ad):
    """ΔW from the documented convention, in float64 NumPy."""
    a, b = _f64(ad.a), _f64(ad.b)
    prod = np.einsum("...or,...ri->...oi", b, a)
    return ad.scale * (prod if ad.out_in else np.swapaxes(prod, -1, -2))


def _dense(seed, d_in, d_out, dtype=jnp.float32):
    """Linear-layer params from NumPy (no per-shape compilation of random ops)."""
    g = np.random.default_rng(seed)
    return {"w": jnp.asarray(g.standard_normal((d_in, d_out)) / np.sqrt(d_in), dtype),
            "b": jnp.asarray(0.1 * g.standard_normal(d_out), dtype)}


def _two_layer(seed=0, d_in=6, d_hidden=10, d_out=4, dtype=jnp.float32):
    return {"up": _dense(seed, d_in, d_hidden, dtype), "down": _dense(seed + 1, d_hidden, d_out, dtype)}


def _two_layer_apply(params, x):
    return jaxla.linear(params["down"], jax.nn.gelu(jaxla.linear(params["up"], x)))


# --- conventions -------------------------------------------------------------------------------


def test_init_shapes_scale_and_zero_b(key):
    params = _two_layer()
    ad = lora.init(key, params, rank=3, alpha=6.0, targets="w")
    assert sorted(ad) == ["down/w", "up/w"]
    assert ad["up/w"].a.shape == (3, 6) and ad["up/w"].b.shape == (10, 3)
    assert ad["down/w"].a.shape == (3, 10) and ad["down/w"].b.shape == (4, 3)
    assert ad["up/w"].scale == 2.0 and ad["up/w"].rank == 3
    assert not np.any(np.asarray(ad["up/w"].b))
    rs = lora.init(key, params, rank=4, alpha=6.0, targets="up/w", rslora=True)
    assert rs["up/w"].scale == pytest.approx(3.0)
    # Only a and b are pytree leaves; the scale stays static.
    assert len(jax.tree_util.tree_leaves(ad)) == 4


def test_initialisers_statistics(key):
    w = {"w": jnp.zeros((400, 300), jnp.bfloat16)}
    g = lora.init(key, w, rank=4, alpha=1.0, targets="w")["w"]
    k = lora.init(key, w, rank=4, alpha=1.0, targets="w", init="kaiming")["w"]
    assert g.a.dtype == jnp.float32  # adapters default to float32 for low-precision weights
    assert np.std(np.asarray(g.a)) == pytest.approx(1 / 4, rel=0.05)
    bound = 1 / np.sqrt(400)
    assert np.abs(np.asarray(k.a)).max() <= bound
    assert np.abs(np.asarray(k.a)).max() > 0.95 * bound


def test_rank_and_alpha_patterns_and_callable_targets(key):
    params = _two_layer()
    ad = lora.init(key, params, rank=2, alpha=4.0, targets=["up/w", "down/w"],
                   rank_pattern={"down/w": 4}, alpha_pattern={"up/w": 1.0})
    assert ad["up/w"].rank == 2 and ad["up/w"].alpha == 1.0
    assert ad["down/w"].rank == 4 and ad["down/w"].alpha == 4.0
    picked = lora.init(key, params, rank=2, alpha=1.0,
                       targets=lambda path, leaf: jnp.ndim(leaf) == 2 and leaf.shape[1] == 4)
    assert list(picked) == ["down/w"]


@pytest.mark.parametrize("shape", specs_lora.TEST_LINEAR)
def test_linear_matches_float64_reference(key, rng, shape, x64):
    batch, d_in, d_out, r = shape
    params = {"w": rng.standard_normal((d_in, d_out)), "b": rng.standard_normal(d_out)}
    params = jax.tree.map(jnp.asarray, params)
    ad = lora.init(key, params, rank=r, alpha=3.0, targets="w")["w"]
    ad = dataclasses.replace(ad, b=jnp.asarray(rng.standard_normal((d_out, r))))
    x = rng.standard_normal((batch, d_in))
    expected = x @ (np.asarray(params["w"]) + _np_delta(ad)) + np.asarray(params["b"])
    np.testing.assert_allclose(lora.linear(params, ad, jnp.asarray(x)), expected, rtol=1e-12,
                               atol=1e-12)
    x32 = jnp.asarray(x, jnp.float32)
    p32 = jax.tree.map(lambda v: v.astype(jnp.float32), params)
    ad32 = jax.tree.map(lambda v: v.astype(jnp.float32), ad)
    np.testing.assert_allclose(lora.linear(p32, ad32, x32), expected, rtol=1e-4, atol=1e-4)


def test_zero_b_is_bitwise_identity(key, rng):
    params = _two_layer()
    ad = lora.init(key, params, rank=2, alpha=8.0, targets="w")
    x = jnp.asarray(rng.standard_normal((5, 6)), jnp.float32)
    assert np.array_equal(lora.linear(params["up"], ad["up/w"], x), jaxla.linear(params["up"], x))
    wrapped = lora.wrap(_two_layer_apply)
    assert np.array_equal(wrapped(params, ad, x), _two_layer_apply(params, x))
    merged, err = lora.merge(params, ad)
    assert float(err) == 0.0
    assert all(np.array_equal(u, v) for u, v in zip(jax.tree.leaves(merged),
                                                     jax.tree.leaves(params), strict=True))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 5e-2)])
def test_merged_equals_unmerged(key, rng, dtype, tol):
    """bf16 tolerance: merged W is rounded to bf16 (rel. 2^-8) before the product, unmerged is not."""
    params = jax.tree.map(lambda v: v.astype(dtype), _dense(0, 16, 24))
    ad = _randomise_b(key, lora.init(key, params, rank=4, alpha=8.0, targets="w"), scale=0.1)
    x = jnp.asarray(rng.standard_normal((7, 16)), dtype)
    merged, err = lora.merge(params, ad)
    assert merged["w"].dtype == dtype
    unmerged = lora.linear(params, ad["w"], x)
    out = jaxla.linear(merged, x)
    np.testing.assert_allclose(_f64(out), _f64(unmerged), rtol=tol, atol=tol)
    # The reported error is the actual rounding of W + ΔW (computed here in float64).
    exact = _f64(params["w"]) + _np_delta(ad["w"])
    actual = np.abs(_f64(merged["w"]) - exact).max()
    assert float(err) == pytest.approx(actual, rel=1e-3, abs=1e-6)
    if dtype == jnp.bfloat16:
        assert float(err) > 0 and float(err) <= 2.0**-8 * np.abs(exact).max()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_unmerge_inverts_merge(key, dtype):
    params = jax.tree.map(lambda v: v.astype(dtype), _two_layer())
    ad = _randomise_b(key, lora.init(key, params, rank=2, alpha=2.0, targets="w"), scale=0.05)
    merged, e1 = lora.merge(params, ad)
    back, e2 = lora.unmerge(merged, ad)
    for name in ("up", "down"):
        diff = np.abs(_f64(back[name]["w"]) - _f64(params[name]["w"])).max()
        assert diff <= float(e1) + float(e2) + 1e-7
        assert np.array_equal(back[name]["b"], params[name]["b"])
    if dtype == jnp.float32:
        assert float(e1) < 1e-6


def test_unmerge_merge_float64_exact(key, x64):
    params = _two_layer(dtype=jnp.float64)
    ad = _randomise_b(key, lora.init(key, params, rank=2, alpha=2.0, targets="w"))
    assert ad["up/w"].a.dtype == jnp.float64
    back, _ = lora.unmerge(lora.merge(params, ad)[0], ad)
    np.testing.assert_allclose(back["up"]["w"], params["up"]["w"], rtol=0, atol=1e-14)


def test_gradients_match_finite_differences(key, rng, x64):
    params = jax.tree.map(lambda v: v.astype(jnp.float64), _dense(1, 5, 4))
    ad = _randomise_b(key, lora.init(key, params, rank=2, alpha=3.0, targets="w"))["w"]
    x = jnp.asarray(rng.standard_normal((3, 5)))

    def f_linear(a, b):
        return jnp.sum(jnp.tanh(lora.linear(params, dataclasses.replace(ad, a=a, b=b), x)))

    def f_wrap(a, b):
        out = lora.wrap(jaxla.linear)(params, {"w": dataclasses.replace(ad, a=a, b=b)}, x)
        return jnp.sum(jnp.tanh(out))

    check_grads(jax.jit(f_linear), (ad.a, ad.b), order=1, modes=["rev"], eps=1e-4)
    check_grads(jax.jit(f_wrap), (ad.a, ad.b), order=1, modes=["rev"], eps=1e-4)
    ga, gb = jax.grad(f_linear, argnums=(0, 1))(ad.a, ad.b)
    ga2, gb2 = jax.grad(f_wrap, argnums=(0, 1))(ad.a, ad.b)
    np.testing.assert_allclose(ga, ga2, rtol=1e-10)
    np.testing.assert_allclose(gb, gb2, rtol=1e-10)


@pytest.mark.parametrize("formulation", ["factored", "merged"])
def test_many_rows_path_gradients(key, rng, x64, formulation):
    """formulation="merged" folds the update into W in the forward and stays factored in the
    backward; both formulations' values and gradients (x, W, a, b) must match the plain definition."""
    params = jax.tree.map(lambda v: v.astype(jnp.float64), _dense(1, 5, 4))
    ad = _randomise_b(key, lora.init(key, params, rank=2, alpha=3.0, targets="w"))["w"]
    x = jnp.asarray(rng.standard_normal((2, 4, 5)))  # 8 rows >= d_in = 5

    def f(x, w, a, b):
        p = {"w": w, "b": params["b"]}
        return jnp.tanh(lora.linear(p, dataclasses.replace(ad, a=a, b=b), x,
                                    formulation=formulation))

    def ref(x, w, a, b):
        w_eff = w + ad.scale * (b @ a).T
        return jnp.tanh(x @ w_eff + params["b"][None, None, :])

    args = (x, params["w"], ad.a, ad.b)
    np.testing.assert_allclose(f(*args), ref(*args), rtol=1e-12, atol=1e-12)
    check_grads(jax.jit(f), args, order=1, modes=["rev"], eps=1e-4)
    def loss(fn):
        return lambda *a: jnp.sum(fn(*a) ** 2)
    got = jax.grad(loss(f), argnums=(0, 1, 2, 3))(*args)
    want = jax.grad(loss(ref), argnums=(0, 1, 2, 3))(*args)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)


def test_row_result_does_not_depend_on_batch_size(key):
    """The formulation is an option, not a function of the shape (issue 12): with W's entries
    cancelling (x·W = 0) and an update far below W's float32 rounding step, folding ΔW into W erases
    it. The default factored form keeps it whatever the number of rows; "merged" matches
    merge-then-linear, also whatever the number of rows."""
    d_in, d_out = 4, 3
    w = jnp.asarray(np.tile([[1e8], [-1e8], [1e8], [-1e8]], (1, d_out)), jnp.float32)
    a = jnp.full((1, d_in), 0.5, jnp.float32)
    b = jnp.full((d_out, 1), 0.5, jnp.float32)
    ad = lora.Adapter(a, b, alpha=1.0)
    params = {"w": w}
    row = jnp.ones((1, d_in), jnp.float32)
    exact = d_in * 0.25  # x·ΔW with x = 1, ΔW = 0.25 everywhere
    for rows in (1, d_in - 1, d_in, 4 * d_in):
        x = jnp.tile(row, (rows, 1))
        out = lora.linear(params, ad, x)
        np.testing.assert_allclose(out, np.full((rows, d_out), exact), rtol=1e-6)
        merged = lora.linear(params, ad, x, formulation="merged")
        np.testing.assert_array_equal(merged, jaxla.linear(lora.merge({"w": w}, {"w": ad})[0], x))
        np.testing.assert_array_equal(merged, np.zeros((rows, d_out)))  # W + ΔW rounds to W
    with pytest.raises(ValueError, match=r"formulation must be one of \('factored', 'merged'\)"):
        lora.linear(params, ad, row, formulation="auto")


# --- stacked kernels, other layouts, other containers -------------------------------------------


def test_stacked_kernels_per_layer(key, rng):
    n_layers, d = 3, 6
    params = {"layers": {"w": jnp.asarray(rng.standard_normal((n_layers, d, d)), jnp.float32),
                         "b": jnp.zeros((n_layers, d), jnp.float32)}}
    ad = lora.init(key, params, rank=2, alpha=2.0, targets="layers/w", stack_axes={"layers/w": 1})
    ad = _randomise_b(key, ad)
    assert ad["layers/w"].a.shape == (3, 2, 6) and ad["layers/w"].b.shape == (3, 6, 2)
    merged, _ = lora.merge(params, ad)
    np.testing.assert_allclose(_f64(merged["layers"]["w"]),
                               _f64(params["layers"]["w"]) + _np_delta(ad["layers/w"]),
                               rtol=1e-5, atol=1e-5)
    x = jnp.asarray(rng.standard_normal((4, d)), jnp.float32)

    def body(h, layer):
        p, a = layer
        return jnp.tanh(lora.linear(p, a, h)), None

    out, _ = jax.lax.scan(body, x, (params["layers"], ad["layers/w"]))
    ref, _ = jax.lax.scan(lambda h, p: (jnp.tanh(jaxla.linear(p, h)), None), x, merged["layers"])
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_expert_stack_two_axes(key, rng):
    w = jnp.asarray(rng.standard_normal((2, 3, 5, 4)), jnp.float32)
    ad = _randomise_b(key, lora.init(key, {"experts": w}, rank=2, alpha=1.0, targets="experts",
                                     stack_axes=2))
    merged, _ = lora.merge({"experts": w}, ad)
    np.testing.assert_allclose(_f64(merged["experts"]), _f64(w) + _np_delta(ad["experts"]),
                               rtol=1e-5, atol=1e-5)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _EqxLinear:
    """Stands in for an Equinox Linear: attribute keys and an (out, in) weight."""

    weight: jax.Array
    bias: jax.Array


def test_out_in_layout_equinox_style(key, rng):
    model = [_EqxLinear(jnp.asarray(rng.standard_normal((4, 6)), jnp.float32), jnp.zeros(4)),
             _EqxLinear(jnp.asarray(rng.standard_normal((3, 4)), jnp.float32), jnp.zeros(3))]
    ad = lora.init(key, model, rank=2, alpha=2.0, targets="weight", out_in="weight")
    assert sorted(ad) == ["0/weight", "1/weight"]
    assert ad["0/weight"].a.shape == (2, 6) and ad["0/weight"].b.shape == (4, 2)
    ad = _randomise_b(key, ad)
    merged, _ = lora.merge(model, ad)
    assert isinstance(merged[0], _EqxLinear)
    w = _f64(model[0].weight)
    expected = w + ad["0/weight"].scale * _f64(ad["0/weight"].b) @ _f64(ad["0/weight"].a)
    np.testing.assert_allclose(_f64(merged[0].weight), expected, rtol=1e-5, atol=1e-5)


def test_plain_dict_model_with_wrap(key, rng):
    params = {"embed": jnp.asarray(rng.standard_normal((10, 6)), jnp.float32),
              "mlp": _two_layer()}
    ad = lora.init(key, params, rank=2, alpha=4.0, targets=r"mlp/.*/w$")
    assert sorted(ad) == ["mlp/down/w", "mlp/up/w"]
    ad = _randomise_b(key, ad, 0.1)

    def apply(p, ids):
        return _two_layer_apply(p["mlp"], jnp.take(p["embed"], ids, axis=0))

    ids = jnp.array([1, 4, 7])
    out = jax.jit(lora.wrap(apply))(params, ad, ids)
    manual = jaxla.linear(params["mlp"]["down"], jax.nn.gelu(
        lora.linear(params["mlp"]["up"], ad["mlp/up/w"], jnp.take(params["embed"], ids, axis=0))))
    down_delta = jnp.asarray(_np_delta(ad["mlp/down/w"]), jnp.float32)
    expected = manual + jax.nn.gelu(lora.linear(params["mlp"]["up"], ad["mlp/up/w"], jnp.take(
        params["embed"], ids, axis=0))) @ down_delta
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_count_params(key):
    params = _two_layer()
    ad = lora.init(key, params, rank=2, alpha=1.0, targets="w")
    c = lora.count_params(params, ad)
    assert c.trainable == 2 * (6 + 10) + 2 * (10 + 4)
    assert c.frozen == 6 * 10 + 10 + 10 * 4 + 4
    assert c.adapted == 6 * 10 + 10 * 4
    assert c.total == c.trainable + c.frozen
    assert c.fraction == pytest.approx(c.trainable / c.total)
    assert "trainable params: 60" in str(c)


# --- PiSSA ---------------------------------------------------------------------------------------


def test_pissa_full_is_best_rank_r_and_residual(rng):
    w = rng.standard_normal((12, 9))
    params = {"w": jnp.asarray(w, jnp.float32)}
    ad, base = lora.init_pissa(params, rank=3, alpha=6.0, targets="w")
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    top = (u[:, :3] * s[:3]) @ vt[:3]
    np.testing.assert_allclose(_np_delta(ad["w"]), top, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_f64(base["w"]), w - top, rtol=1e-4, atol=1e-4)
    merged, _ = lora.merge(base, ad)
    np.testing.assert_allclose(_f64(merged["w"]), w, rtol=1e-5, atol=1e-5)


def test_pissa_randomized_and_stacked(key, rng):
    # Decaying spectrum so the top-3 subspace is well separated.
    u, _ = np.linalg.qr(rng.standard_normal((2, 20, 20)))
    v, _ = np.linalg.qr(rng.standard_normal((2, 16, 16)))
    s = 2.0 ** -np.arange(16)
    w = np.einsum("lik,k,ljk->lij", u[..., :16], s, v)
    params = {"w": jnp.asarray(w, jnp.float32)}
    rand, base = lora.init_pissa(params, rank=3, alpha=3.0, targets="w", stack_axes=1,
                                 svd="randomized", key=key)
    top = np.einsum("lik,k,ljk->lij", u[..., :3], s[:3], v[..., :3])
    np.testing.assert_allclose(_np_delta(rand["w"]), top, atol=1e-4)
    np.testing.assert_allclose(_f64(lora.merge(base, rand)[0]["w"]), w, atol=1e-5)


def test_pissa_randomized_uses_the_spectral_svd(key, rng):
    """One randomized SVD in the package (issue 12): PiSSA's factors are exactly those of
    spectral.randomized_svd with the same key, sketch size and power iterations."""
    from jaxla import spectral

    w = jnp.asarray(rng.standard_normal((12, 9)), jnp.float32)
    ad, _ = lora.init_pissa({"w": w}, rank=3, alpha=6.0, targets="w", svd="randomized", key=key,
                            niter=2, oversample=3)
    res = spectral.randomized_svd(w, 3, key=jax.random.fold_in(key, 0), oversample=3, n_iter=2)
    root = np.sqrt(np.asarray(res.s) / ad["w"].scale)
    np.testing.assert_allclose(ad["w"].a, np.asarray(res.u).T * root[:, None], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ad["w"].b, np.asarray(res.vt).T * root[None, :], rtol=1e-6,
                               atol=1e-7)


def test_pissa_bad_input(rng):
    params = {"w": jnp.ones((4, 4))}
    with pytest.raises(ValueError, match="key"):
        lora.init_pissa(params, rank=2, alpha=1.0, targets="w", svd="randomized")
    with pytest.raises(ValueError, match="svd must be"):
        lora.init_pissa(params, rank=2, alpha=1.0, targets="w", svd="qr")
    with pytest.raises(ValueError, match="init_pissa"):
        lora.init(jax.random.key(0), params, rank=2, alpha=1.0, targets="w", init="pissa")


# --- per-example adapters -------------------------------------------------------------------------


def test_linear_batched_matches_per_example(key, rng):
    params = _dense(2, 6, 5)
    k1, k2 = jax.random.split(key)
    s1 = _randomise_b(k1, lora.init(k1, params, rank=2, alpha=4.0, targets="w"))
    s2 = _randomise_b(k2, lora.init(k2, params, rank=3, alpha=1.0, targets="w", rslora=True))
    stacked = lora.stack([s1, s2])
    assert stacked["w"].a.shape == (2, 3, 6) and stacked["w"].scale == 1.0
    x = jnp.asarray(rng.standard_normal((4, 2, 6)), jnp.float32)
    idx = jnp.array([1, 0, -1, 1])
    traces = []

    def counted(*args):
        traces.append(1)
        return lora.linear_batched(*args)

    fn = jax.jit(counted)
    out = fn(params, stacked["w"], x, idx)
    refs = [lora.linear(params, s2["w"], x[0]), lora.linear(params, s1["w"], x[1]),
            jaxla.linear(params, x[2]), lora.linear(params, s2["w"], x[3])]
    np.testing.assert_allclose(out, jnp.stack(refs), rtol=1e-5, atol=1e-5)
    # Switching adapters is a new index vector, not a new program.
    fn(params, stacked["w"], x, jnp.array([0, 0, 1, -1]))
    assert len(traces) == 1


def test_wrap_batched_matches_per_example(key, rng):
    params = _two_layer()
    sets = [_randomise_b(jax.random.fold_in(key, i),
                         lora.init(jax.random.fold_in(key, i), params, rank=2, alpha=2.0,
                                   targets="w"), 0.3) for i in range(3)]
    stacked = lora.stack(sets)
    x = jnp.asarray(rng.standard_normal((4, 6)), jnp.float32)
    idx = jnp.array([2, 0, 1, -1])
    out = jax.jit(lora.wrap_batched(_two_layer_apply))(params, stacked, idx, x)
    wrapped = lora.wrap(_two_layer_apply)
    refs = [wrapped(params, sets[2], x[:1]), wrapped(params, sets[0], x[1:2]),
            wrapped(params, sets[1], x[2:3]), _two_layer_apply(params, x[3:])]
    np.testing.assert_allclose(out, jnp.concatenate(refs), rtol=1e-5, atol=1e-5)


def test_batched_bad_indices(key):
    params = _dense(3, 4, 3)
    stacked = lora.stack([lora.init(key, params, rank=1, alpha=1.0, targets="w")] * 2)["w"]
    x = jnp.ones((2, 4))
    with pytest.raises(ValueError, match=r"indices must lie in \[-1, 2\)"):
        lora.linear_batched(params, stacked, x, jnp.array([0, 2]))
    with pytest.raises(ValueError, match="indices"):
        lora.linear_batched(params, stacked, x, jnp.array([0, 1, 1]))
    with pytest.raises(TypeError, match="integer"):
        lora.linear_batched(params, stacked, x, jnp.array([0.0, 1.0]))
    # Under jit an out-of-range index cannot raise; it must not silently pick another adapter.
    out = jax.jit(lora.linear_batched)(params, stacked, x, jnp.array([0, 5]))
    assert np.all(np.isfinite(out[0])) and np.all(np.isnan(out[1]))
    with pytest.raises(ValueError, match="same paths"):
        lora.stack([{"w": stacked}, {}])
    with pytest.raises(TypeError, match=r"^dtype must be a floating dtype"):
        lora.linear_batched(params, stacked, x, jnp.array([0, 1]), dtype=jnp.int8)
    with pytest.raises(TypeError, match=r"^preferred_element_type must be a floating dtype"):
        lora.linear(params, lora.init(key, params, rank=1, alpha=1.0, targets="w")["w"], x,
                    preferred_element_type=jnp.int8)


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("rank,exc,msg", [
    (0, ValueError, "> 0"), (-2, ValueError, "> 0"), (7, ValueError, r"min\(d_in, d_out\) = 6"),
    (2.0, TypeError, "must be an int"),
])
def test_bad_rank(key, rank, exc, msg):
    with pytest.raises(exc, match=msg):
        lora.init(key, _two_layer(), rank=rank, alpha=1.0, targets="up/w")


@pytest.mark.parametrize("alpha,exc", [(0.0, ValueError), (-1.0, ValueError),
                                       (float("nan"), ValueError), ("8", TypeError)])
def test_bad_alpha(key, alpha, exc):
    with pytest.raises(exc, match="alpha"):
        lora.init(key, _two_layer(), rank=2, alpha=alpha, targets="w")


def test_targets_matching_nothing_lists_paths(key):
    with pytest.raises(ValueError, match=r"matched no parameter(.|\n)*up/w \(6, 10\)"):
        lora.init(key, _two_layer(), rank=2, alpha=1.0, targets="q_proj")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        lora.init(key, _two_layer(), rank=2, alpha=1.0, targets="(")
    with pytest.raises(ValueError, match="init must be"):
        lora.init(key, _two_layer(), rank=2, alpha=1.0, targets="w", init="xavier")


def test_non_matrix_targets(key):
    stacked = {"w": jnp.ones((3, 4, 4))}
    with pytest.raises(ValueError, match=r"stack_axes=\{'w': 1\}"):
        lora.init(key, stacked, rank=2, alpha=1.0, targets="w")
    with pytest.raises(ValueError, match="only matrices"):
        lora.init(key, _two_layer(), rank=1, alpha=1.0, targets="up/.*")  # matches up/b too
    with pytest.raises(ValueError, match="rank 4"):
        lora.init(key, stacked, rank=2, alpha=1.0, targets="w", stack_axes=2)


def test_mismatched_adapters_name_key_and_shapes(key):
    params = _two_layer()
    ad = lora.init(key, params, rank=2, alpha=1.0, targets="w")
    with pytest.raises(ValueError, match=r"'up/w'.*\(10, 4\).*\(6, 10\)"):
        lora.merge({"up": params["down"], "down": params["down"]}, ad)
    with pytest.raises(ValueError, match=r"\['mlp/w'\] are not paths"):
        lora.merge(params, {"mlp/w": ad["up/w"]})
    with pytest.raises(ValueError, match="disagree"):
        lora.merge(params, {"up/w": dataclasses.replace(ad["up/w"], b=jnp.zeros((10, 3)))})
    with pytest.raises(TypeError, match="Adapter"):
        lora.merge(params, {"up/w": {"a": ad["up/w"].a, "b": ad["up/w"].b}})
    with pytest.raises(ValueError, match="d_in"):
        lora.linear(params["up"], ad["up/w"], jnp.ones((2, 7)))
    stacked = lora.stack([ad])
    with pytest.raises(ValueError, match="stack axes"):
        lora.linear(params["up"], stacked["up/w"], jnp.ones((2, 6)))
