"""jaxla.quant: formats against the gguf package and NumPy references, quantized kernels in
jaxla.linear / lora.linear / lora.merge, kept-quantized GGUF models and QLoRA steps."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxla
from jaxla import lora, models, quant

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
REAL = Path(os.path.expanduser("~/.cache/jaxla/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"))


def gaussian(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---- formats ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
def test_gguf_formats_decode_bitwise_like_gguf(fmt):
    w = gaussian((64, 96))  # (I, O): GGUF rows are the 96 output channels
    raw = gguf.quants.quantize(np.ascontiguousarray(w.T), Q[fmt.upper()])
    ref = gguf.quants.dequantize(raw, Q[fmt.upper()]).T
    q = quant.from_gguf_blocks(raw, fmt, columns=64)
    assert q.shape == (64, 96) and q.codes.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(jax.jit(quant.dequantize)(q)), ref)
    # quantize() writes the same bytes as gguf's quantizer (kept exactly as stored)
    np.testing.assert_array_equal(np.asarray(quant.quantize(w, format=fmt).codes).reshape(raw.shape),
                                  raw)


@pytest.mark.parametrize("fmt,d_at", [("q4_k", (0, 2)), ("q6_k", (208,))])
def test_k_quants_decode_bitwise_like_gguf(fmt, d_at):
    """gguf cannot write k-quants: random super-blocks with finite f16 scales, decoded both ways."""
    block, nbytes = quant.GGUF_FORMATS[fmt]
    raw = np.random.default_rng(3).integers(0, 256, (6, 2, nbytes), dtype=np.uint8)
    for at, value in zip(d_at, (0.01, 0.002), strict=False):
        raw[..., at:at + 2] = np.frombuffer(np.float16(value).tobytes(), np.uint8)
    raw = raw.reshape(6, 2 * nbytes)
    ref = gguf.quants.dequantize(raw, Q[fmt.upper()])
    q = quant.from_gguf_blocks(raw, fmt, columns=2 * block, axis=-1)
    np.testing.assert_array_equal(np.asarray(jax.jit(quant.dequantize)(q)), ref)
    with pytest.raises(ValueError, match="read from GGUF files only"):
        quant.quantize(gaussian((512, 4)), format=fmt)


@pytest.mark.skipif(not REAL.exists(), reason="SmolLM2 GGUF not cached")
def test_real_file_tensors_decode_bitwise():
    reader = gguf.GGUFReader(REAL, "r")
    picked = {t.tensor_type.name: t for t in reader.tensors if t.tensor_type.name in ("Q4_1", "Q8_0")}
    assert set(picked) == {"Q4_1", "Q8_0"}
    for name, t in picked.items():
        rows = np.asarray(t.data)[:64]
        ref = gguf.quants.dequantize(rows, t.tensor_type)
        q = quant.from_gguf_blocks(rows, name.lower(), columns=int(t.shape[0]), axis=-1)
        np.testing.assert_array_equal(np.asarray(quant.dequantize(q)), ref)


def np_int8(w):
    rows = w.T.astype(np.float32)
    absmax = np.max(np.abs(rows), axis=-1, keepdims=True)
    scale = np.where(absmax == 0, np.float32(1), absmax * np.float32(1 / 127)).astype(np.float32)
    codes = np.clip(np.round(rows / scale), -127, 127)
    return (codes.astype(np.float32) * scale).T


def np_nf4(w, block):
    rows = w.T.astype(np.float32)
    blocks = rows.reshape(rows.shape[0], -1, block)
    absmax = np.max(np.abs(blocks), axis=-1, keepdims=True)
    normed = blocks / np.where(absmax == 0, np.float32(1), absmax)
    codes = np.argmin(np.abs(normed[..., None] - quant.NF4_TABLE), axis=-1)
    return (quant.NF4_TABLE[codes] * absmax).reshape(rows.shape).T


def test_nf4_table_is_the_published_one():
    assert quant.NF4_TABLE.shape == (16,) and quant.NF4_TABLE[0] == -1 and quant.NF4_TABLE[-1] == 1
    assert quant.NF4_TABLE[7] == 0 and np.all(np.diff(quant.NF4_TABLE) > 0)
    assert quant.NF4_TABLE[8] == np.float32(0.07958029955625534)


def test_int8_and_nf4_equal_numpy_reference_exactly():
    w = gaussian((128, 48), 1)
    np.testing.assert_array_equal(np.asarray(quant.dequantize(quant.quantize(w, format="int8"))),
                                  np_int8(w))
    np.testing.assert_array_equal(np.asarray(quant.dequantize(quant.quantize(w, format="nf4"))),
                                  np_nf4(w, 64))


# Round-trip bounds on N(0, 1) weights: max error <= half a quantization step of the block.
@pytest.mark.parametrize("fmt,kw,bound,bits", [
    ("int8", {}, lambda w: np.abs(w).max(0) / 127 / 2 * 1.0001, 8.0),
    ("int4", {}, None, 5.0),
    ("nf4", {}, None, 4.5),
    ("nf4", {"double_quant": True}, None, 4.25),
    ("q8_0", {}, None, 8.5),
    ("q4_0", {}, None, 4.5),
    ("q4_1", {}, None, 5.0),
])
def test_round_trip_error_bounds(fmt, kw, bound, bits):
    w = gaussian((512, 64), 2)
    q = quant.quantize(w, format=fmt, **kw)
    err = np.abs(np.asarray(quant.dequantize(q)) - w)
    rel = err.max() / np.abs(w).max()
    limits = {"int8": 1 / 254, "int4": 1 / 15, "nf4": 0.17, "q8_0": 1 / 127, "q4_0": 1 / 8,
              "q4_1": 1 / 15}
    assert rel <= limits[fmt] * 1.01, (fmt, rel)
    if bound is not None:
        assert np.all(err <= bound(w)[None, :])
    assert q.nbytes * 8 / w.size <= bits * 1.02


def test_bad_input():
    w = gaussian((96, 32))
    with pytest.raises(ValueError, match="format must be one of"):
        quant.quantize(w, format="fp3")
    with pytest.raises(ValueError, match=r"does not divide.*does not pad"):
        quant.quantize(w, format="nf4", block_size=64)
    with pytest.raises(ValueError, match="stack_axes=1"):
        quant.quantize(np.stack([w, w]), format="int8")
    assert quant.quantize(np.stack([w, w]), format="int4", block_size=32,
                          stack_axes=1).shape == (2, 96, 32)
    with pytest.raises(ValueError, match="non-finite"):
        quant.quantize(np.full((64, 4), np.nan, np.float32), format="int8")
    with pytest.raises(TypeError, match="floating"):
        quant.quantize(np.ones((64, 4), np.int32), format="int8")
    with pytest.raises(ValueError, match="take 20 bytes, raw has 10 per row"):
        quant.from_gguf_blocks(np.zeros((4, 10), np.uint8), "q4_1", columns=32)


# ---- quantized kernels in linear layers -----------------------------------------------------


def test_linear_with_quantized_kernel_and_gradients():
    w = gaussian((64, 32), 3)
    x = jnp.asarray(gaussian((5, 64), 4))
    q = quant.quantize(w, format="nf4")
    dense = quant.dequantize(q)
    y = jax.jit(jaxla.linear)({"w": q, "b": jnp.ones(32)}, x)
    np.testing.assert_allclose(y, jaxla.linear({"w": dense, "b": jnp.ones(32)}, x),
                               rtol=1e-5, atol=1e-5)
    params = {"l": {"w": q}}
    ad = lora.init(jax.random.key(0), params, rank=4, alpha=8, targets="l/w")["l/w"]
    ad = dataclasses.replace(ad, b=jnp.asarray(gaussian((32, 4), 5)))

    def loss(p, a, x):
        return jnp.sum(lora.linear(p, a, x) ** 2)

    gp, ga, gx = jax.grad(loss, argnums=(0, 1, 2), allow_int=True)({"w": q}, ad, x)
    _, ra, rx = jax.grad(loss, argnums=(0, 1, 2))({"w": dense}, ad, x)
    np.testing.assert_allclose(ga.a, ra.a, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ga.b, ra.b, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gx, rx, rtol=1e-4, atol=1e-4)
    assert gp["w"].codes.dtype == jax.dtypes.float0  # integer codes: no gradient
    assert float(jnp.abs(gp["w"].scales).max()) == 0.0  # scales are stop_gradient'ed
    with pytest.raises(ValueError, match="does not fit its weight"):
        lora.linear({"w": quant.quantize(gaussian((64, 64)), format="int8")}, ad, x)


def test_large_matrices_decode_one_block_of_rows_at_a_time(monkeypatch):
    """Above DECODE_BLOCK_BYTES the jnp product and dX = dY · Rows (the fused kernel's backward too)
    decode blocks of rows in a loop (with a tail block, or none): the same values as the float64
    product within 4·eps32·(|x| @ |W|), and no whole decoded matrix in the compiled program."""
    from jaxla.quant import _fused

    monkeypatch.setattr(_fused, "DECODE_BLOCK_BYTES", 2048)  # 512 f32: blocks of a few rows
    cases = [quant.quantize(gaussian((37, 64), 10), format="q8_0", axis=-1),  # a table: 4 x 8 + 5
             quant.quantize(gaussian((64, 32), 11), format="q4_0"),           # 4 x 8, no tail
             jax.jit(lambda w: quant.quantize(w, format="int4", block_size=32))(gaussian((64, 37), 12)),
             jax.jit(lambda w: quant.quantize(w, format="nf4", block_size=32, double_quant=True))(
                 gaussian((64, 37), 13))]
    assert [_fused._row_blocks(q) for q in cases[:2]] == [(8, 4, 5), (8, 4, 0)]
    x = jnp.asarray(gaussian((2, 3, 64), 14))
    dys = [jnp.asarray(gaussian((2, 3, q.rows), 15 + i)) for i, q in enumerate(cases)]

    def run(cases, x, dys):
        out = []
        for q, dy in zip(cases, dys, strict=True):
            y, vjp = jax.vjp(lambda x, q=q: quant.decoded_product(x, q, compute=jnp.float32,
                                                                   acc=jnp.float32), x)
            out.append((y, vjp(dy)[0], _fused._rows_grad(q, dy, jnp.float32, None)))
        return out

    compiled = jax.jit(run).lower(cases, x, dys).compile()
    hlo = compiled.as_text()
    assert "while" in hlo and not any(f"f32[{q.rows},64]" in hlo for q in cases)
    x64 = np.asarray(x, np.float64).reshape(6, 64)
    for q, dy, (y, dx, dx_fused) in zip(cases, dys, compiled(cases, x, dys), strict=True):
        w = np.asarray(quant.dequantize(q), np.float64)
        rows = w if q.axis == -1 else w.T                                      # (R, C)
        dy64 = np.asarray(dy, np.float64).reshape(6, -1)
        for got, want, scale in ((y, x64 @ rows.T, np.abs(x64) @ np.abs(rows).T),
                                 (dx, dy64 @ rows, np.abs(dy64) @ np.abs(rows)),
                                 (dx_fused, dy64 @ rows, np.abs(dy64) @ np.abs(rows))):
            err = np.abs(np.asarray(got, np.float64).reshape(want.shape) - want)
            assert np.all(err <= 4 * np.finfo(np.float32).eps * scale + 1e-30), q


def test_dora_on_a_quantized_base_equals_dora_on_its_dequantized_kernel():
    w = gaussian((64, 32), 6)
    x = jnp.asarray(gaussian((5, 64), 7))
    q = quant.quantize(w, format="nf4")
    dense = quant.dequantize(q, dtype=jnp.float32)
    ad_q = lora.init(jax.random.key(1), {"l": {"w": q}}, rank=4, alpha=8, targets="l/w", dora=True)
    ad_d = lora.init(jax.random.key(1), {"l": {"w": dense}}, rank=4, alpha=8, targets="l/w", dora=True)
    np.testing.assert_allclose(ad_q["l/w"].m, ad_d["l/w"].m, rtol=1e-6)  # m = the dequantized norms
    b = jnp.asarray(gaussian((32, 4), 8))
    aq, adn = (dataclasses.replace(a["l/w"], b=b) for a in (ad_q, ad_d))
    np.testing.assert_allclose(lora.linear({"w": q}, aq, x), lora.linear({"w": dense}, adn, x),
                               rtol=1e-5, atol=1e-5)
    for init_fn in (lora.init_pissa, lora.init_olora):  # they rewrite W: refused, clearly
        with pytest.raises(TypeError, match="quantized nf4 kernel that cannot be rewritten"):
            init_fn({"l": {"w": q}}, rank=4, alpha=8, targets="l/w")


def test_merge_quantized_dequantizes_or_requantizes_and_reports_error():
    w = gaussian((64, 32), 6)
    params = {"l": {"w": quant.quantize(w, format="int8")}}
    ad = lora.init(jax.random.key(1), params, rank=2, alpha=2, targets="l/w")
    ad = {k: dataclasses.replace(v, b=jnp.full(v.b.shape, 0.05)) for k, v in ad.items()}
    exact = np.asarray(quant.dequantize(params["l"]["w"])) + np.asarray(lora.delta(ad["l/w"]))
    merged, err = lora.merge(params, ad)
    np.testing.assert_allclose(merged["l"]["w"], exact, rtol=1e-6, atol=1e-6)
    assert float(err) < 1e-6
    requant, err = lora.merge(params, ad, requantize=True)
    assert isinstance(requant["l"]["w"], quant.QArray) and requant["l"]["w"].format == "int8"
    true_err = np.abs(np.asarray(quant.dequantize(requant["l"]["w"])) - exact).max()
    assert 0 < float(err) and abs(float(err) - true_err) <= 1e-6


# ---- models --------------------------------------------------------------------------------


def write_tiny_gguf(path: Path, *, rng):
    d, f, v, layers, heads, kv = 64, 96, 64, 2, 4, 2
    hd = d // heads
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("context_length", 64), ("embedding_length", d), ("block_count", layers),
                       ("feed_forward_length", f), ("attention.head_count", heads),
                       ("attention.head_count_kv", kv), ("vocab_size", v)):
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.rope.freq_base", 10000.0)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)

    def add(name, x, kind):
        x = np.asarray(x, np.float32)
        if kind == Q.F32:
            writer.add_tensor(name, x)
        else:
            writer.add_tensor(name, gguf.quants.quantize(x, kind), raw_dtype=kind)

    add("token_embd.weight", rng.standard_normal((v, d)), Q.Q8_0)
    add("output_norm.weight", 1 + 0.1 * rng.standard_normal(d), Q.F32)
    shapes = {"attn_q": (d, d), "attn_k": (kv * hd, d), "attn_v": (kv * hd, d),
              "attn_output": (d, d), "ffn_gate": (f, d), "ffn_up": (f, d), "ffn_down": (d, f)}
    for i in range(layers):
        for name, (o, n_in) in shapes.items():
            add(f"blk.{i}.{name}.weight", rng.standard_normal((o, n_in)) / np.sqrt(n_in), Q.Q4_1)
        for name in ("attn_norm", "ffn_norm"):
            add(f"blk.{i}.{name}.weight", 1 + 0.1 * rng.standard_normal(d), Q.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    path = write_tiny_gguf(tmp_path_factory.mktemp("q") / "tiny.gguf", rng=np.random.default_rng(7))
    return models.load(path, keep_quantized=True), models.load(path)


def test_kept_quantized_gguf_forward_equals_dequantized(tiny_pair):
    kept, dense = tiny_pair
    q = kept.params["layers"]["attn"]["q"]["w"]
    assert isinstance(q, quant.QArray) and q.format == "q4_1" and q.shape == (2, 64, 64)
    assert isinstance(kept.params["embed"]["table"], quant.QArray)
    for path in ("attn/q", "attn/k", "mlp/down"):
        group, name = path.split("/")
        np.testing.assert_array_equal(quant.dequantize(kept.params["layers"][group][name]["w"]),
                                      dense.params["layers"][group][name]["w"])
    ids = jnp.asarray([[1, 5, 9, 2, 33, 63]], jnp.int32)
    run = jax.jit(lambda p: models.forward(dense.config, p, ids))
    np.testing.assert_allclose(run(kept.params), run(dense.params), rtol=1e-5, atol=1e-5)
    greedy = [np.asarray(models.generate(dense.config, p, ids, max_new_tokens=3))
              for p in (kept.params, dense.params)]
    np.testing.assert_array_equal(*greedy)
    assert quant.tree_nbytes(kept.params) < 0.3 * quant.tree_nbytes(dense.params)


def test_models_quantize_and_qlora_step_equals_lora_step(tiny_pair):
    _, dense = tiny_pair
    qmodel = models.quantize(dense, format="nf4", block_size=32)
    assert isinstance(qmodel.params["layers"]["mlp"]["up"]["w"], quant.QArray)
    assert not quant.is_qarray(qmodel.params["embed"]["table"])
    base = jax.tree.map(lambda x: quant.dequantize(x) if quant.is_qarray(x) else x, qmodel.params,
                        is_leaf=quant.is_qarray)
    targets = ["layers/attn/q/w", "layers/mlp/up/w"]
    ad = lora.init(jax.random.key(2), base, rank=4, alpha=8, targets=targets, stack_axes=1)
    ad = {k: dataclasses.replace(v, b=0.01 * jnp.ones_like(v.b)) for k, v in ad.items()}
    ids = jnp.asarray([[3, 4, 5, 6, 7, 8, 9, 10]], jnp.int32)
    opt = optax.adam(1e-2)

    def loss(params, adapters):
        logits = models.forward(dense.config, params, ids[:, :-1], adapters=adapters)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    step = lora.train_step(loss, opt)
    state = opt.init(ad)
    new_q, state_q, loss_q = step(qmodel.params, ad, state)
    new_f, _, loss_f = step(base, ad, state)
    grads_q = jax.jit(jax.grad(loss, argnums=1))(qmodel.params, ad)
    np.testing.assert_allclose(loss_q, loss_f, rtol=1e-5)
    for k in ad:
        np.testing.assert_allclose(new_q[k].a, new_f[k].a, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(new_q[k].b, new_f[k].b, rtol=1e-4, atol=1e-5)
    # W is in neither the gradient nor the optimizer state: only adapter leaves, adapter-sized.
    n_adapter = sum(x.size for x in jax.tree.leaves(ad))
    assert sum(x.size for x in jax.tree.leaves(grads_q)) == n_adapter
    assert not any(quant.is_qarray(x) for x in jax.tree.leaves(state_q, is_leaf=quant.is_qarray))
    assert sum(x.size for x in jax.tree.leaves(state_q) if x.ndim) == 2 * n_adapter


def test_load_keep_quantized_bad_input(tmp_path):
    with pytest.raises(TypeError, match="keep_quantized"):
        models.load(tmp_path, keep_quantized="yes")
    with pytest.raises(TypeError, match="Model"):
        models.quantize({"w": 1}, format="nf4")


def test_public_names():
    assert jaxla.quant is quant and "quant" in jaxla.__all__
    assert all(hasattr(quant, name) for name in quant.__all__)
    assert "quantize" in models.__all__ and models.quantize
