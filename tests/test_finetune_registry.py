"""The demo registry, built-in configs, and the config checks that guard the run directory and memory."""

import sys
import textwrap

import pytest

from jaxla import finetune
from jaxla.finetune import _memory, _registry, _runner, demos
from jaxla.finetune._demo import Demo, MemoryTerm


def test_every_demo_is_registered_with_a_config_file():
    assert set(finetune.demo_names()) >= {"lowrank", "tiny_lm"}
    for name in finetune.demo_names():
        demo = _registry.get(name)
        assert isinstance(demo, Demo) and demo.name == name
        assert name in finetune.builtin_configs()
        cfg = finetune.load_config(name)
        assert cfg.run.demo == name and getattr(cfg, name) == cfg.section
        assert isinstance(cfg.section, demo.section)
        assert sum(t.bytes for t in demo.memory(cfg)) > 0


def test_builtin_configs_by_name_equal_the_files():
    root = demos.__path__[0]
    for name in finetune.builtin_configs():
        assert finetune.load_config(name) == finetune.load_config(f"{root}/{name}.toml")
        assert finetune.load_config(f"{name}.toml") == finetune.load_config(name)
    with pytest.raises(finetune.ConfigError) as info:
        finetune.load_config("tiny_lmm")
    assert "does not exist" in str(info.value) and "tiny_lm_mesh" in str(info.value)
    with pytest.raises(finetune.ConfigError, match="does not exist"):
        finetune.load_config("./tiny_lm")  # a path: never the built-in


def test_builtin_configs_work_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert finetune.load_config("tiny_lm").tiny_lm.pretrain_steps == 400
    assert finetune.load_config("lowrank") == finetune.Config()


def test_unknown_demo_lists_the_registered_ones():
    with pytest.raises(finetune.ConfigError) as info:
        finetune.apply_overrides(finetune.Config(), ["run.demo=nosuch"])
    assert "run.demo" in str(info.value) and "'lowrank'" in str(info.value)
    assert "'tiny_lm'" in str(info.value)


def test_other_demos_section_is_a_clear_attribute_error():
    with pytest.raises(AttributeError, match="no \\[tiny_lm\\] section"):
        finetune.Config().tiny_lm  # noqa: B018
    with pytest.raises(TypeError, match="LowRankConfig"):
        finetune.Config(section=finetune.TinyLMConfig())


@pytest.mark.parametrize("seed", ["100000000000000000000", "9223372036854775808", "-1"])
def test_seed_outside_what_jax_accepts(seed, tmp_path):
    with pytest.raises(finetune.ConfigError, match=r"run\.seed") as info:
        finetune.apply_overrides(finetune.Config(), [f"run.seed={seed}"])
    assert "2**63" in str(info.value)
    path = tmp_path / "c.toml"
    path.write_text(f"[run]\nseed = {seed}\n")
    with pytest.raises(finetune.ConfigError, match=r"run\.seed"):
        finetune.load_config(path)
    with pytest.raises(finetune.ConfigError, match=r"run\.seed"):
        finetune.apply_overrides(finetune.Config(), ["run.seed=1e20"])
    # The largest accepted seed is one jax.random.key takes.
    big = finetune.apply_overrides(finetune.Config(), [f"run.seed={2**63 - 1}"])
    import jax

    jax.random.key(big.run.seed)


@pytest.mark.parametrize("name", ["../../x", "", ".", "..", "a/b", "a\\b", "x*", "tab\tname"])
def test_run_name_must_be_a_plain_name(name):
    with pytest.raises(finetune.ConfigError, match=r"run\.name") as info:
        finetune.apply_overrides(finetune.Config(), [f"run.name={name}"])
    assert "plain directory name" in str(info.value)


def test_plain_run_names_are_accepted():
    cfg = finetune.apply_overrides(finetune.Config(), ["run.name=my-run_2.b"])
    assert cfg.run.name == "my-run_2.b"


@pytest.mark.parametrize("override, key", [
    ("lowrank.d_in=200000", "lowrank.d_in"),
    ("train.batch_size=1000000000", "train.batch_size"),
])
def test_sizes_that_cannot_fit_fail_before_work_starts(override, key, tmp_path, monkeypatch):
    # A fixed 8 GiB machine, so the test never depends on (or tries to use) this one's memory.
    monkeypatch.setattr(_memory, "available_bytes", lambda: 8 * 2**30)
    cfg = finetune.apply_overrides(finetune.Config(), [override])
    out = tmp_path / "run"
    with pytest.raises(finetune.ConfigError) as info:
        finetune.run_finetune(cfg, out=out, progress=False, echo=lambda s: None)
    msg = str(info.value)
    assert key in msg and "GiB" in msg and "available" in msg
    assert not out.exists()


def test_empty_out_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(finetune.RunError, match="--out is empty"):
        finetune.run_finetune(finetune.Config(), out="", progress=False, echo=lambda s: None)
    assert list(tmp_path.iterdir()) == []


