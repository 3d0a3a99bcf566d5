"""jaxla.lora files: save/load round trips, PEFT import/export, and every bad-file case."""

import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from jaxla import lora


def _params(g, d_in=6, d_out=5, layers=2):
    return {
        "proj": {"w": jnp.asarray(g.standard_normal((d_in, d_out)), jnp.float32)},
        "layers": {"w": jnp.asarray(g.standard_normal((layers, d_in, d_in)), jnp.float32)},
    }


def _adapters(g, params, dtype=jnp.float32):
    def ad(w, r, alpha, rslora=False):
        lead, (d_in, d_out) = w.shape[:-2], w.shape[-2:]
        return lora.Adapter(jnp.asarray(g.standard_normal((*lead, r, d_in)), dtype),
                            jnp.asarray(g.standard_normal((*lead, d_out, r)), dtype), alpha, rslora)

    return {"proj/w": ad(params["proj"]["w"], 2, 4.0), "layers/w": ad(params["layers"]["w"], 3, 6.0)}


def _assert_same(x, y):
    assert sorted(x) == sorted(y)
    for k in x:
        assert x[k].alpha == y[k].alpha and x[k].rslora == y[k].rslora and x[k].out_in == y[k].out_in
        assert x[k].a.dtype == y[k].a.dtype
        np.testing.assert_array_equal(np.asarray(x[k].a), np.asarray(y[k].a))
        np.testing.assert_array_equal(np.asarray(x[k].b), np.asarray(y[k].b))


# --- jaxla format ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_save_load_round_trip(tmp_path, rng, dtype):
    params = _params(rng)
    ads = _adapters(rng, params, dtype)
    ads["proj/w"] = lora.Adapter(ads["proj/w"].a, ads["proj/w"].b, 4.0, rslora=True)
    path = tmp_path / "adapter.safetensors"
    lora.save(path, ads, {"base": "tiny", "steps": 3})
    loaded, config = lora.load(path, params=params)
    _assert_same(ads, loaded)
    assert config == {"base": "tiny", "steps": 3}
    assert os.listdir(tmp_path) == ["adapter.safetensors"]  # no temporary left behind


def test_load_checks_against_params(tmp_path, rng):
    params = _params(rng)
    path = tmp_path / "a.safetensors"
    lora.save(path, _adapters(rng, params))
    other = {"proj": {"w": jnp.zeros((6, 7))}, "layers": params["layers"]}
    with pytest.raises(ValueError, match=r"'proj/w'.*\(6, 7\).*\(6, 5\)"):
        lora.load(path, params=other)
    with pytest.raises(ValueError, match=r"\['layers/w'\] are not paths"):
        lora.load(path, params={"proj": params["proj"]})


