"""The Llama family against an independent float64 NumPy decoder, on tiny random checkpoints the
tests write as Hugging Face directories and as GGUF files (F32, F16, Q8_0, Q4_1); the tokenizer
rebuilt from GGUF metadata; generation over the KV cache; bad input; the real SmolLM2 file when
cached."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from llama_checkpoint import (  # noqa: E402
    TINY,
    random_weights,
    tiny_tokenizer,
    write_gguf,
    write_hf,
)

from jaxla import lora, models  # noqa: E402

Q = gguf.GGMLQuantizationType

VARIANTS = {
    "llama": dict(model_type="llama", tie_word_embeddings=False),
    "smollm_tied": dict(model_type="llama", tie_word_embeddings=True),
    "qwen2_bias": dict(model_type="qwen2", tie_word_embeddings=False),
    "mistral_window": dict(model_type="mistral", tie_word_embeddings=False, sliding_window=3),
    "llama3_rope": dict(model_type="llama", tie_word_embeddings=True, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
}


# ------------------------------------------------------------------------------------------------
# An independent float64 NumPy Llama (Hugging Face layout: weights (out, in)).


def np_inv_freq(hf):
    h = hf["hidden_size"] // hf["num_attention_heads"]
    inv = 1.0 / hf["rope_theta"] ** (np.arange(0, h, 2) / h)
    scaling = hf.get("rope_scaling")
    if scaling:
        f, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        out = []
        for w in inv:
            wavelength = 2 * math.pi / w
            if wavelength < old / hi:
                out.append(w)
            elif wavelength > old / lo:
                out.append(w / f)
            else:
                smooth = (old / wavelength - lo) / (hi - lo)
                out.append((1 - smooth) * w / f + smooth * w)
        inv = np.array(out)
    return inv


def np_rope(x, pos, inv):  # x (T, N, H), pos (T,)
    ang = pos[:, None] * inv[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def np_rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def np_forward(hf, w, ids):
    """Logits (T, V) of one unpadded sequence."""
    w = {k: np.asarray(v, np.float64) for k, v in w.items()}
    n, kv = hf["num_attention_heads"], hf["num_key_value_heads"]
    h = hf["hidden_size"] // n
    eps, t = hf["rms_norm_eps"], len(ids)
    inv, pos = np_inv_freq(hf), np.arange(t, dtype=np.float64)
    window = hf.get("sliding_window")
    x = w["model.embed_tokens.weight"][ids]
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    visible = j <= i
    if window:
        visible &= i - j < window

    def proj(x, name):
        y = x @ w[name + ".weight"].T
        return y + w[name + ".bias"] if name + ".bias" in w else y

    for layer in range(hf["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        a = np_rms(x, w[p + "input_layernorm.weight"], eps)
        q = np_rope(proj(a, p + "self_attn.q_proj").reshape(t, n, h), pos, inv)
        k = np_rope(proj(a, p + "self_attn.k_proj").reshape(t, kv, h), pos, inv)
        v = proj(a, p + "self_attn.v_proj").reshape(t, kv, h)
        out = np.zeros((t, n, h))
        for head in range(n):
            g = head // (n // kv)
            s = q[:, head] @ k[:, g].T / math.sqrt(h)
            s = np.where(visible, s, -np.inf)
            s = np.exp(s - s.max(-1, keepdims=True))
            out[:, head] = (s / s.sum(-1, keepdims=True)) @ v[:, g]
        x = x + proj(out.reshape(t, n * h), p + "self_attn.o_proj")
        m = np_rms(x, w[p + "post_attention_layernorm.weight"], eps)
        gate, up = proj(m, p + "mlp.gate_proj"), proj(m, p + "mlp.up_proj")
        x = x + proj(gate / (1 + np.exp(-gate)) * up, p + "mlp.down_proj")
    x = np_rms(x, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if hf["tie_word_embeddings"] else w["lm_head.weight"]
    return x @ head.T


def batch_logits(model, rows):
    return np.asarray(models.forward(model.config, model.params, jnp.asarray(rows, jnp.int32)))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``{variant: (hf config dict, weights, directory)}``, written once for the module."""
    rng = np.random.default_rng(13)
    root = tmp_path_factory.mktemp("llama")
    out = {}
    for name, extra in VARIANTS.items():
        hf = {**TINY, **extra}
        w = random_weights(hf, rng)
        out[name] = (hf, w, write_hf(root / name, hf, w))
    return out


