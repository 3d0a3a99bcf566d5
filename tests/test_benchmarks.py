"""Every benchmark suite runs in quick mode: structure and numerics, never timings."""

import importlib
import json

import pytest

from benchmarks import harness

SUITES = ["linear", "attention", "lora", "spectral", "finetune"]


def _suite(name):
    try:
        return importlib.import_module(f"benchmarks.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"benchmarks.{name}":
            pytest.fail(f"benchmark suite benchmarks/{name}.py is missing")
        raise


@pytest.mark.parametrize("name", SUITES)
def test_suite_quick(name, tmp_path, capsys):
    module = _suite(name)
    out = tmp_path / f"{name}.json"
    code = harness.main(name, module.run, ["--quick", "--json", str(out)])
    printed = capsys.readouterr().out
    payload = json.loads(out.read_text())
    assert payload["suite"] == name and payload["quick"] is True
    assert payload["machine"]["jax"] and payload["machine"]["command"]
    rows = payload["rows"]
    assert rows and all("name" in r for r in rows)
    assert all(r["name"] in printed for r in rows)
    checked = [r for r in rows if "ok" in r]
    assert checked, f"suite {name} checks no numerics"
    assert all(r["ok"] for r in checked), [r["name"] for r in checked if not r["ok"]]
    assert code == 0


def test_flop_conventions():
    assert harness.matmul_flops(4, 3072, 768) == 2 * 4 * 3072 * 768
    fwd = harness.attention_flops(1, 8, 2048, 2048, 64, causal=False)
    assert fwd == 4 * 8 * 2048 * 2048 * 64
    assert harness.attention_flops(1, 8, 2048, 2048, 64, causal=True) == fwd / 2
    assert harness.attention_flops(1, 8, 2048, 2048, 64, causal=False, backward=True) == fwd * 3.5


def test_check_close_and_table():
    good = harness.check_close([1.0, 2.0], [1.0, 2.0 + 1e-9], rtol=1e-6, atol=0)
    assert good["ok"] and good["max_abs_err"] < 1e-8
    bad = harness.check_close([1.0, float("nan")], [1.0, 2.0], rtol=1e-6, atol=0)
    assert not bad["ok"]
    assert not harness.check_close([1.0], [1.0, 2.0], rtol=1, atol=1)["ok"]
    table = harness.format_table([{"name": "a", "x": 1.5}, {"name": "b", "y": None}])
    assert "name" in table and "x" in table and "y" in table and "1.5" in table


def test_measure_reports_compile_apart():
    import jax
    import jax.numpy as jnp

    res = harness.measure(jax.jit(lambda x: x @ x), jnp.ones((64, 64), jnp.float32), iters=3)
    assert res["iters"] == 3 and res["compile_s"] > 0 and res["min_s"] <= res["median_s"] <= res["max_s"]
    assert float(res["out"][0, 0]) == 64.0
