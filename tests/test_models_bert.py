"""The BERT family through jaxla.models: tiny random checkpoints against a float64 NumPy BERT, padding,
embeddings, adapters, bad input, and the real all-MiniLM-L6-v2 when it is in the cache."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxla import lora, models
from jaxla.models import BertConfig
from tests.bert_checkpoint import TINY, np_bert, np_mean_pool, tiny_tensors, write_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def tiny(tmp_path, rng):
    tensors = write_checkpoint(tmp_path / "ckpt", rng)
    return models.load(tmp_path / "ckpt"), tensors


def test_config_from_hf_reads_minilm_config():
    hf = dict(TINY, vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
              intermediate_size=1536, max_position_embeddings=512)
    config = models.BertConfig(vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12,
                               intermediate_size=1536)
    from jaxla.models import _bert

    assert _bert.config_from_hf(hf) == config
    assert config.head_dim == 32 and config.layer_norm_eps == 1e-12 and config.hidden_act == "gelu"


@pytest.mark.parametrize("prefix, act", [("", "gelu"), ("bert.", "gelu_new")])
def test_hidden_states_match_float64_numpy(tmp_path, rng, prefix, act):
    hf = dict(TINY, hidden_act=act)
    tensors = write_checkpoint(tmp_path, rng, hf, prefix=prefix)
    model = models.load(tmp_path)
    assert isinstance(model.config, BertConfig) and model.config.hidden_act == act
    assert model.params["layers"]["attn"]["q"]["w"].shape == (2, 16, 16)  # stacked, (in, out)
    ids = rng.integers(0, hf["vocab_size"], (2, 7))
    types = rng.integers(0, 2, (2, 7))
    from jaxla.models import _bert

    out = _bert.forward(model.config, model.params, jnp.asarray(ids, jnp.int32),
                        token_type_ids=jnp.asarray(types, jnp.int32))
    ref = np_bert(tensors, hf, ids, token_types=types, prefix=prefix)
    assert out.shape == (2, 7, 16) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=0)


def test_padded_rows_equal_unpadded_rows(tiny, rng):
    model, tensors = tiny
    lengths, t = (4, 7, 5), 7
    rows = [rng.integers(4, TINY["vocab_size"], n) for n in lengths]
    forward = jax.jit(models.forward, static_argnums=0)
    for side in ("right", "left"):
        ids = np.zeros((3, t), np.int32)
        mask = np.zeros((3, t), bool)
        for i, row in enumerate(rows):
            sl = slice(0, len(row)) if side == "right" else slice(t - len(row), t)
            ids[i, sl], mask[i, sl] = row, True
        out = np.asarray(forward(model.config, model.params, jnp.asarray(ids),
                                 attention_mask=jnp.asarray(mask)))
        assert np.all(np.isfinite(out))
        for i, row in enumerate(rows):
            alone = np_bert(tensors, TINY, row[None])[0]
            np.testing.assert_allclose(out[i][mask[i]], alone, atol=1e-5, rtol=0, err_msg=side)


def test_embed_equals_numpy_mean_pooling(tiny, rng):
    model, tensors = tiny
    ids = rng.integers(4, TINY["vocab_size"], (3, 6))
    mask = np.array([[1] * 6, [1] * 3 + [0] * 3, [1] * 5 + [0]], bool)
    emb = models.embed(model.config, model.params, jnp.asarray(ids, jnp.int32),
                       attention_mask=jnp.asarray(mask))
    ref = np_mean_pool(np_bert(tensors, TINY, ids, mask), mask)
    np.testing.assert_allclose(np.asarray(emb), ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(emb), axis=-1), 1.0, atol=1e-6)
    # A row with no real token: finite hidden states (no key visible gives zeros) and a zero embedding.
    none = jnp.zeros((1, 6), jnp.bool_)
    hidden = models.forward(model.config, model.params, jnp.asarray(ids[:1], jnp.int32),
                            attention_mask=none)
    assert np.all(np.isfinite(np.asarray(hidden)))
    empty = models.embed(model.config, model.params, jnp.asarray(ids[:1], jnp.int32),
                         attention_mask=none)
    np.testing.assert_array_equal(np.asarray(empty), 0.0)


def test_bfloat16_params(tmp_path, rng):
    tensors = write_checkpoint(tmp_path, rng, tokenizer=False)
    model = models.load(tmp_path, dtype=jnp.bfloat16)
    assert model.params["layers"]["mlp"]["up"]["w"].dtype == jnp.bfloat16
    ids = rng.integers(0, TINY["vocab_size"], (1, 5))
    out = models.forward(model.config, model.params, jnp.asarray(ids, jnp.int32))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np_bert(tensors, TINY, ids), atol=0.1)


def test_tokenizer_encodes_wordpiece_with_cls_and_sep(tiny):
    model, _ = tiny
    enc = model.tokenizer.encode("The cats sat")
    assert enc.tokens == ["[CLS]", "the", "cat", "##s", "sat", "[SEP]"]
    assert model.tokenizer.decode(enc.ids) == "the cats sat"


def test_adapters_apply_inside_the_scan_and_are_differentiable(tiny, rng, key):
    model, _ = tiny
    adapters = lora.init(key, model.params, rank=2, alpha=4.0, targets=r"layers/(attn/(q|v)|mlp/down)/w",
                         stack_axes=1)
    adapters = {k: lora.Adapter(ad.a, jnp.asarray(rng.standard_normal(ad.b.shape) * 0.3, jnp.float32),
                                ad.alpha) for k, ad in adapters.items()}
    ids = jnp.asarray(rng.integers(0, TINY["vocab_size"], (2, 5)), jnp.int32)
    merged, _ = lora.merge(model.params, adapters)
    with_adapters = models.forward(model.config, model.params, ids, adapters=adapters)
    np.testing.assert_allclose(np.asarray(with_adapters),
                               np.asarray(models.forward(model.config, merged, ids)), atol=2e-5)
    assert not np.allclose(np.asarray(with_adapters),
                           np.asarray(models.forward(model.config, model.params, ids)), atol=1e-3)
    embedding_adapter = lora.init(key, model.params, rank=2, alpha=4.0, targets="embeddings/word")
    with pytest.raises(ValueError, match=r"adapters \['embeddings/word'\] are not applied"):
        models.forward(model.config, model.params, ids, adapters=embedding_adapter)
    grads = jax.grad(lambda ad: jnp.sum(models.forward(model.config, model.params, ids,
                                                       adapters=ad) ** 3))(adapters)
    assert all(np.all(np.isfinite(np.asarray(g.b))) and np.any(np.asarray(g.b) != 0)
               for g in grads.values())


def test_layers_run_under_one_scan(tiny):
    model, _ = tiny
    jaxpr = str(jax.make_jaxpr(lambda p, x: models.forward(model.config, p, x))(
        model.params, jnp.zeros((1, 4), jnp.int32)))
    assert jaxpr.count("scan[") == 1


# ---- bad input ----

def test_directory_without_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"no config\.json"):
        models.load(tmp_path)


def test_unsupported_model_type_lists_supported(tmp_path, rng):
    write_checkpoint(tmp_path, rng, dict(TINY, model_type="gpt2"))
    with pytest.raises(ValueError, match=r"unsupported model_type 'gpt2'.*'bert' \(bert\)"):
        models.load(tmp_path)


@pytest.mark.parametrize("key, value, match", [
    ("position_embedding_type", "relative_key", "position_embedding_type 'relative_key'"),
    ("hidden_act", "silu", "hidden_act 'silu'"),
    ("is_decoder", True, "is_decoder=True"),
    ("num_attention_heads", 5, "multiple of num_attention_heads=5"),
    ("layer_norm_eps", -1.0, "layer_norm_eps must be a finite number"),
    ("hidden_size", "16", "hidden_size must be a positive integer"),
])
def test_unsupported_config_option_names_the_key(tmp_path, key, value, match):
    (tmp_path / "config.json").write_text(json.dumps(dict(TINY, **{key: value})))
    with pytest.raises(ValueError, match=match):
        models.load(tmp_path)


def test_missing_config_key(tmp_path):
    hf = {k: v for k, v in TINY.items() if k != "intermediate_size"}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=r"missing keys.*intermediate_size"):
        models.load(tmp_path)


def test_truncated_safetensors(tmp_path, rng):
    write_checkpoint(tmp_path, rng, tokenizer=False)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
        models.load(tmp_path)


def test_missing_and_misshaped_tensors_are_named(tmp_path, rng):
    tensors = tiny_tensors(rng, TINY)
    del tensors["encoder.layer.1.output.dense.bias"]
    write_checkpoint(tmp_path / "a", rng, tensors=tensors, tokenizer=False)
    with pytest.raises(ValueError, match=r"missing tensor 'encoder\.layer\.1\.output\.dense\.bias'"):
        models.load(tmp_path / "a")
    tensors = tiny_tensors(rng, TINY)
    tensors["encoder.layer.0.intermediate.dense.weight"] = np.zeros((16, 24), np.float32)
    write_checkpoint(tmp_path / "b", rng, tensors=tensors, tokenizer=False)
    with pytest.raises(ValueError, match=r"'encoder.layer.0.intermediate.dense.weight' has shape "
                                         r"\(16, 24\), expected \(24, 16\)"):
        models.load(tmp_path / "b")
    tensors = tiny_tensors(rng, TINY)
    tensors["embeddings.word_embeddings.weight"] = np.zeros((40, 16), np.int32)
    write_checkpoint(tmp_path / "c", rng, tensors=tensors, tokenizer=False)
    with pytest.raises(ValueError, match="must be floating"):
        models.load(tmp_path / "c")


def test_out_of_range_ids(tiny):
    model, _ = tiny
    from jaxla.models import _bert

    c, p = model.config, model.params
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 40\).*\[3, 40\]"):
        models.forward(c, p, jnp.array([[3, 40]], jnp.int32))
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 40\)"):
        models.forward(c, p, jnp.array([[-1, 4]], jnp.int32))
    with pytest.raises(ValueError, match=r"token_type_ids must lie in \[0, 2\)"):
        _bert.forward(c, p, jnp.array([[3, 4]], jnp.int32), token_type_ids=jnp.array([[0, 2]]))
    with pytest.raises(ValueError, match="max_position_embeddings=12"):
        models.forward(c, p, jnp.zeros((1, 13), jnp.int32))
    with pytest.raises(TypeError, match="input_ids must be integer"):
        models.forward(c, p, jnp.zeros((1, 3), jnp.float32))
    with pytest.raises(ValueError, match=r"input_ids must have shape \(B, T\)"):
        models.forward(c, p, jnp.zeros((3,), jnp.int32))
    with pytest.raises(TypeError, match="attention_mask must be boolean"):
        models.forward(c, p, jnp.zeros((1, 3), jnp.int32), attention_mask=jnp.ones((1, 3)))
    # Under jit the values are unknown at trace time: an out-of-range id gives NaN, not a row.
    out = jax.jit(models.forward, static_argnums=0)(c, p, jnp.array([[3, 40], [-1, 4]], jnp.int32))
    assert np.all(np.isnan(np.asarray(out)))


# ---- the real all-MiniLM-L6-v2 (jaxla download all-minilm-l6-v2) ----

@pytest.fixture(scope="module")
def minilm():
    try:
        return models.load("all-minilm-l6-v2")
    except FileNotFoundError as e:
        pytest.skip(str(e))


def _encode(model, sentences):
    # MiniLM's tokenizer.json pads every input to 128 tokens; keep the real ones, pad to the longest.
    encs = [[i for i, m in zip(e.ids, e.attention_mask, strict=True) if m]
            for e in model.tokenizer.encode_batch(sentences)]
    t = max(map(len, encs))
    ids = np.zeros((len(encs), t), np.int32)
    mask = np.zeros((len(encs), t), bool)
    for i, e in enumerate(encs):
        ids[i, : len(e)], mask[i, : len(e)] = e, True
    return ids, mask


def test_minilm_paraphrases_are_closer_than_unrelated_sentences(minilm):
    assert minilm.config == BertConfig(vocab_size=30522, hidden_size=384, num_layers=6,
                                       num_heads=12, intermediate_size=1536)
    sentences = ["A man is eating food.", "A man is eating a piece of bread.",
                 "The girl is carrying a baby.", "A woman is holding a child.",
                 "The stock market fell sharply today."]
    ids, mask = _encode(minilm, sentences)
    assert ids[0, 0] == 101 and ids[0, mask[0].sum() - 1] == 102  # [CLS] ... [SEP]
    emb = np.asarray(models.embed(minilm.config, minilm.params, jnp.asarray(ids),
                                  attention_mask=jnp.asarray(mask)))
    sim = emb @ emb.T
    assert sim[0, 1] > 0.5 and sim[2, 3] > 0.5
    for a, b in ((0, 1), (2, 3)):
        assert sim[a, b] > max(sim[a, 4], sim[b, 4], sim[a, 2 if a == 0 else 0]) + 0.2


def test_minilm_matches_float64_numpy_on_the_real_weights(minilm):
    from safetensors.numpy import load_file

    from jaxla.models import _download

    directory = _download.resolve("all-minilm-l6-v2")
    tensors = load_file(str(directory / "model.safetensors"))
    hf = json.loads((directory / "config.json").read_text())
    ids, mask = _encode(minilm, ["Paris is the capital of France.", "Hello world!"])
    out = models.embed(minilm.config, minilm.params, jnp.asarray(ids),
                       attention_mask=jnp.asarray(mask))
    ref = np_mean_pool(np_bert(tensors, hf, ids, mask), mask)
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5, rtol=0)