def test_memory_check_names_the_largest_terms():
    terms = [MemoryTerm("weights", 10 * 2**30, ("a.x", "a.y")), MemoryTerm("tiny", 10, ("b.z",))]
    _memory.check_fits(terms, available=None)  # unknown: no check
    _memory.check_fits(terms, available=11 * 2**30)
    with pytest.raises(finetune.ConfigError) as info:
        _memory.check_fits(terms, available=2**30)
    assert "a.x, a.y" in str(info.value) and "b.z" not in str(info.value)
    avail = _memory.available_bytes()
    assert avail is None or avail > 0


def test_default_demo_fits_and_estimates_from_above():
    cfg = finetune.Config()
    total = sum(t.bytes for t in _registry.get("lowrank").memory(cfg))
    # At least W, the teacher and the float64 draw; well under a machine's memory.
    assert 16 * 768 * 3072 < total < 2**30


_TOY = '''
"""A toy demo written by a test: one module, no edit elsewhere."""
from dataclasses import dataclass, field

import jax.numpy as jnp

from jaxla.finetune import _runner, _steps
from jaxla.finetune._config import POS
from jaxla.finetune._demo import Demo, MemoryTerm


@dataclass(frozen=True)
class ToyConfig:
    width: int = field(default=4, metadata=POS)


def run(ctx):
    width = ctx.config.toydemo.width
    opt, sched = _steps.make_optimizer(ctx.config.optim, steps=ctx.config.train.steps)

    def init_state():
        p = {"w": jnp.ones((width,), jnp.float32)}
        return {"params": p, "opt": opt.init(p)}

    step = _steps.make_step(lambda fr, p, b: jnp.sum(jnp.square(p["w"] - b)), opt, sched,
                             lambda fr, s: jnp.zeros((width,), jnp.float32))
    res = _runner.train_phase(ctx, phase="toy", init_state=init_state, frozen={}, step_fn=step,
                              steps=ctx.config.train.steps, items_per_step=1)
    return {"title": "toy", "rows": [("loss", f"{res.last_loss:.3g}")],
            "metrics": {"loss": res.last_loss}, "interrupted": res.interrupted}


DEMO = Demo(name="toydemo", section=ToyConfig, run=run, validate=lambda cfg: None,
            preflight=lambda cfg: None, memory=lambda cfg: [MemoryTerm("w", 16, ("toy.width",))])
'''


def test_a_new_demo_is_one_module(tmp_path, monkeypatch):
    (tmp_path / "toydemo.py").write_text(textwrap.dedent(_TOY))
    monkeypatch.setattr(demos, "__path__", [*demos.__path__, str(tmp_path)])
    _registry._all.cache_clear()
    try:
        assert "toydemo" in finetune.demo_names()
        cfg = finetune.apply_overrides(finetune.Config(), [
            "run.demo=toydemo", "toydemo.width=3", "train.steps=3", "run.plots=false",
            "run.fast_compile=true"])
        assert cfg.toydemo.width == 3
        assert "[toydemo]" in finetune.config_to_toml(cfg)
        # The loop hands glibc's freed pages back after the compile and after the first step only,
        # with the step's state in hand (trimming is a syscall: not every step).
        trims = []
        monkeypatch.setattr(_runner, "release_freed_memory",
                            lambda: trims.append(len(steps_seen)))
        steps_seen = []
        real_update = _runner._Progress.update
        monkeypatch.setattr(_runner._Progress, "update",
                            lambda self, step, m: (steps_seen.append(step), real_update(self, step, m)))
        summary = finetune.run_finetune(cfg, out=tmp_path / "run", progress=False,
                                        echo=lambda s: None)
        assert summary["metrics"]["loss"] < 3.0  # started at |w - 0|² = 3
        assert trims == [0, 0] and steps_seen == [0, 1, 2], (trims, steps_seen)
        assert (tmp_path / "run" / "checkpoints" / "toy").is_dir()
    finally:
        _registry._all.cache_clear()
        sys.modules.pop("jaxla.finetune.demos.toydemo", None)
        monkeypatch.undo()
        _registry._all.cache_clear()



def test_every_key_of_every_demo_is_documented_in_its_file():
    import dataclasses

    root = demos.__path__[0]
    for name in finetune.demo_names():
        text = open(f"{root}/{name}.toml").read()
        for section, cls in [*finetune._config.SHARED_SECTIONS.items(),
                             (name, _registry.get(name).section)]:
            assert f"[{section}]" in text, (name, section)
            for f in dataclasses.fields(cls):
                assert f"\n{f.name} = " in text, f"{name}.toml: {section}.{f.name}"


def test_checkout_configs_are_the_packaged_files():
    from pathlib import Path

    configs = Path(__file__).resolve().parent.parent / "configs"
    for name in finetune.builtin_configs():
        assert (configs / f"{name}.toml").resolve() == Path(demos.__path__[0], f"{name}.toml").resolve()
