"""jaxla.models.save_peft / load_peft: Hugging Face PEFT LoRA directories with the model's own module
names. PEFT and PyTorch are not installed here, so the check against PEFT is by its documented format:
tensor names ``base_model.model.<module>.lora_A.weight`` (r, d_in) / ``lora_B.weight`` (d_out, r), and
its maths ``W' = W + scale·B·A`` on PyTorch's (d_out, d_in) weight, applied to the checkpoint itself."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxla import lora, models
from tests.bert_checkpoint import TINY, write_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

BERT_MODULES = {"layers/attn/q/w": "attention.self.query", "layers/attn/v/w": "attention.self.value",
                "layers/mlp/down/w": "output.dense"}


def _random_adapters(model, key, rng, targets, rank=2, alpha=4.0):
    adapters = lora.init(key, model.params, rank=rank, alpha=alpha, targets=targets, stack_axes=1)
    return {k: lora.Adapter(ad.a, jnp.asarray(rng.standard_normal(ad.b.shape) * 0.3, jnp.float32),
                            ad.alpha) for k, ad in adapters.items()}


@pytest.fixture
def bert(tmp_path, rng):
    tensors = write_checkpoint(tmp_path / "bert", rng, tokenizer=False)
    return models.load(tmp_path / "bert"), tensors


def test_bert_round_trip_with_hugging_face_names(bert, key, rng, tmp_path):
    model, _ = bert
    adapters = _random_adapters(model, key, rng, r"layers/(attn/(q|v)|mlp/down)/w")
    models.save_peft(model, adapters, tmp_path / "peft")
    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    d, f, r = 16, 24, 2
    expected = {}
    for i in range(2):
        for path, module in BERT_MODULES.items():
            d_in = f if "down" in path else d
            name = f"base_model.model.encoder.layer.{i}.{module}"
            expected[f"{name}.lora_A.weight"] = (r, d_in)
            expected[f"{name}.lora_B.weight"] = (d, r)
            np.testing.assert_array_equal(tensors[f"{name}.lora_A.weight"], adapters[path].a[i])
            np.testing.assert_array_equal(tensors[f"{name}.lora_B.weight"], adapters[path].b[i])
    assert {k: v.shape for k, v in tensors.items()} == expected
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "FEATURE_EXTRACTION"
    assert config["r"] == 2 and config["lora_alpha"] == 4.0 and config["use_rslora"] is False
    assert config["base_model_name_or_path"] == str(tmp_path / "bert")
    assert sorted(config["target_modules"]) == sorted(
        f"encoder.layer.{i}.{m}" for i in range(2) for m in BERT_MODULES.values())
    loaded = models.load_peft(model, tmp_path / "peft")
    assert sorted(loaded) == sorted(adapters)
    for k, ad in adapters.items():
        np.testing.assert_array_equal(np.asarray(loaded[k].a), np.asarray(ad.a))
        np.testing.assert_array_equal(np.asarray(loaded[k].b), np.asarray(ad.b))
        assert loaded[k].alpha == ad.alpha and loaded[k].rslora is False


def test_peft_maths_on_the_pytorch_checkpoint_equals_the_jaxla_forward(bert, key, rng, tmp_path):
    """PEFT merges as W' = W + scale·B·A on PyTorch's (out, in) W: doing that to the checkpoint's
    tensors and loading the result must give the forward of the base model with the adapters."""
    model, tensors = bert
    adapters = _random_adapters(model, key, rng, r"layers/(attn/(q|v)|mlp/down)/w")
    models.save_peft(model, adapters, tmp_path / "peft")
    peft = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    scale = 4.0 / 2
    merged = dict(tensors)
    for i in range(2):
        for module in BERT_MODULES.values():
            name = f"encoder.layer.{i}.{module}"
            a = peft[f"base_model.model.{name}.lora_A.weight"].astype(np.float64)
            b = peft[f"base_model.model.{name}.lora_B.weight"].astype(np.float64)
            merged[f"{name}.weight"] = (tensors[f"{name}.weight"] + scale * b @ a).astype(np.float32)
    write_checkpoint(tmp_path / "merged", rng, tensors=merged, tokenizer=False)
    merged_model = models.load(tmp_path / "merged")
    ids = jnp.asarray(rng.integers(0, TINY["vocab_size"], (2, 6)), jnp.int32)
    np.testing.assert_allclose(
        np.asarray(models.forward(model.config, model.params, ids,
                                  adapters=models.load_peft(model, tmp_path / "peft"))),
        np.asarray(models.forward(merged_model.config, merged_model.params, ids)), atol=2e-5)


def _peft_dir(directory, tensors, **config):
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    base = {"peft_type": "LORA", "task_type": "FEATURE_EXTRACTION", "r": 4, "lora_alpha": 8,
            "target_modules": ["query", "value"], "lora_dropout": 0.1, "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {},
            "alpha_pattern": {}, "inference_mode": True, "base_model_name_or_path": "x"}
    (directory / "adapter_config.json").write_text(json.dumps(base | config))


def _peft_tensors(rng, modules=("attention.self.query", "attention.self.value"), layers=(0, 1),
                  r=4):
    out = {}
    for i in layers:
        for m in modules:
            name = f"base_model.model.encoder.layer.{i}.{m}"
            out[f"{name}.lora_A.weight"] = rng.standard_normal((r, 16)).astype(np.float32)
            out[f"{name}.lora_B.weight"] = rng.standard_normal((16, r)).astype(np.float32)
    return out


def test_a_peft_written_directory_loads(bert, rng, tmp_path):
    model, _ = bert
    tensors = _peft_tensors(rng)
    _peft_dir(tmp_path / "p", tensors, use_rslora=True)
    adapters = models.load_peft(model, tmp_path / "p")
    assert sorted(adapters) == ["layers/attn/q/w", "layers/attn/v/w"]
    q = adapters["layers/attn/q/w"]
    assert q.a.shape == (2, 4, 16) and q.b.shape == (2, 16, 4) and q.alpha == 8 and q.rslora
    np.testing.assert_array_equal(np.asarray(q.a[1]),
                                  tensors["base_model.model.encoder.layer.1.attention.self.query"
                                          ".lora_A.weight"])


@pytest.mark.parametrize("config, match", [
    ({"use_dora": True}, "use_dora = bool True is not supported"),
    ({"bias": "lora_only"}, "bias = str 'lora_only' is not supported"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"modules_to_save": ["classifier"]}, "modules_to_save"),
    ({"layers_to_transform": [0]}, "layers_to_transform"),
    ({"peft_type": "IA3"}, "only 'LORA' is supported"),
    ({"r": 0}, "'r' must be an integer rank >= 1"),
    ({"lora_alpha": "8"}, "'lora_alpha' must be a finite number > 0"),
    ({"r": 3}, r"declares rank 3 .* \(3, d_in\) was expected"),
])
def test_unsupported_or_invalid_config_is_refused(bert, rng, tmp_path, config, match):
    model, _ = bert
    _peft_dir(tmp_path / "p", _peft_tensors(rng), **config)
    with pytest.raises(ValueError, match=match):
        models.load_peft(model, tmp_path / "p")


def test_tensors_that_do_not_fit_are_refused(bert, rng, tmp_path):
    model, _ = bert
    _peft_dir(tmp_path / "a", _peft_tensors(rng, layers=(0,)))
    with pytest.raises(ValueError, match=r"it lacks \[.*encoder\.layer\.1\.attention\.self\.query"):
        models.load_peft(model, tmp_path / "a")
    _peft_dir(tmp_path / "b", _peft_tensors(rng) | {"classifier.weight": np.zeros((2, 16), np.float32)})
    with pytest.raises(ValueError, match=r"not LoRA factors of this BertConfig: \['classifier\.weight'\]"):
        models.load_peft(model, tmp_path / "b")
    _peft_dir(tmp_path / "c", {"base_model.model.decoder.x.lora_A.weight": np.zeros((4, 16), np.float32)})
    with pytest.raises(ValueError, match="holds no LoRA tensor of this model's modules"):
        models.load_peft(model, tmp_path / "c")
    tensors = _peft_tensors(rng)
    for i in range(2):
        tensors[f"base_model.model.encoder.layer.{i}.attention.self.query.lora_A.weight"] = np.zeros(
            (4, 12), np.float32)
    _peft_dir(tmp_path / "d", tensors)
    with pytest.raises(ValueError, match=r"'layers/attn/q/w' does not fit its weight: the parameter "
                                         r"has shape \(2, 16, 16\) .*a \(2, 4, 12\)"):
        models.load_peft(model, tmp_path / "d")
    tensors = _peft_tensors(rng)
    tensors["base_model.model.encoder.layer.0.attention.self.query.lora_B.weight"][0, 0] = np.nan
    _peft_dir(tmp_path / "e", tensors)
    with pytest.raises(ValueError, match="NaN or inf"):
        models.load_peft(model, tmp_path / "e")
    _peft_dir(tmp_path / "f", _peft_tensors(rng))
    data = (tmp_path / "f" / "adapter_model.safetensors").read_bytes()
    (tmp_path / "f" / "adapter_model.safetensors").write_bytes(data[:100])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        models.load_peft(model, tmp_path / "f")
    with pytest.raises(FileNotFoundError, match="no PEFT config"):
        models.load_peft(model, tmp_path / "nothing")


def test_save_refuses_paths_without_module_names(bert, key, rng, tmp_path):
    model, _ = bert
    adapters = lora.init(key, model.params, rank=2, alpha=4.0, targets="embeddings/word")
    with pytest.raises(ValueError, match=r"\['embeddings/word'\] are not adaptable modules"):
        models.save_peft(model, adapters, tmp_path / "p")
    assert not (tmp_path / "p").exists()
    with pytest.raises(TypeError, match=r"model must be a jaxla\.models\.Model"):
        models.save_peft(model.params, {}, tmp_path / "p")


# ---- Llama names (M1's family; runs once both branches are merged) ----

LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 48,
         "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
         "rope_theta": 10000.0, "max_position_embeddings": 64, "tie_word_embeddings": True,
         "hidden_act": "silu"}


def _write_llama(directory, rng):
    d, f, h = 16, 32, 4
    t = {"model.embed_tokens.weight": rng.standard_normal((48, d)), "model.norm.weight": np.ones(d)}
    shapes = {"self_attn.q_proj": (4 * h, d), "self_attn.k_proj": (2 * h, d),
              "self_attn.v_proj": (2 * h, d), "self_attn.o_proj": (d, 4 * h),
              "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f)}
    for i in range(2):
        for m, shape in shapes.items():
            t[f"model.layers.{i}.{m}.weight"] = rng.standard_normal(shape) / np.sqrt(shape[1])
        t[f"model.layers.{i}.input_layernorm.weight"] = np.ones(d)
        t[f"model.layers.{i}.post_attention_layernorm.weight"] = np.ones(d)
    directory.mkdir()
    save_file({k: v.astype(np.float32) for k, v in t.items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(LLAMA))


def test_llama_adapters_use_peft_names(tmp_path, rng, key):
    pytest.importorskip("jaxla.models._llama", reason="the Llama family is on the models-llama branch")
    from jaxla.models import _registry

    _write_llama(tmp_path / "llama", rng)
    model = models.load(tmp_path / "llama")
    names = _registry.family_of(model.config).peft_module_names(model.config)
    q_path = next(p for p, m in names.items() if m == "model.layers.{i}.self_attn.q_proj")
    v_path = next(p for p, m in names.items() if m == "model.layers.{i}.self_attn.v_proj")
    adapters = _random_adapters(model, key, rng, [f"^{q_path}$", f"^{v_path}$"], rank=4, alpha=8.0)
    models.save_peft(model, adapters, tmp_path / "peft")
    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in tensors.items()} == {
        f"base_model.model.model.layers.{i}.self_attn.{m}_proj.lora_{ab}.weight": shape
        for i in range(2) for m, out in (("q", 16), ("v", 8))
        for ab, shape in (("A", (4, 16)), ("B", (out, 4)))}
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["r"] == 4 and config["lora_alpha"] == 8.0
    loaded = models.load_peft(model, tmp_path / "peft")
    for k, ad in adapters.items():
        np.testing.assert_array_equal(np.asarray(loaded[k].b), np.asarray(ad.b))