IDS = np.array([[5, 17, 3, 66, 0, 42, 8, 9, 21, 1]], np.int32)


# ------------------------------------------------------------------------------------------------
# Forward against the reference.


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hf_forward_matches_numpy(checkpoints, variant):
    hf, w, directory = checkpoints[variant]
    model = models.load(directory)
    assert isinstance(model.config, models.LlamaConfig)
    assert ("lm_head" in model.params) == (not hf["tie_word_embeddings"])
    got = batch_logits(model, IDS)
    assert got.shape == (1, IDS.shape[1], hf["vocab_size"]) and got.dtype == np.float32
    np.testing.assert_allclose(got[0], np_forward(hf, w, IDS[0]), atol=1e-5, rtol=1e-5)


def test_bfloat16_params_track_the_reference(checkpoints):
    hf, w, directory = checkpoints["smollm_tied"]
    model = models.load(directory, dtype=jnp.bfloat16)
    assert model.params["layers"]["attn"]["q"]["w"].dtype == jnp.bfloat16
    got = batch_logits(model, IDS)
    assert got.dtype == np.float32
    ref = np_forward(hf, w, IDS[0])
    # bf16 keeps 8 bits of mantissa: a few percent of the logits' spread after two layers.
    np.testing.assert_allclose(got[0], ref, atol=0.05 * np.abs(ref).max())


