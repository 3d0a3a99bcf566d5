"""Fine-tune configs: defaults, shipped files, overrides, and every invalid-input message."""

import dataclasses
from pathlib import Path

import pytest

from jaxla import finetune
from jaxla.finetune import _config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SHIPPED = ["lowrank.toml", "lowrank_mesh.toml", "tiny_lm.toml", "tiny_lm_mesh.toml"]


def test_default_config_is_lowrank_toml():
    # The installed package runs its default demo from the dataclass defaults; the shipped file must
    # say exactly the same.
    assert finetune.load_config(CONFIGS / "lowrank.toml") == finetune.Config()
    assert finetune.load_config(None) == finetune.Config()


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_load(name):
    cfg = finetune.load_config(CONFIGS / name)
    assert cfg.run.demo in name
    assert ("mesh" in name) == (cfg.mesh.data * cfg.mesh.model > 1)


def test_default_demo_sizes():
    cfg = finetune.Config()
    assert (cfg.lowrank.d_in, cfg.lowrank.d_out, cfg.lora.rank) == (768, 3072, 8)


@pytest.mark.parametrize("name", SHIPPED)
def test_toml_round_trip(name, tmp_path):
    cfg = finetune.load_config(CONFIGS / name)
    path = tmp_path / "resolved.toml"
    path.write_text(finetune.config_to_toml(cfg))
    assert finetune.load_config(path) == cfg


def test_overrides_convert_types():
    cfg = finetune.apply_overrides(
        finetune.Config(),
        ["lora.rank=4", "optim.learning_rate=3e-3", "run.plots=false", "lora.targets=w,q",
         "optim.schedule=constant", "lowrank.delta_scale=2"],
    )
    assert cfg.lora.rank == 4 and isinstance(cfg.lora.rank, int)
    assert cfg.optim.learning_rate == 3e-3
    assert cfg.run.plots is False
    assert cfg.lora.targets == ("w", "q")
    assert cfg.optim.schedule == "constant"
    assert cfg.lowrank.delta_scale == 2.0 and isinstance(cfg.lowrank.delta_scale, float)


def test_override_switches_demo():
    cfg = finetune.apply_overrides(finetune.Config(), ["run.demo=tiny_lm", "tiny_lm.length=4"])
    assert cfg.run.demo == "tiny_lm" and cfg.tiny_lm.length == 4


def test_fingerprint_ignores_operational_keys():
    base = finetune.Config()
    ops = finetune.apply_overrides(base, ["run.log_every=7", "run.checkpoint_every=3",
                                          "run.plots=false", "run.name=other"])
    assert finetune.config_fingerprint(ops) == finetune.config_fingerprint(base)
    numeric = finetune.apply_overrides(base, ["lora.rank=4"])
    assert finetune.config_fingerprint(numeric) != finetune.config_fingerprint(base)


def _write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, words",
    [
        ("[lora]\nrnak = 4\n", ["lora.rnak", "4", "accepts", "rank"]),
        ("[loraa]\nrank = 4\n", ["[loraa]", "expected sections"]),
        ("[lora]\nrank = \"four\"\n", ["lora.rank", "'four'", "wrong type", "an integer"]),
        ("[lora]\nrank = 4.5\n", ["lora.rank", "4.5", "an integer"]),
        ("[run]\nplots = 1\n", ["run.plots", "true or false"]),
        ("[lora]\nrank = 0\n", ["lora.rank", "0", "> 0"]),
        ("[optim]\nlearning_rate = -1.0\n", ["optim.learning_rate", "-1.0", "> 0"]),
        ("[optim]\noptimizer = \"lion\"\n", ["optim.optimizer", "'lion'", "'adam'"]),
        ("[lora]\nrank = 1000\n", ["lora.rank", "1000", "too large", "768"]),
        ("[lowrank]\ntrue_rank = 5000\n", ["lowrank.true_rank", "5000", "768"]),
        ("[train]\nbatch_size = 10\n[mesh]\ndata = 4\n", ["train.batch_size", "10", "mesh.data", "4"]),
        ("[tiny_lm]\nlength = 3\n", ["[tiny_lm]", "does not apply", "lowrank"]),
        ("run = 3\n", ["[run]", "table"]),
        ("[lora]\ntargets = [1, 2]\n", ["lora.targets", "list of strings"]),
        ("[optim]\nlearning_rate = nan\n", ["optim.learning_rate", "finite"]),
        ("[run]\ndemo = \"tiny_lm\"\n[tiny_lm]\nd_model = 30\nn_heads = 4\n",
         ["tiny_lm.n_heads", "d_model", "30"]),
    ],
)
def test_invalid_config_messages(tmp_path, text, words):
    with pytest.raises(finetune.ConfigError) as info:
        finetune.load_config(_write(tmp_path, text))
    msg = str(info.value)
    for word in words:
        assert word in msg, (word, msg)
    assert "\n" not in msg


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(finetune.ConfigError, match="does not exist"):
        finetune.load_config(tmp_path / "nope.toml")
    with pytest.raises(finetune.ConfigError, match="not valid TOML"):
        finetune.load_config(_write(tmp_path, "[lora\nrank = 4\n"))
    with pytest.raises(finetune.ConfigError, match="is a directory"):
        finetune.load_config(tmp_path)


@pytest.mark.parametrize(
    "override, words",
    [
        ("lora.rank", ["malformed", "section.key=value"]),
        ("lora.rank=four", ["lora.rank", "'four'", "an integer"]),
        ("nosuch.key=1", ["names no config key"]),
        ("lora.nosuch=1", ["lora.nosuch", "accepts"]),
        ("run.plots=maybe", ["run.plots", "true or false"]),
        ("tiny_lm.length=4", ["does not apply", "lowrank"]),
        ("lora.rank=-2", ["lora.rank", "-2", "> 0"]),
    ],
)
def test_invalid_overrides(override, words):
    with pytest.raises(finetune.ConfigError) as info:
        finetune.apply_overrides(finetune.Config(), [override])
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_every_key_documented_in_default_file():
    text = (CONFIGS / "lowrank.toml").read_text()
    for section in ("run", "train", "optim", "lora", "mesh", "lowrank"):
        for f in dataclasses.fields(getattr(finetune.Config(), section)):
            assert f"\n{f.name} = " in text, f"{section}.{f.name}"
    tiny = (CONFIGS / "tiny_lm.toml").read_text()
    for f in dataclasses.fields(finetune.TinyLMConfig):
        assert f"\n{f.name} = " in tiny, f"tiny_lm.{f.name}"


def test_config_error_is_value_error():
    assert issubclass(_config.ConfigError, ValueError)