def test_missing_and_corrupt_files(tmp_path, rng):
    with pytest.raises(FileNotFoundError, match="no adapter file"):
        lora.load(tmp_path / "missing.safetensors")
    path = tmp_path / "a.safetensors"
    lora.save(path, _adapters(rng, _params(rng)))
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00not a safetensors file")
    for name in ("trunc.safetensors", "junk.safetensors"):
        with pytest.raises(ValueError, match="not a valid safetensors file"):
            lora.load(tmp_path / name)
    safetensors.numpy.save_file({"x": np.zeros(2, np.float32)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a jaxla adapter file"):
        lora.load(tmp_path / "plain.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lora.save(tmp_path / "no_dir" / "a.safetensors", _adapters(rng, _params(rng)))


def test_failed_save_leaves_old_file_intact(tmp_path, rng, monkeypatch):
    params = _params(rng)
    path = tmp_path / "a.safetensors"
    lora.save(path, _adapters(rng, params))
    before = path.read_bytes()
    with pytest.raises(TypeError, match="JSON-serialisable"):
        lora.save(path, _adapters(rng, params), {"bad": object()})

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        lora.save(path, _adapters(rng, params))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["a.safetensors"]


def _write_jaxla(path, tensors, meta):
    """A jaxla adapter file with hand-written (possibly hostile) metadata."""
    text = meta if isinstance(meta, str) else json.dumps(meta)
    safetensors.numpy.save_file(tensors, str(path), metadata={"jaxla_lora": text})


def _good_meta(**entry):
    return {"format": "jaxla.lora", "version": 1, "config": None,
            "adapters": {"w": {"alpha": 2.0, "rslora": False, "out_in": False, **entry}}}


def _good_tensors(r_a=2, r_b=2):
    return {"w/a": np.ones((r_a, 4), np.float32), "w/b": np.ones((3, r_b), np.float32)}


def test_load_rejects_hostile_metadata(tmp_path):
    """Every field of an adapter file is checked; the error names the file and the key (issue 16)."""
    path = tmp_path / "bad.safetensors"
    _write_jaxla(path, _good_tensors(), _good_meta())
    ads, config = lora.load(path)
    assert ads["w"].alpha == 2.0 and ads["w"].rank == 2 and config is None
    entry = _good_meta()["adapters"]["w"]
    cases = [
        (_good_meta(alpha=-1.0), r"adapters\['w'\]\.alpha must be a finite number > 0, got float -1"),
        (_good_meta(alpha=float("nan")), r"alpha must be a finite number > 0, got float nan"),
        (_good_meta(alpha="2"), r"alpha must be a finite number > 0, got str '2'"),
        (_good_meta(alpha=True), r"alpha must be a finite number > 0, got bool"),
        (_good_meta(rslora="false"), r"adapters\['w'\]\.rslora must be true or false, got str"),
        (_good_meta(out_in=1), r"out_in must be true or false, got int 1"),
        ({**_good_meta(), "adapters": {"w": {"rslora": False, "out_in": False}}},
         r"must have exactly the keys \['alpha', 'rslora', 'out_in'\]; missing \['alpha'\]"),
        ({**_good_meta(), "adapters": {"w": {**entry, "beta": 1}}}, r"unknown \['beta'\]"),
        ({**_good_meta(), "adapters": {"w": [1, 2]}}, r"adapters\['w'\] must be a JSON object"),
        ({**_good_meta(), "adapters": [1]}, r"'adapters' must be a JSON object"),
        ({**_good_meta(), "version": "1"}, r"'version' must be an integer >= 1, got str '1'"),
        ({**_good_meta(), "version": 2}, r"format version 2; this jaxla reads up to 1"),
        ({**_good_meta(), "config": [1]}, r"'config' must be a JSON object or null"),
        ([1, 2], r"corrupt jaxla adapter metadata"),
        ("{not json", r"is not valid JSON"),
        ("[" * 100_000, r"nests JSON 100000 levels deep; at most 64"),
    ]
    for meta, message in cases:
        _write_jaxla(path, _good_tensors(), meta)
        with pytest.raises(ValueError, match=message) as info:
            lora.load(path)
        assert "bad.safetensors" in str(info.value)


def test_load_rejects_hostile_tensors(tmp_path):
    path = tmp_path / "bad.safetensors"
    cases = [
        (_good_tensors(r_a=2, r_b=3), r"adapter 'w' has a \(2, 4\) and b \(3, 3\).*the same r"),
        ({"w/a": np.ones((2, 4), np.float32)}, r"lacks tensor 'w/b'"),
        ({**_good_tensors(), "w/a": np.ones((2, 4), np.int32)}, r"tensor 'w/a' must be floating"),
        ({**_good_tensors(), "w/a": np.ones(4, np.float32)}, r"expected a \(\.\.\., r, d_in\)"),
        ({**_good_tensors(), "w/b": np.full((3, 2), np.nan, np.float32)},
         r"tensor 'w/b' holds 6 NaN or inf"),
        ({**_good_tensors(), "extra": np.ones(2, np.float32)}, r"tensors that no adapter lists"),
    ]
    for tensors, message in cases:
        _write_jaxla(path, tensors, _good_meta())
        with pytest.raises(ValueError, match=message):
            lora.load(path)
    # A header nested 100k deep is refused before any JSON parser recurses into it.
    header = b"[" * 100_000
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(ValueError, match=r"not a valid safetensors file.*100000 levels deep"):
        lora.load(path)


# --- PEFT format -----------------------------------------------------------------------------------

NAMES = {"proj/w": "model.proj", "layers/w": "model.layers.{}.self_attn.q_proj"}


def _write_peft(directory, tensors, config):
    os.makedirs(directory, exist_ok=True)
    safetensors.numpy.save_file(tensors, os.path.join(directory, "adapter_model.safetensors"))
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(config, f)


def _peft_files(rng, tmp_path):
    """A PEFT adapter as PEFT writes it, built here by hand with safetensors."""
    a_p, b_p = rng.standard_normal((2, 6)), rng.standard_normal((5, 2))
    a_l, b_l = rng.standard_normal((2, 3, 6)), rng.standard_normal((2, 6, 3))
    tensors = {"base_model.model.model.proj.lora_A.weight": a_p.astype(np.float32),
               "base_model.model.model.proj.lora_B.weight": b_p.astype(np.float32)}
    for i in range(2):
        pre = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        tensors[f"{pre}.lora_A.weight"] = a_l[i].astype(np.float32)
        tensors[f"{pre}.lora_B.weight"] = b_l[i].astype(np.float32)
    config = {"peft_type": "LORA", "r": 3, "lora_alpha": 6, "use_rslora": True,
              "target_modules": ["proj", "q_proj"], "rank_pattern": {"proj": 2},
              "alpha_pattern": {"model.proj": 4}}
    _write_peft(tmp_path / "peft", tensors, config)
    return tmp_path / "peft", (a_p, b_p, a_l, b_l)


def test_load_peft_matches_peft_semantics(tmp_path, rng):
    params = _params(rng)
    directory, (a_p, b_p, a_l, b_l) = _peft_files(rng, tmp_path)
    ads = lora.load_peft(directory, params, NAMES)
    assert ads["proj/w"].rank == 2 and ads["proj/w"].alpha == 4.0 and ads["proj/w"].rslora
    assert ads["layers/w"].a.shape == (2, 3, 6) and ads["layers/w"].alpha == 6.0
    merged, _ = lora.merge(params, ads)
    # PEFT: W_torch (out, in) += (alpha / sqrt(r)) · B @ A, and jaxla's W is W_torchᵀ.
    w = np.asarray(params["proj"]["w"], np.float64)
    np.testing.assert_allclose(merged["proj"]["w"], w + (4 / np.sqrt(2) * b_p @ a_p).T,
                               rtol=1e-5, atol=1e-5)
    w1 = np.asarray(params["layers"]["w"][1], np.float64)
    np.testing.assert_allclose(merged["layers"]["w"][1], w1 + (6 / np.sqrt(3) * b_l[1] @ a_l[1]).T,
                               rtol=1e-5, atol=1e-5)


def test_peft_round_trip(tmp_path, rng):
    params = _params(rng)
    ads = _adapters(rng, params)
    lora.save_peft(tmp_path / "out", ads, NAMES, base_model="tiny")
    tensors = safetensors.numpy.load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (3, 6)
    assert tensors["base_model.model.model.proj.lora_B.weight"].shape == (5, 2)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_rslora"] is False
    assert config["r"] == 3 and config["rank_pattern"] == {"model.proj": 2}
    assert config["lora_alpha"] == 6.0 and config["alpha_pattern"] == {"model.proj": 4.0}
    assert sorted(config["target_modules"]) == sorted(
        ["model.proj", "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"])
    _assert_same(ads, lora.load_peft(tmp_path / "out", params, NAMES))


def test_peft_bf16_round_trip(tmp_path, rng):
    params = _params(rng)
    ads = _adapters(rng, params, jnp.bfloat16)
    lora.save_peft(tmp_path / "bf", ads, NAMES)
    back = lora.load_peft(tmp_path / "bf", params, NAMES)
    assert back["proj/w"].a.dtype == ml_dtypes.bfloat16
    _assert_same(ads, back)


def test_peft_bad_input(tmp_path, rng):
    params = _params(rng)
    directory, _ = _peft_files(rng, tmp_path)
    with pytest.raises(ValueError, match="does not map"):
        lora.load_peft(directory, params, {"proj/w": "model.proj"})
    with pytest.raises(ValueError, match=r"no tensor 'base_model\.model\.model\.nope\.lora_A\.weight'"):
        lora.load_peft(directory, params, {**NAMES, "proj/w": "model.nope"}, strict=False)
    with pytest.raises(ValueError, match="placeholders"):
        lora.load_peft(directory, params, {**NAMES, "layers/w": "model.layers.q"})
    small = {**params, "proj": {"w": jnp.zeros((6, 4))}}
    with pytest.raises(ValueError, match=r"'proj/w'.*\(6, 4\).*\(6, 5\)"):
        lora.load_peft(directory, small, NAMES)
    with pytest.raises(ValueError, match="module_names lacks"):
        lora.save_peft(tmp_path / "x", _adapters(rng, params), {"proj/w": "model.proj"})
    (directory / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        lora.load_peft(directory, params, NAMES)
    os.remove(directory / "adapter_config.json")
    with pytest.raises(FileNotFoundError, match="no PEFT config"):
        lora.load_peft(directory, params, NAMES)


def test_load_peft_rejects_hostile_config(tmp_path, rng):
    """Every adapter_config.json field jaxla reads is checked; errors name the file and key."""
    params = _params(rng)
    directory, _ = _peft_files(rng, tmp_path)
    good = json.loads((directory / "adapter_config.json").read_text())
    cases = [
        ({"r": "8"}, r"'r' must be an integer rank >= 1, got str '8'"),
        ({"r": [3]}, r"'r' must be an integer rank >= 1, got list"),
        ({"r": None}, r"'r' must be an integer rank >= 1, got NoneType"),
        ({"r": -3}, r"'r' must be an integer rank >= 1, got int -3"),
        ({"r": True}, r"'r' must be an integer rank >= 1, got bool"),
        ({"r": 3.0}, r"'r' must be an integer rank >= 1, got float"),
        ({"lora_alpha": "6"}, r"'lora_alpha' must be a finite number > 0, got str"),
        ({"lora_alpha": None}, r"'lora_alpha' must be a finite number > 0, got NoneType"),
        ({"lora_alpha": -6}, r"'lora_alpha' must be a finite number > 0, got int -6"),
        ({"use_rslora": "false"}, r"'use_rslora' must be true or false, got str 'false'"),
        ({"rank_pattern": ["proj"]}, r"rank_pattern must be a JSON object"),
        ({"rank_pattern": {"(": 2}}, r"rank_pattern\['\('\]: the key is not a regular expression"),
        ({"rank_pattern": {"(a)\\1": 2}}, r"RE2 has no backreferences"),
        ({"rank_pattern": {"proj": "2"}}, r"rank_pattern\['proj'\] must be an integer rank >= 1"),
        ({"rank_pattern": {"": 2}}, r"a pattern must have 1 to 1000 characters, got 0"),
        ({"alpha_pattern": {"proj": -1}}, r"alpha_pattern\['proj'\] must be a finite number > 0"),
        ({"peft_type": "PREFIX_TUNING"}, r"only 'LORA' is supported"),
    ]
    for change, message in cases:
        (directory / "adapter_config.json").write_text(json.dumps({**good, **change}))
        with pytest.raises(ValueError, match=message) as info:
            lora.load_peft(directory, params, NAMES)
        assert "adapter_config.json" in str(info.value)
    for text, message in (("[1, 2]", r"expected a JSON object, got list"),
                          ('{"r": 2}', r"lacks \['lora_alpha'\]"),
                          ("[" * 100_000, r"nests JSON 100000 levels deep")):
        (directory / "adapter_config.json").write_text(text)
        with pytest.raises(ValueError, match=message):
            lora.load_peft(directory, params, NAMES)
    # A false flag stays false (it used to be bool("false") = True).
    (directory / "adapter_config.json").write_text(json.dumps({**good, "use_rslora": False}))
    assert not lora.load_peft(directory, params, NAMES)["proj/w"].rslora
    with pytest.raises(TypeError, match=r"^dtype must be a floating dtype"):
        lora.load_peft(directory, params, NAMES, dtype=jnp.int8)


def test_load_peft_rejects_hostile_tensors(tmp_path, rng):
    params = _params(rng)
    directory, _ = _peft_files(rng, tmp_path)
    weights = safetensors.numpy.load_file(str(directory / "adapter_model.safetensors"))
    key_b = "base_model.model.model.proj.lora_B.weight"
    for value, message in ((np.ones((5, 3), np.float32), r"lora_B.*\(5, 3\).*\(d_out, 2\)"),
                           (np.full((5, 2), np.inf, np.float32), r"holds 10 NaN or inf"),
                           (np.ones((5, 2), np.int32), r"must be floating, got int32")):
        safetensors.numpy.save_file({**weights, key_b: value},
                                    str(directory / "adapter_model.safetensors"))
        with pytest.raises(ValueError, match=message):
            lora.load_peft(directory, params, NAMES)


def test_load_peft_patterns_cannot_backtrack(tmp_path, rng):
    """``(a+)+b`` against 60 a's would take Python's re ~2^60 steps; RE2 matches in linear time, so
    this test finishes at all only because no backtracking engine runs the file's patterns."""
    module = "a" * 60
    params = {"w": jnp.asarray(rng.standard_normal((6, 5)), jnp.float32)}
    tensors = {f"base_model.model.{module}.lora_A.weight": np.ones((2, 6), np.float32),
               f"base_model.model.{module}.lora_B.weight": np.ones((5, 2), np.float32)}
    config = {"r": 2, "lora_alpha": 4, "rank_pattern": {"(a+)+b": 3, "(a|aa)+c": 3},
              "alpha_pattern": {"(a+)+b": 1, "a+": 8}}
    _write_peft(tmp_path / "evil", tensors, config)
    ads = lora.load_peft(tmp_path / "evil", params, {"w": module})
    assert ads["w"].rank == 2 and ads["w"].alpha == 8.0  # "a+" matches, the evil keys do not


def test_load_peft_pattern_semantics_follow_peft(tmp_path, rng):
    """A key matches a trailing run of whole "."-separated parts, first key in file order wins."""
    from jaxla.lora import _peft

    patterns = _peft._compile_patterns(
        {"rank_pattern": {"q_proj": 4, r"layers\.1\..*": 5, "0.self_attn.k_proj": 6}},
        "rank_pattern", "cfg", _peft._check_rank)
    cases = {"model.layers.0.self_attn.q_proj": 4, "q_proj": 4, "model.layers.0.xq_proj": 1,
             "model.layers.1.mlp.up_proj": 5, "model.layers.1.self_attn.q_proj": 4,
             "model.layers.0.self_attn.k_proj": 6, "model.layers.10.self_attn.k_proj": 1}
    for module, want in cases.items():
        assert _peft._pattern_value(patterns, module, 1) == want, module


def test_save_refuses_what_load_would_reject(tmp_path, rng):
    """A saved file always loads: invalid adapters are refused before anything is written."""
    params = _params(rng)
    good = _adapters(rng, params)
    nan_b = {**good, "proj/w": lora.Adapter(good["proj/w"].a, jnp.full_like(good["proj/w"].b,
                                                                          jnp.nan), 4.0)}
    cases = [
        ({**good, "proj/w": lora.Adapter(good["proj/w"].a, good["proj/w"].b, -1.0)}, ValueError,
         r"adapters\['proj/w'\]\.alpha must be a finite number > 0"),
        ({**good, "proj/w": lora.Adapter(good["proj/w"].a, good["proj/w"].b, float("nan"))},
         ValueError, r"alpha must be a finite number > 0, got float nan"),
        (nan_b, ValueError, r"adapters\['proj/w'\]\.b holds 10 NaN or inf"),
        ({**good, "proj/w": lora.Adapter(good["proj/w"].a, good["proj/w"].b[:, :1], 4.0)},
         ValueError, r"adapter 'proj/w' has a \(2, 6\) and b \(5, 1\)"),
        ({3: good["proj/w"]}, TypeError, r"adapter keys must be non-empty strings"),
        ({"proj/w": "not an adapter"}, TypeError, r"must be a jaxla.lora.Adapter"),
    ]
    for adapters, error, message in cases:
        with pytest.raises(error, match=message):
            lora.save(tmp_path / "a.safetensors", adapters)
        with pytest.raises(error, match=message):
            lora.save_peft(tmp_path / "peft", adapters, {k: "m" for k in adapters})
    assert os.listdir(tmp_path) == []
    # NumPy scalars from user code are fine and round-trip as Python values.
    ad = {"proj/w": lora.Adapter(good["proj/w"].a, good["proj/w"].b, np.float32(4.0),
                                 np.bool_(True))}
    lora.save(tmp_path / "a.safetensors", ad)
    loaded, _ = lora.load(tmp_path / "a.safetensors")
    assert loaded["proj/w"].alpha == 4.0 and loaded["proj/w"].rslora is True


@pytest.mark.parametrize("chunk", [3, 1 << 20])
def test_json_depth_ignores_strings_and_escapes(monkeypatch, chunk):
    from jaxla.lora import _io

    monkeypatch.setattr(_io, "_SCAN_CHUNK", chunk)  # 3 bytes: every state crosses a chunk edge
    cases = {b"": 0, b"{}": 1, b"[[[]]]": 3, b'{"a": "[[[["}': 1, b'["\\"[["]': 1,
             b'{"a": "\\\\", "b": [[1]]}': 3, b'["\\\\\\"[", [[]]]': 3, b"[" * 1000: 1000}
    for text, depth in cases.items():
        assert _io.json_depth(text) == depth, text


def test_load_peft_without_re2_says_how_to_get_it(tmp_path, rng, monkeypatch):
    """RE2 is imported only for configs with patterns; without it the error names the package."""
    import sys

    params = _params(rng)
    directory, _ = _peft_files(rng, tmp_path)
    monkeypatch.setitem(sys.modules, "re2", None)  # makes `import re2` raise ImportError
    with pytest.raises(ImportError, match="pip install google-re2"):
        lora.load_peft(directory, params, NAMES)
    config = json.loads((directory / "adapter_config.json").read_text())
    config.update(rank_pattern={}, alpha_pattern={}, r=2, lora_alpha=4)
    (directory / "adapter_config.json").write_text(json.dumps(config))
    # No patterns: no RE2 needed; the stacked layer's rank 3 now disagrees with r = 2.
    with pytest.raises(ValueError, match=r"declares rank 2"):
        lora.load_peft(directory, params, NAMES)