def test_padding_left_and_right_equal_unpadded_rows(checkpoints):
    hf, w, directory = checkpoints["mistral_window"]
    model = models.load(directory)
    a, b = [4, 9, 2, 33, 7], [11, 12, 13]
    ids = jnp.asarray([a, [0, 0, *b]], jnp.int32)
    left = models.forward(model.config, model.params, ids,
                          attention_mask=jnp.asarray([[True] * 5, [False] * 2 + [True] * 3]))
    right = models.forward(model.config, model.params, jnp.asarray([a, [*b, 0, 0]], jnp.int32),
                           attention_mask=jnp.asarray([[True] * 5, [True] * 3 + [False] * 2]))
    ref_a, ref_b = np_forward(hf, w, np.array(a)), np_forward(hf, w, np.array(b))
    np.testing.assert_allclose(left[0], ref_a, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(left[1, 2:], ref_b, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(right[1, :3], ref_b, atol=1e-5, rtol=1e-5)
    assert np.all(np.isfinite(left)) and np.all(np.isfinite(right))


def test_adapters_equal_merged_weights_and_differentiate(checkpoints):
    _, _, directory = checkpoints["llama"]
    model = models.load(directory)
    targets = ("layers/attn/q/w", "layers/mlp/down/w")
    adapters = lora.init(jax.random.key(1), model.params, rank=2, alpha=4.0, targets=targets,
                         stack_axes=1)
    adapters = {k: dataclasses.replace(v, b=0.3 * jax.random.normal(jax.random.key(2), v.b.shape))
                for k, v in adapters.items()}
    ids = jnp.asarray(IDS)
    merged, _ = lora.merge(model.params, adapters)
    np.testing.assert_allclose(models.forward(model.config, model.params, ids, adapters=adapters),
                               models.forward(model.config, merged, ids), atol=1e-4, rtol=1e-4)
    loss = jax.jit(jax.grad(lambda ad: jnp.mean(models.forward(model.config, model.params, ids,
                                                               adapters=ad) ** 2)))
    grads = loss(adapters)
    assert all(float(jnp.max(jnp.abs(g.a))) > 0 for g in grads.values())


# ------------------------------------------------------------------------------------------------
# GGUF.


def test_gguf_f32_matches_numpy_and_tokenizer_matches_reference(tmp_path, rng):
    ref, meta = tiny_tokenizer()
    hf = {**TINY, **VARIANTS["llama"], "vocab_size": len(meta[0])}
    w = random_weights(hf, rng)
    path = tmp_path / "tiny.gguf"
    seen = write_gguf(path, hf, w, tokenizer=meta, template="{{ x }}<|im_start|><|im_end|>")
    model = models.load(path)
    assert model.chat_template.startswith("{{ x }}")
    assert model.config.vocab_size == len(meta[0])
    np.testing.assert_allclose(batch_logits(model, IDS)[0], np_forward(hf, seen, IDS[0]),
                               atol=1e-5, rtol=1e-5)
    for text in ["the cat sat on the mat", "hello, wörld 123 !", "  spaces\nand lines", "<eos>x"]:
        got = model.tokenizer.encode(text)
        assert got.ids == ref.encode(text).ids, text
        assert model.tokenizer.decode(got.ids, skip_special_tokens=False) == text


def test_gguf_quantized_matches_numpy_on_dequantized_weights(tmp_path, rng):
    hf = {**TINY, **VARIANTS["smollm_tied"]}
    w = random_weights(hf, rng)
    path = tmp_path / "q.gguf"
    types = {"token_embd.weight": Q.Q8_0, "attn_q.weight": Q.Q4_1, "attn_k.weight": Q.Q4_1,
             "attn_v.weight": Q.Q8_0, "attn_output.weight": Q.F16, "ffn_gate.weight": Q.Q4_1,
             "ffn_up.weight": Q.Q4_1, "ffn_down.weight": Q.Q4_1}
    seen = write_gguf(path, hf, w, types=types)
    assert not np.allclose(seen["model.layers.0.self_attn.q_proj.weight"],
                           w["model.layers.0.self_attn.q_proj.weight"])  # really quantized
    model = models.load(path)
    assert model.config.tie_word_embeddings and model.tokenizer is None
    np.testing.assert_allclose(batch_logits(model, IDS)[0], np_forward(hf, seen, IDS[0]),
                               atol=1e-5, rtol=1e-5)


def test_gguf_qwen2_is_not_permuted_and_has_biases(tmp_path, rng):
    hf = {**TINY, **VARIANTS["qwen2_bias"]}
    w = random_weights(hf, rng)
    path = tmp_path / "qwen.gguf"
    seen = write_gguf(path, hf, w, arch="qwen2")
    model = models.load(path)
    assert model.config.qkv_bias
    np.testing.assert_allclose(batch_logits(model, IDS)[0], np_forward(hf, seen, IDS[0]),
                               atol=1e-5, rtol=1e-5)


def test_gguf_bad_files_are_named(tmp_path, rng):
    hf = {**TINY, **VARIANTS["llama"]}
    w = random_weights(hf, rng)
    good = tmp_path / "good.gguf"
    write_gguf(good, hf, w)
    data = good.read_bytes()
    (tmp_path / "short.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"short.gguf"):
        models.load(tmp_path / "short.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"PK\x03\x04" + data[4:200])
    with pytest.raises(ValueError, match="not a GGUF file"):
        models.load(tmp_path / "junk.gguf")
    write_gguf(tmp_path / "missing.gguf", hf, w, skip={"blk.1.ffn_up.weight"})
    with pytest.raises(ValueError, match=r"missing tensor 'blk.1.ffn_up.weight'"):
        models.load(tmp_path / "missing.gguf")
    bad = dict(w)
    bad["model.layers.0.mlp.up_proj.weight"] = np.zeros((32, 32), np.float32)
    write_gguf(tmp_path / "shape.gguf", hf, bad)
    with pytest.raises(ValueError, match=r"up_proj.*\(32, 32\).*\(64, 32\)"):
        models.load(tmp_path / "shape.gguf")
    write_gguf(tmp_path / "arch.gguf", hf, w, arch="mamba")
    with pytest.raises(ValueError, match=r"unsupported GGUF architecture 'mamba'.*'llama'"):
        models.load(tmp_path / "arch.gguf")
    writer = gguf.GGUFWriter(str(tmp_path / "type.gguf"), "llama")
    for key in ("context_length", "embedding_length", "block_count", "feed_forward_length",
                "attention.head_count", "vocab_size"):
        writer.add_uint32(f"llama.{key}", {"context_length": 64, "block_count": 1,
                                           "feed_forward_length": 64, "vocab_size": 256,
                                           "attention.head_count": 4}.get(key, 32))
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    block, size = gguf.GGML_QUANT_SIZES[Q.IQ4_NL]
    writer.add_tensor("token_embd.weight", np.zeros((256, 32 // block * size), np.uint8),
                      raw_dtype=Q.IQ4_NL)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"token_embd.weight.*unsupported type IQ4_NL"):
        models.load(tmp_path / "type.gguf")


# ------------------------------------------------------------------------------------------------
# Bad input to the HF reader and the forward.


def test_hf_bad_configs_and_ids(checkpoints, tmp_path):
    hf, w, directory = checkpoints["llama"]
    with pytest.raises(ValueError, match=r"no config.json"):
        models.load(tmp_path)
    write_hf(tmp_path / "yarn", {**hf, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, w)
    with pytest.raises(ValueError, match=r"rope_scaling type 'yarn'.*'llama3'"):
        models.load(tmp_path / "yarn")
    model = models.load(directory)
    with pytest.raises(ValueError, match=r"vocab_size=67.*\[67\]"):
        models.forward(model.config, model.params, jnp.asarray([[1, 67]]))
    with pytest.raises(ValueError, match="context"):
        models.forward(model.config, model.params, jnp.zeros((1, 65), jnp.int32))
    with pytest.raises(TypeError, match="attention_mask must be boolean"):
        models.forward(model.config, model.params, jnp.asarray(IDS), attention_mask=jnp.ones((1, 10)))
    # Under jit the ids are not concrete: an out-of-range id gives NaN, never a plausible number.
    fwd = jax.jit(lambda ids: models.forward(model.config, model.params, ids))
    assert np.all(np.isnan(fwd(jnp.asarray([[3, 99]]))[0, 1]))


# ------------------------------------------------------------------------------------------------
# Generation.


def greedy_by_forward(model, ids, steps):
    ids = list(ids)
    for _ in range(steps):
        ids.append(int(np.argmax(batch_logits(model, [ids])[0, -1])))
    return ids[-steps:]


def test_generate_cache_equals_full_forward_and_left_padding(checkpoints):
    _hf, _, directory = checkpoints["mistral_window"]
    model = models.load(directory)
    a, b = [4, 9, 2, 33, 7], [11, 12, 13]
    out = models.generate(model.config, model.params, jnp.asarray([a, [0, 0, *b]], jnp.int32),
                          attention_mask=jnp.asarray([[True] * 5, [False] * 2 + [True] * 3]),
                          max_new_tokens=6)
    assert out.shape == (2, 6) and out.dtype == jnp.int32
    assert out[0].tolist() == greedy_by_forward(model, a, 6)
    assert out[1].tolist() == greedy_by_forward(model, b, 6)


def test_generate_stops_rows_at_eos_and_samples_with_key(checkpoints):
    _, _, directory = checkpoints["llama"]
    model = models.load(directory)
    prompt = jnp.asarray(IDS)
    free = models.generate(model.config, model.params, prompt, max_new_tokens=6)[0].tolist()
    eos = free[2]
    stopped = models.generate(model.config, model.params, prompt, max_new_tokens=6, eos_id=eos)
    first = free.index(eos)
    assert stopped[0].tolist() == free[: first + 1] + [eos] * (5 - first)
    tiny_p = models.generate(model.config, model.params, prompt, max_new_tokens=6, temperature=1.0,
                             top_p=1e-6, key=jax.random.key(0))
    assert tiny_p[0].tolist() == free  # the nucleus holds only the argmax
    kw = dict(max_new_tokens=6, temperature=1.5, key=jax.random.key(3))
    s1 = models.generate(model.config, model.params, prompt, **kw)
    np.testing.assert_array_equal(s1, models.generate(model.config, model.params, prompt, **kw))
    assert np.all((np.asarray(s1) >= 0) & (np.asarray(s1) < model.config.vocab_size))


def test_generate_with_adapters_equals_merged_weights(checkpoints):
    _, _, directory = checkpoints["qwen2_bias"]
    model = models.load(directory)
    adapters = lora.init(jax.random.key(4), model.params, rank=2, alpha=8.0,
                         targets=("layers/attn/v/w", "layers/mlp/up/w"), stack_axes=1)
    adapters = {k: dataclasses.replace(v, b=jax.random.normal(jax.random.key(5), v.b.shape))
                for k, v in adapters.items()}
    merged, _ = lora.merge(model.params, adapters)
    prompt = jnp.asarray(IDS)
    adapted = models.generate(model.config, model.params, prompt, max_new_tokens=5, adapters=adapters)
    np.testing.assert_array_equal(adapted, models.generate(model.config, merged, prompt,
                                                           max_new_tokens=5))
    assert adapted[0].tolist() != models.generate(model.config, model.params, prompt,
                                                  max_new_tokens=5)[0].tolist()


def test_generate_bad_input(checkpoints):
    _, _, directory = checkpoints["llama"]
    model = models.load(directory)
    prompt = jnp.asarray(IDS)
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        models.generate(model.config, model.params, prompt, max_new_tokens=60)
    with pytest.raises(ValueError, match="key"):
        models.generate(model.config, model.params, prompt, max_new_tokens=2, temperature=0.7)
    with pytest.raises(ValueError, match="vocab_size"):
        models.generate(model.config, model.params, jnp.asarray([[70]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="left-padded"):
        models.generate(model.config, model.params, jnp.asarray([[1, 2]]), max_new_tokens=2,
                        attention_mask=jnp.asarray([[True, False]]))


def test_format_chat_chatml():
    template = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                "{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + "
                "message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    assert models.format_chat(template, [{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert models.format_chat(template, [{"role": "system", "content": "S"}, {"role": "user",
                              "content": "Hi"}], add_generation_prompt=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")
    with pytest.raises(ValueError, match="role"):
        models.format_chat(template, [{"content": "no role"}])


# ------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct, when `jaxla download smollm2-135m-instruct` has cached it.


def smollm2_file():
    cache = Path(os.environ.get("JAXLA_CACHE", Path.home() / ".cache" / "jaxla"))
    found = sorted((cache / "smollm2-135m-instruct").glob("**/*.gguf"))
    return found[0] if found else None


@pytest.mark.skipif(smollm2_file() is None, reason="SmolLM2 not cached (jaxla download "
                    "smollm2-135m-instruct)")
def test_smollm2_real_file():
    model = models.load(smollm2_file())
    c = model.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (
        30, 576, 9, 3, 64, 49152)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0
    tok = model.tokenizer
    assert tok.token_to_id("<|im_start|>") == 1 and tok.token_to_id("<|im_end|>") == 2
    text = models.format_chat(model, [{"role": "user", "content": "What is the capital of France?"}])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert tok.encode("Hello, world! 2024").tokens == ["Hello", ",", "Ġworld", "!", "Ġ", "2", "0",
                                                       "2", "4"]
    prompts = [tok.encode(text).ids, tok.encode("The three primary colors are").ids]
    width = max(map(len, prompts))
    ids = jnp.asarray([[2] * (width - len(p)) + p for p in prompts], jnp.int32)
    mask = jnp.asarray([[False] * (width - len(p)) + [True] * len(p) for p in prompts])
    out = np.asarray(models.generate(c, model.params, ids, attention_mask=mask, max_new_tokens=12,
                                     eos_id=2))
    answer = tok.decode(out[0].tolist(), skip_special_tokens=True)
    assert "Paris" in answer, answer
    colors = tok.decode(out[1].tolist(), skip_special_tokens=True).lower()
    assert sum(c in colors for c in ("red", "blue", "yellow", "green")) >= 2, colors


def test_quantized_layers_are_read_in_place_with_the_same_outputs(checkpoints, monkeypatch):
    """A kept-quantized base's stacked kernels reach the fused kernel whole with the layer index
    (no per-layer copy of the slice); forward logits equal the sliced path's bitwise, and
    generate's cache decode equals greedy decoding by full forwards."""
    from jaxla.models import _llama
    from jaxla.quant import _fused

    _hf, _, directory = checkpoints["qwen2_bias"]  # biases: the in-place path adds them too
    targets = [f"layers/{p}/w" for p in ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/gate",
                                          "mlp/up", "mlp/down")]
    model = models.quantize(models.load(directory), format="q4_1", targets=targets)
    fused = _fused.layer_reason(model.params["layers"]["attn"]["q"]["w"], 10) is None
    ids = jnp.asarray(IDS[:, :7])
    out = models.generate(model.config, model.params, ids, max_new_tokens=3)
    assert out[0].tolist() == greedy_by_forward(model, IDS[0, :7].tolist(), 3)
    gen_jaxpr = str(jax.make_jaxpr(lambda p: models.generate(model.config, p, ids,
                                                             max_new_tokens=3))(model.params))
    assert ("jaxla_quant_matmul_layer" in gen_jaxpr) == fused

    def forward(params):
        return jax.jit(lambda p: models.forward(model.config, p, ids))(params)

    in_place = forward(model.params)
    monkeypatch.setattr(_llama, "split_in_place", lambda layers, rows: (dict(layers), {}))
    np.testing.assert_array_equal(in_place, forward(model.params))


def test_remat_and_the_chunked_head_loss_keep_values_and_gradients(checkpoints):
    """forward(remat=True) and the quant benchmark's lean loss (remat per layer, the vocabulary
    head in checkpointed chunks) give the plain forward's loss and adapter gradients."""
    from jaxla.benchmarks import quant as quant_bench
    from jaxla.models import _llama

    _, _, directory = checkpoints["smollm_tied"]  # tied head: logits_of on the embedding table
    model = models.load(directory)
    adapters = lora.init(jax.random.key(1), model.params, rank=2, alpha=4.0,
                         targets=("layers/attn/q/w", "layers/mlp/up/w"), stack_axes=1)
    adapters = {k: dataclasses.replace(v, b=0.3 * jax.random.normal(jax.random.key(2), v.b.shape))
                for k, v in adapters.items()}
    ids = jnp.asarray(np.tile(IDS, (2, 1)))

    def plain(ad, remat):
        logits = _llama.forward(model.config, model.params, ids[:, :-1], adapters=ad, remat=remat)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    def lean(ad):
        return quant_bench._lean_loss(model.config, model.params, ad, ids)

    results = jax.jit(lambda ad: [jax.value_and_grad(f)(ad) for f in (
        lambda a: plain(a, False), lambda a: plain(a, True), lean)])(adapters)
    (want, want_grads), *others = results
    for loss, grads in others:
        np.testing.assert_allclose(loss, want, rtol=1e-6)
        for k in want_grads:  # the same sums in another order: f32 rounding of the largest
            for got, ref in ((grads[k].a, want_grads[k].a), (grads[k].b, want_grads[k].b)):
                np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * float(np.abs(ref).max()))
    with pytest.raises(TypeError, match="remat must be a bool"):
        _llama.forward(model.config, model.params, ids, remat="yes")
