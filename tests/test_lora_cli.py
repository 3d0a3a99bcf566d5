"""The [lora] keys of the fine-tune CLI: rslora, init (pissa/olora), dropout, dora, loraplus_ratio."""

import math

import numpy as np
import pytest

from jaxla import finetune, lora
from jaxla.finetune import _config, _steps

TINY = [
    "lowrank.d_in=12", "lowrank.d_out=10", "lowrank.true_rank=2", "lora.rank=2",
    "train.batch_size=8", "train.steps=4", "optim.warmup_steps=1", "run.checkpoint_every=100",
    "lowrank.eval_examples=8", "run.plots=false", "run.fast_compile=true",
]


def _run(tmp_path, *extra):
    cfg = finetune.apply_overrides(finetune.load_config(None), [*TINY, *extra])
    out = tmp_path / "run"
    return out, finetune.run_finetune(cfg, out=out, progress=False, echo=lambda s: None)


def test_new_keys_default_to_plain_lora():
    lc = finetune.load_config(None).lora
    assert (lc.rslora, lc.dropout, lc.dora, lc.loraplus_ratio, lc.init) == (False, 0.0, False, 1.0,
                                                                             "kaiming")
    assert _steps.describe_lora(lc) == "LoRA r=8, alpha 8 (scale 1), init kaiming"
    opt = object.__new__(type("Opt", (), {}))
    assert _steps.adapter_optimizer(opt, lc) is opt  # no LoRA+ wrapper: same numbers as before


@pytest.mark.parametrize(("override", "words"), [
    ("lora.init=svd", ["lora.init", "'svd'", "pissa", "olora"]),
    ("lora.dropout=1.0", ["lora.dropout", "[0, 1)"]),
    ("lora.dropout=-0.1", ["lora.dropout", "[0, 1)"]),
    ("lora.loraplus_ratio=0", ["lora.loraplus_ratio", "> 0"]),
    ("lora.dora=3", ["lora.dora", "true or false"]),
])
def test_bad_values_name_the_key(override, words):
    with pytest.raises(finetune.ConfigError) as info:
        finetune.apply_overrides(finetune.load_config(None), [override])
    for w in words:
        assert w in str(info.value)


def test_lowrank_runs_dora_with_dropout_rslora_and_loraplus(tmp_path):
    out, summary = _run(tmp_path, "lora.dora=true", "lora.dropout=0.1", "lora.rslora=true",
                        "lora.loraplus_ratio=4")
    rows = dict(summary["rows"])
    assert rows["adapter"] == ("DoRA r=2, alpha 8 (scale 5.657, rsLoRA), init kaiming, "
                               "dropout 0.1, LoRA+ ratio 4")
    m = summary["metrics"]
    assert m["trainable_params"] == 2 * (12 + 10) + 10  # a, b and the magnitude m
    assert math.isfinite(m["final_train_loss"]) and math.isfinite(m["held_out_loss"])
    adapters, _ = lora.load(out / "adapter.safetensors")
    assert adapters["w"].m is not None and adapters["w"].rslora


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_lowrank_runs_pissa_and_olora_and_writes_the_delta(tmp_path, init):
    out, summary = _run(tmp_path, f"lora.init={init}")
    assert dict(summary["rows"])["adapter"].endswith(f"init {init}")
    assert math.isfinite(summary["metrics"]["relative_error"])
    delta, config = lora.load(out / "adapter_delta.safetensors")
    trained, _ = lora.load(out / "adapter.safetensors")
    assert delta["w"].rank == 2 * trained["w"].rank and config["against"] == "original W"


def test_tiny_lm_refuses_dropout():
    with pytest.raises(finetune.ConfigError, match=r"lora\.dropout = 0\.1 is not supported by tiny_lm"):
        finetune.apply_overrides(finetune.load_config("tiny_lm"), ["lora.dropout=0.1"])


def test_make_adapters_follows_the_section(key):
    params = {"w": np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)}
    lc = _config.LoraConfig(rank=2, alpha=4.0, init="olora", dora=True)
    ads, base = _steps.make_adapters(lc, key, params)
    assert ads["w"].m is not None
    np.testing.assert_allclose(np.asarray(lora.merge(base, {"w": ads["w"]})[0]["w"]), params["w"],
                               rtol=1e-5, atol=1e-5)


def test_dora_pissa_run_resumes_bitwise(tmp_path, monkeypatch):
    import os
    import signal

    from jaxla.finetune import _runner

    extra = ("lora.dora=true", "lora.init=pissa", "lora.dropout=0.2", "run.checkpoint_every=1")
    full, _ = _run(tmp_path / "full", *extra)
    original = _runner._Progress.update

    def update(self, step, m):  # Ctrl-C arrives while step 2 runs
        original(self, step, m)
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(_runner._Progress, "update", update)
    cfg = finetune.apply_overrides(finetune.load_config(None), [*TINY, *extra])
    out = tmp_path / "half" / "run"
    summary = finetune.run_finetune(cfg, out=out, progress=False, echo=lambda s: None)
    assert summary["interrupted"]
    monkeypatch.setattr(_runner._Progress, "update", original)
    summary = finetune.run_finetune(cfg, out=out, resume=True, progress=False, echo=lambda s: None)
    assert not summary["interrupted"]
    a, _ = lora.load(full / "adapter.safetensors")
    b, _ = lora.load(out / "adapter.safetensors")
    for f in ("a", "b", "m"):
        np.testing.assert_array_equal(np.asarray(getattr(a["w"], f)), np.asarray(getattr(b["w"], f)))


def test_tiny_lm_runs_dora_on_an_olora_base(tmp_path):
    tiny = [
        "tiny_lm.n_layers=1", "tiny_lm.d_model=16", "tiny_lm.n_heads=2", "tiny_lm.d_ff=32",
        "tiny_lm.length=3", "tiny_lm.pretrain_steps=2", "train.steps=2", "train.batch_size=8",
        "tiny_lm.eval_examples=8", "tiny_lm.generations=1", "run.plots=false", "lora.rank=2",
        "run.fast_compile=true", "tiny_lm.full_ft_baseline=false",
        "lora.dora=true", "lora.init=olora", "lora.loraplus_ratio=16",
    ]
    cfg = finetune.apply_overrides(finetune.load_config("tiny_lm"), tiny)
    out = tmp_path / "run"
    summary = finetune.run_finetune(cfg, out=out, progress=False, echo=lambda s: None)
    assert not summary["interrupted"]
    assert dict(summary["rows"])["adapter"] == ("DoRA r=2, alpha 16 (scale 8), init olora, "
                                                "LoRA+ ratio 16")
    adapters, _ = lora.load(out / "adapter.safetensors")
    m = summary["metrics"]
    assert m["trainable_params"] == sum(a.a.size + a.b.size + a.m.size for a in adapters.values())
    for acc in m["accuracy"].values():
        assert 0 <= acc["exact"] <= acc["token"] <= 1
