"""The LoRA family beyond plain LoRA: DoRA, dropout, OLoRA + delta conversion, arithmetic, hot-swap."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

from jaxla import lora


def _f64(x):
    return np.asarray(x).astype(np.float64)


def _setup(rng, d_in=6, d_out=5, r=2, alpha=3.0, dtype=jnp.float32, lead=()):
    w = rng.standard_normal((*lead, d_in, d_out)) / np.sqrt(d_in)
    a = rng.standard_normal((*lead, r, d_in)) * 0.5
    b = rng.standard_normal((*lead, d_out, r)) * 0.5
    m = 1.0 + 0.3 * rng.standard_normal((*lead, d_out))
    ad = lora.Adapter(jnp.asarray(a, dtype), jnp.asarray(b, dtype), alpha,
                      m=jnp.asarray(m, dtype))
    return jnp.asarray(w, dtype), ad


def _np_dora_weight(w, ad):
    """The DoRA definition in float64: m · (W + s·aᵀbᵀ) / ‖W + s·aᵀbᵀ‖ per column (norm over I)."""
    d = _f64(w) + ad.scale * np.swapaxes(_f64(ad.b) @ _f64(ad.a), -1, -2)
    return _f64(ad.m)[..., None, :] * d / np.linalg.norm(d, axis=-2, keepdims=True)


# --- DoRA -----------------------------------------------------------------------------------------


def test_dora_factored_norms_equal_dense_norms(rng, x64):
    for lead, out_in in (((), False), ((3,), False), ((2,), True)):
        w, ad = _setup(rng, lead=lead, dtype=jnp.float64)
        if out_in:
            w = jnp.swapaxes(w, -1, -2)
            ad = dataclasses.replace(ad, out_in=True)
        dense = np.linalg.norm(_f64(w) + _f64(lora.delta(ad)), axis=-1 if out_in else -2)
        np.testing.assert_allclose(np.asarray(lora.dora_norms(w, ad)), dense, rtol=1e-12)


def test_dora_linear_and_merge_match_the_float64_definition(rng, x64):
    w, ad = _setup(rng, dtype=jnp.float64)
    bias = jnp.asarray(rng.standard_normal(5))
    x = jnp.asarray(rng.standard_normal((4, 6)))
    ref = _f64(x) @ _np_dora_weight(w, ad) + _f64(bias)
    y = lora.linear({"w": w, "b": bias}, ad, x)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-12, atol=1e-12)
    merged, err = lora.merge({"w": w}, {"w": ad})
    np.testing.assert_allclose(np.asarray(merged["w"]), _np_dora_weight(w, ad), rtol=1e-12)
    assert float(err) == 0.0
    # The merged weight's column norms are |m|.
    np.testing.assert_allclose(np.linalg.norm(_f64(merged["w"]), axis=0), np.abs(_f64(ad.m)),
                               rtol=1e-12)
    # wrap (merged in the graph) computes the same function.
    fn = lora.wrap(lambda p, x: x @ p["w"] + p["b"][None, :])
    np.testing.assert_allclose(np.asarray(fn({"w": w, "b": bias}, {"w": ad}, x)), ref, rtol=1e-12)


def test_dora_float32_merged_equals_unmerged_within_tolerance(rng):
    w, ad = _setup(rng, d_in=16, d_out=12, r=3)
    x = jnp.asarray(rng.standard_normal((8, 16)), jnp.float32)
    merged, err = lora.merge({"w": w}, {"w": ad})
    y = lora.linear({"w": w}, ad, x)
    np.testing.assert_allclose(np.asarray(x @ merged["w"]), np.asarray(y), rtol=2e-5, atol=2e-5)
    assert float(err) < 1e-6


def test_dora_bfloat16_stays_within_bfloat16_rounding(rng):
    w, ad = _setup(rng, d_in=16, d_out=12, r=3, dtype=jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((8, 16)), jnp.bfloat16)
    ref = _f64(x) @ _np_dora_weight(w, ad)
    y = lora.linear({"w": w}, ad, x)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(_f64(y), ref, rtol=3e-2, atol=3e-2)
    merged, err = lora.merge({"w": w}, {"w": ad})
    assert merged["w"].dtype == jnp.bfloat16 and 0 < float(err) < 2e-2


def test_dora_gradients_treat_the_norm_as_a_constant(rng, x64):
    w, ad = _setup(rng, dtype=jnp.float64)
    x = jnp.asarray(rng.standard_normal((3, 6)))
    g = rng.standard_normal((3, 5))

    def loss(m, a, b):
        adapter = dataclasses.replace(ad, a=a, b=b, m=m)
        return jnp.sum(lora.linear({"w": w}, adapter, x) * jnp.asarray(g))

    # m: the norm does not depend on it, so the gradient is the full derivative.
    check_grads(lambda m: loss(m, ad.a, ad.b), (ad.m,), order=2, modes=("fwd", "rev"))
    # a, b: against central differences of the float64 definition with the norm held fixed.
    n0 = np.linalg.norm(_f64(w) + ad.scale * (_f64(ad.b) @ _f64(ad.a)).T, axis=0)

    def ref(a, b):
        d = _f64(w) + ad.scale * (b @ a).T
        return float(np.sum((_f64(x) @ (_f64(ad.m) * d / n0)) * g))

    ga, gb = jax.grad(loss, argnums=(1, 2))(ad.m, ad.a, ad.b)
    for got, arg in ((ga, 0), (gb, 1)):
        base = [_f64(ad.a), _f64(ad.b)]
        num = np.zeros_like(base[arg])
        for idx in np.ndindex(num.shape):
            hi, lo = [t.copy() for t in base], [t.copy() for t in base]
            hi[arg][idx] += 1e-6
            lo[arg][idx] -= 1e-6
            num[idx] = (ref(*hi) - ref(*lo)) / 2e-6
        np.testing.assert_allclose(np.asarray(got), num, rtol=1e-6, atol=1e-8)
    # ... and check_grads on a and b of the same detached function, written in JAX.
    n0j = jnp.asarray(n0)
    check_grads(lambda a, b: jnp.sum((x @ (ad.m[None, :] * (w + ad.scale * (b @ a).T)
                                           / n0j[None, :])) * g),
                (ad.a, ad.b), order=1, modes=("rev",))


def test_dora_init_starts_at_the_base_weight(key, rng):
    params = {"w": jnp.asarray(rng.standard_normal((6, 5)), jnp.float32)}
    ads = lora.init(key, params, rank=2, alpha=4.0, targets="w", dora=True)
    np.testing.assert_allclose(np.asarray(ads["w"].m), np.linalg.norm(params["w"], axis=0),
                               rtol=1e-6)
    merged, _ = lora.merge(params, ads)
    np.testing.assert_allclose(np.asarray(merged["w"]), np.asarray(params["w"]), rtol=1e-6,
                               atol=1e-6)
    assert lora.count_params(params, ads).trainable == 2 * 6 + 5 * 2 + 5
    # A plain adapter's pytree leaves are still just (a, b); DoRA adds m.
    assert len(jax.tree.leaves(lora.init(key, params, rank=2, alpha=4.0, targets="w")["w"])) == 2
    assert len(jax.tree.leaves(ads["w"])) == 3


def test_dora_unmerge_needs_the_original_weights_and_is_exact(rng, x64):
    w, ad = _setup(rng, dtype=jnp.float64, lead=(2,))
    params = {"w": w}
    merged, _ = lora.merge(params, {"w": ad})
    with pytest.raises(ValueError, match=r"needs the original weights.*base="):
        lora.unmerge(merged, {"w": ad})
    back, _ = lora.unmerge(merged, {"w": ad}, base=params)
    np.testing.assert_allclose(np.asarray(back["w"]), np.asarray(w), rtol=1e-12, atol=1e-12)


def test_dora_trains_m_a_and_b(rng):
    w, ad = _setup(rng)
    x = jnp.asarray(rng.standard_normal((8, 6)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((8, 5)), jnp.float32)
    step = lora.train_step(lambda p, a, x, y: jnp.mean((lora.linear(p, a["w"], x) - y) ** 2),
                           optax.sgd(0.1))
    new, _, _ = step({"w": w}, {"w": ad}, optax.sgd(0.1).init({"w": ad}), x, y)
    for f in ("a", "b", "m"):
        assert not np.allclose(np.asarray(getattr(new["w"], f)), np.asarray(getattr(ad, f)))


def test_dora_files_round_trip_jaxla_and_peft(tmp_path, rng):
    w, ad = _setup(rng)
    params = {"w": w}
    lora.save(tmp_path / "a.safetensors", {"w": ad})
    back, _ = lora.load(tmp_path / "a.safetensors", params=params)
    np.testing.assert_array_equal(np.asarray(back["w"].m), np.asarray(ad.m))
    lora.save_peft(tmp_path / "peft", {"w": ad}, {"w": "model.proj"})
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    import safetensors.numpy
    tensors = safetensors.numpy.load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    np.testing.assert_array_equal(tensors["base_model.model.model.proj.lora_magnitude_vector"],
                                  np.asarray(ad.m))
    got = lora.load_peft(tmp_path / "peft", params, {"w": "model.proj"})
    np.testing.assert_array_equal(np.asarray(got["w"].m), np.asarray(ad.m))
    # A PEFT file declaring DoRA without magnitudes, or mixing DoRA and plain LoRA, is refused.
    del tensors["base_model.model.model.proj.lora_magnitude_vector"]
    safetensors.numpy.save_file(tensors, str(tmp_path / "peft" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"use_dora true but .* no tensor .*lora_magnitude_vector"):
        lora.load_peft(tmp_path / "peft", params, {"w": "model.proj"})
    plain = lora.Adapter(ad.a, ad.b, ad.alpha)
    with pytest.raises(ValueError, match="mix DoRA"):
        lora.save_peft(tmp_path / "mixed", {"w": ad, "v": plain}, {"w": "a", "v": "b"})
    with pytest.raises(ValueError, match="is DoRA; per-example stacks take plain LoRA"):
        lora.stack([{"w": ad}, {"w": ad}])
    with pytest.raises(ValueError, match=r"m has shape \(4,\); expected"):
        lora.merge(params, {"w": dataclasses.replace(ad, m=ad.m[:4])})


# --- dropout --------------------------------------------------------------------------------------


def test_dropout_is_peft_semantics_and_off_without_key(key, rng):
    params = {"w": jnp.asarray(rng.standard_normal((6, 5)), jnp.float32),
              "b": jnp.asarray(rng.standard_normal(5), jnp.float32)}
    ad = lora.Adapter(jnp.asarray(rng.standard_normal((2, 6)), jnp.float32),
                      jnp.asarray(rng.standard_normal((5, 2)), jnp.float32), 4.0)
    x = jnp.asarray(rng.standard_normal((7, 6)), jnp.float32)
    plain = lora.linear(params, ad, x)
    np.testing.assert_array_equal(np.asarray(lora.linear(params, ad, x, dropout=0.5)),
                                  np.asarray(plain))
    y = lora.linear(params, ad, x, dropout=0.5, dropout_key=key)
    keep = np.asarray(jax.random.bernoulli(key, 0.5, x.shape))
    xd = np.where(keep, _f64(x) / 0.5, 0.0)
    ref = (_f64(x) @ _f64(params["w"]) + ad.scale * (xd @ _f64(ad.a).T) @ _f64(ad.b).T
           + _f64(params["b"]))
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
    # DoRA under dropout: PEFT's x·W + (f − 1)·(x̃·W) + f·s·(x̃·aᵀ)·bᵀ + bias.
    dora = dataclasses.replace(ad, m=jnp.asarray(1 + 0.1 * rng.standard_normal(5), jnp.float32))
    f = _f64(dora.m) / np.linalg.norm(_f64(params["w"]) + _f64(lora.delta(dora)), axis=0)
    ref = (_f64(x) @ _f64(params["w"]) + (f - 1) * (xd @ _f64(params["w"]))
           + f * (ad.scale * (xd @ _f64(ad.a).T) @ _f64(ad.b).T) + _f64(params["b"]))
    y = lora.linear(params, dora, x, dropout=0.5, dropout_key=key)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
    for bad in (1.0, -0.1, "0.1"):
        with pytest.raises(ValueError, match="dropout must be a number in"):
            lora.linear(params, ad, x, dropout=bad)
    with pytest.raises(ValueError, match='formulation="merged" is for plain LoRA'):
        lora.linear(params, dora, x, formulation="merged")


# --- OLoRA and the conversion to a plain LoRA delta -----------------------------------------------


def test_olora_is_the_qr_of_w_and_merges_back(rng, x64):
    params = {"w": jnp.asarray(rng.standard_normal((7, 5)))}
    ads, base = lora.init_olora(params, rank=2, alpha=4.0, targets="w")
    q, r = np.linalg.qr(_f64(params["w"]).T)
    np.testing.assert_allclose(_f64(ads["w"].b) @ _f64(ads["w"].a), q[:, :2] @ r[:2], atol=1e-12)
    np.testing.assert_allclose(_f64(ads["w"].b).T @ _f64(ads["w"].b), np.eye(2), atol=1e-12)
    merged, _ = lora.merge(base, ads)
    np.testing.assert_allclose(np.asarray(merged["w"]), np.asarray(params["w"]), atol=1e-12)


@pytest.mark.parametrize("kind", ["pissa", "olora"])
def test_to_lora_delta_applies_to_the_original_weights(kind, rng, x64):
    params = {"w": jnp.asarray(rng.standard_normal((7, 5)))}
    init = lora.init_pissa if kind == "pissa" else lora.init_olora
    initial, base = init(params, rank=2, alpha=4.0, targets="w", rslora=kind == "olora")
    trained = {"w": dataclasses.replace(
        initial["w"], a=initial["w"].a + 0.1 * jnp.asarray(rng.standard_normal((2, 7))),
        b=initial["w"].b + 0.1 * jnp.asarray(rng.standard_normal((5, 2))))}
    delta = lora.to_lora_delta(trained, initial)
    assert delta["w"].rank == 4 and delta["w"].scale == pytest.approx(trained["w"].scale)
    want = lora.merge(base, trained)[0]["w"]
    got = lora.merge(params, delta)[0]["w"]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-12)
    with pytest.raises(ValueError, match="differ in shape"):
        lora.to_lora_delta(trained, {"w": dataclasses.replace(initial["w"], a=initial["w"].a[:1],
                                                              b=initial["w"].b[:, :1])})


def test_patterns_matching_no_target_are_errors(key):
    params = {"up": {"w": jnp.zeros((4, 6))}, "down": {"w": jnp.zeros((6, 4))}}
    with pytest.raises(ValueError, match=r"rank_pattern keys \['dwn/w'\] match none of the targets"):
        lora.init(key, params, rank=2, alpha=2.0, targets="w", rank_pattern={"dwn/w": 1})
    with pytest.raises(ValueError, match=r"alpha_pattern keys \['q'\]"):
        lora.init(key, params, rank=2, alpha=2.0, targets="w", alpha_pattern={"q": 1.0})


# --- adapter arithmetic -----------------------------------------------------------------------------


def _sets(rng, ranks=(2, 2), alphas=(4.0, 2.0), d_in=6, d_out=5):
    return [{"w": lora.Adapter(jnp.asarray(rng.standard_normal((r, d_in))),
                               jnp.asarray(rng.standard_normal((d_out, r))), al)}
            for r, al in zip(ranks, alphas, strict=True)]


def _np_ties(tensors, weights, density):
    """PEFT's merge_utils.ties in NumPy: magnitude-prune, elect sign of the sum, disjoint mean."""
    pruned = []
    for t in tensors:
        k = int(density * t.size)
        flat = np.abs(t).reshape(-1)
        mask = np.zeros(t.size)
        mask[np.argsort(-flat, kind="stable")[:k]] = 1
        pruned.append(t * mask.reshape(t.shape))
    st = np.stack(pruned)
    majority = np.where(st.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(st) == majority
    wt = st * np.asarray(weights).reshape(-1, *(1,) * (st.ndim - 1))
    return (wt * agree).sum(0) / np.maximum(agree.sum(0), 1)


def test_combine_linear_cat_svd_ties_match_the_definitions(rng, x64):
    sets = _sets(rng)
    ws = [0.7, -0.4]
    s = [ad["w"].scale for ad in sets]
    a = [_f64(ad["w"].a) for ad in sets]
    b = [_f64(ad["w"].b) for ad in sets]
    wa = [np.sign(w * si) * np.sqrt(abs(w * si)) for w, si in zip(ws, s, strict=True)]
    wb = [np.sqrt(abs(w * si)) for w, si in zip(ws, s, strict=True)]

    lin = lora.combine(sets, ws, method="linear")["w"]
    assert lin.scale == 1.0
    np.testing.assert_allclose(_f64(lin.a), wa[0] * a[0] + wa[1] * a[1], atol=1e-12)
    np.testing.assert_allclose(_f64(lin.b), wb[0] * b[0] + wb[1] * b[1], atol=1e-12)

    cat = lora.combine(sets, ws, method="cat")["w"]
    want = sum(w * _f64(lora.delta(ad["w"])) for w, ad in zip(ws, sets, strict=True))
    assert cat.rank == 4
    np.testing.assert_allclose(_f64(lora.delta(cat)), want, atol=1e-12)

    svd = lora.combine(sets, ws, method="svd", rank=3)["w"]
    # PEFT weights each (already scaled) ΔWᵢ by wᵢ·sᵢ, then keeps the top-3 SVD part.
    total = sum(w * si * si * (bi @ ai) for w, si, ai, bi in zip(ws, s, a, b, strict=True))
    u, sv, vh = np.linalg.svd(total)
    np.testing.assert_allclose(_f64(svd.b) @ _f64(svd.a), (u[:, :3] * sv[:3]) @ vh[:3], atol=1e-10)

    ties = lora.combine(sets, ws, method="ties", density=0.5)["w"]
    np.testing.assert_allclose(_f64(ties.a), _np_ties(a, wa, 0.5), atol=1e-12)
    np.testing.assert_allclose(_f64(ties.b), _np_ties(b, wb, 0.5), atol=1e-12)

    mp = lora.combine(sets, ws, method="magnitude_prune", density=0.5)["w"]
    pruned = [_np_ties([t], [1.0], 0.5) for t in a]  # one tensor: TIES is plain magnitude pruning
    np.testing.assert_allclose(_f64(mp.a), wa[0] * pruned[0] + wa[1] * pruned[1], atol=1e-12)

    # DARE-linear: every entry is Σ wᵢ·keepᵢ·aᵢ/density for some keep pattern.
    dl = _f64(lora.combine(sets, ws, method="dare_linear", density=0.5, key=jax.random.key(5))["w"].a)
    options = np.stack([k0 * wa[0] * a[0] / 0.5 + k1 * wa[1] * a[1] / 0.5
                        for k0 in (0, 1) for k1 in (0, 1)])
    assert np.all(np.min(np.abs(options - dl[None]), axis=0) < 1e-12)
    assert np.any(dl == 0) or np.any(np.abs(options[3] - dl) > 1e-12)  # something was dropped

    # DARE: with density 1 nothing is dropped, so it is linear / TIES without pruning.
    k = jax.random.key(3)
    np.testing.assert_allclose(_f64(lora.combine(sets, ws, method="dare", density=1.0, key=k)["w"].a),
                               _f64(lin.a), atol=1e-12)
    dare = lora.combine(sets, ws, method="dare_ties", density=0.5, key=k)["w"]
    again = lora.combine(sets, ws, method="dare_ties", density=0.5, key=k)["w"]
    np.testing.assert_array_equal(np.asarray(dare.a), np.asarray(again.a))
    # Single set: PEFT uses linear whatever the method.
    one = lora.combine(sets[:1], [2.0], method="ties", density=0.3)["w"]
    np.testing.assert_allclose(_f64(lora.delta(one)), 2.0 * _f64(lora.delta(sets[0]["w"])),
                               atol=1e-12)


def test_combine_svd_randomized_matches_full(rng, x64):
    sets = _sets(rng, ranks=(2, 3), d_in=20, d_out=16)
    full = lora.combine(sets, [1.0, 0.5], method="svd", svd="full")["w"]
    rand = lora.combine(sets, [1.0, 0.5], method="svd", svd="randomized", key=jax.random.key(1))["w"]
    np.testing.assert_allclose(_f64(lora.delta(rand)), _f64(lora.delta(full)), atol=1e-9)


def test_combine_rejects_bad_input(rng):
    sets = _sets(rng)
    dora = [{"w": dataclasses.replace(sets[0]["w"], m=jnp.ones((5,)))}, sets[1]]
    cases = [
        (dict(adapters_list=dora, weights=[1, 1]), "mixes DoRA"),
        (dict(adapters_list=[sets[0], {"v": sets[1]["w"]}], weights=[1, 1]), "same paths"),
        (dict(adapters_list=_sets(rng, ranks=(2, 3)), weights=[1, 1]), "one rank"),
        (dict(adapters_list=sets, weights=[1.0]), "weights has 1 entries for 2"),
        (dict(adapters_list=sets, weights=[1, 1], method="ties", density=0.0), r"density .*\(0, 1\]"),
        (dict(adapters_list=sets, weights=[1, 1], method="ties", density=1.5), r"density .*\(0, 1\]"),
        (dict(adapters_list=sets, weights=[1, 1], method="ties"), "needs density"),
        (dict(adapters_list=sets, weights=[1, 1], method="dare", density=0.5), "key="),
        (dict(adapters_list=sets, weights=[1, 1], method="svd", rank=9), "exceeds min"),
        (dict(adapters_list=sets, weights=[1, 1], method="nope"), "method must be one of"),
        (dict(adapters_list=[sets[0], {"w": dataclasses.replace(
            sets[1]["w"], a=jnp.ones((2, 7)))}], weights=[1, 1]), "needs a weight of shape"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            lora.combine(**kwargs)


# --- hot-swap -------------------------------------------------------------------------------------


def test_pad_rank_hot_swaps_without_recompiling(rng):
    params = {"w": jnp.asarray(rng.standard_normal((6, 5)), jnp.float32)}
    x = jnp.asarray(rng.standard_normal((3, 6)), jnp.float32)
    traces = []

    @jax.jit
    def forward(params, adapters, x):
        traces.append(1)
        return lora.linear(params, adapters["w"], x)

    sets = _sets(rng, ranks=(1, 3, 2), alphas=(1.0, 8.0, 2.0))
    sets = [{k: dataclasses.replace(v, a=v.a.astype(jnp.float32), b=v.b.astype(jnp.float32),
                                    rslora=i == 2) for k, v in s.items()} for i, s in enumerate(sets)]
    for s in sets:
        padded = lora.pad_rank(s, 4)
        want = lora.linear(params, s["w"], x)
        np.testing.assert_allclose(np.asarray(forward(params, padded, x)), np.asarray(want),
                                   rtol=1e-6, atol=1e-6)
        merged_want = lora.merge(params, s)[0]["w"]
        np.testing.assert_allclose(np.asarray(lora.merge(params, padded)[0]["w"]),
                                   np.asarray(merged_want), rtol=1e-6, atol=1e-6)
    assert len(traces) == 1
    with pytest.raises(ValueError, match="smaller than the ranks of adapters"):
        lora.pad_rank(sets[1], 2)
    # Per-example batches: stacks of padded sets share one compiled program too.
    batched_traces = []

    @jax.jit
    def batched(params, stacked, x, idx):
        batched_traces.append(1)
        return lora.linear_batched(params, stacked["w"], x, idx)

    idx = jnp.asarray([0, 1, -1], jnp.int32)
    for pair in ((sets[0], sets[1]), (sets[2], sets[0])):
        stacked = lora.stack([lora.pad_rank(s, 4) for s in pair])
        got = batched(params, stacked, x, idx)
        for row, i in enumerate(np.asarray(idx)):
            want = (x[row] @ params["w"] if i < 0
                    else lora.linear(params, pair[i]["w"], x[row:row + 1])[0])
            np.testing.assert_allclose(np.asarray(got[row]), np.asarray(want), rtol=1e-5,
                                       atol=1e-5)
    assert len(batched_traces) == 1


def test_pad_rank_stacked_adapters_slice_per_layer_in_scan(key, rng):
    params = {"layers": {"w": jnp.asarray(rng.standard_normal((3, 6, 6)), jnp.float32)}}
    ad = lora.init(key, params, rank=2, alpha=6.0, targets="w", stack_axes=1)
    ad = {k: dataclasses.replace(v, b=jnp.asarray(rng.standard_normal((3, 6, 2)), jnp.float32))
          for k, v in ad.items()}
    padded = lora.pad_rank(ad, 4)["layers/w"]
    assert padded.gain.shape == (3,)
    x = jnp.asarray(rng.standard_normal((2, 6)), jnp.float32)

    def run(adapter):
        def body(h, layer):
            w, a = layer
            return lora.linear({"w": w}, a, h), None
        return jax.lax.scan(body, x, (params["layers"]["w"], adapter))[0]

    np.testing.assert_allclose(np.asarray(run(padded)), np.asarray(run(ad["layers/w"])),
                               rtol=1e-5, atol=1e-5)


def test_pad_rank_scale_is_never_trained(rng):
    params = {"w": jnp.asarray(rng.standard_normal((6, 5)), jnp.float32)}
    x = jnp.asarray(rng.standard_normal((4, 6)), jnp.float32)
    ad = lora.pad_rank({"w": lora.Adapter(jnp.asarray(rng.standard_normal((2, 6)), jnp.float32),
                                          jnp.asarray(rng.standard_normal((5, 2)), jnp.float32),
                                          4.0)}, 3)
    opt = optax.adamw(0.1, weight_decay=0.5)
    step = lora.train_step(lambda p, a, x: jnp.sum(lora.linear(p, a["w"], x) ** 2), opt)
    new, _, _ = step(params, ad, opt.init(ad), x)
    assert float(new["w"].gain) == 2.0
    assert not np.allclose(np.asarray(new["w"].b), np.asarray(ad["w"].b))
    with pytest.raises(ValueError, match="pad_rank"):
        lora.save("/nonexistent-dir/x.safetensors", ad)
