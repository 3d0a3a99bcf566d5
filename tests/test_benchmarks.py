"""Benchmarks from the installed package: every suite's --quick run (structure and numerics, never
timings), the suite registry, --json checked before running, and the summarize/plot tools."""

import importlib
import json
import os
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jaxla import benchmarks, cli
from jaxla.benchmarks import finetune as finetune_suite
from jaxla.benchmarks import harness, plot_attention

ROOT = Path(__file__).resolve().parent.parent
RECORDED = ROOT / "benchmarks" / "results"
# attention_gpu's --quick run (Pallas interpret mode) is tested in test_pallas_attention (slow).
QUICK_SUITES = [e.name for e in benchmarks.SUITES if e.name != "attention_gpu"]


def _main(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, " ".join(err.split())  # messages are one wrapped paragraph


def _clean_failure(code, err, *words):
    assert code == 2, err
    assert err.startswith("jaxla: error: ") and "Traceback" not in err
    for w in words:
        assert w in err, (w, err)


def _never_run(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the suite ran although its --json target was unusable")

    monkeypatch.setattr(harness, "run_suite", boom)


def _fake_suite(rows):
    return lambda *, quick: [dict(r) for r in rows]


@pytest.mark.parametrize("name", QUICK_SUITES)
def test_suite_quick(name, tmp_path, capsys, monkeypatch):
    """``jaxla bench NAME --quick --json FILE`` from a directory that is not the checkout."""
    monkeypatch.chdir(tmp_path)
    code, printed, err = _main(capsys, "bench", name, "--quick", "--json", "out.json")
    payload = json.loads((tmp_path / "out.json").read_text())
    assert payload["suite"] == name and payload["quick"] is True
    assert payload["machine"]["jax"] and payload["machine"]["command"]
    rows = payload["rows"]
    assert rows and all("name" in r for r in rows)
    assert all(r["name"] in printed for r in rows)
    checked = [r for r in rows if "ok" in r]
    assert checked, f"suite {name} checks no numerics"
    assert all(r["ok"] for r in checked), [r["name"] for r in checked if not r["ok"]]
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == ["out.json"]  # no temp file or run directory left behind
    # bf16 kernels are also held to the bf16 matmul ceiling measured in the same run.
    bf16 = [r for r in rows if r["name"].startswith("bf16 ")]
    assert all(r["frac_of_bf16_matmul_ceiling"] > 0 for r in bf16), bf16


def test_registry_lists_exactly_the_suite_and_tool_modules():
    names = {m.name for m in pkgutil.iter_modules(benchmarks.__path__)}
    runnable = {n for n in names if not n.startswith(("_", "specs_")) and n != "harness"}
    suites, tools = {e.name for e in benchmarks.SUITES}, {e.name for e in benchmarks.TOOLS}
    assert runnable == suites | tools and not suites & tools
    for name in suites:
        assert callable(importlib.import_module(f"jaxla.benchmarks.{name}").run), name
    for name in tools:
        module = importlib.import_module(f"jaxla.benchmarks.{name}")
        assert callable(module.main) and callable(module.run_tool) and not hasattr(module, "run"), name
        assert module.USAGE.startswith(f"jaxla bench {name}"), name
    assert benchmarks.find("linear").name == "linear" and benchmarks.find("harness") is None


def test_unknown_or_missing_suite_lists_suites_and_tools(capsys):
    code, _, err = _main(capsys, "bench", "summary")
    _clean_failure(code, err, "'summary'", "linear", "finetune", "summarize", "plot_attention")
    code, _, err = _main(capsys, "bench")
    _clean_failure(code, err, "name a suite", "linear", "finetune", "summarize", "plot_attention")


@pytest.mark.parametrize("target,words", [
    ("missing/out.json", ["does not exist", "nothing was run"]),
    ("afile/out.json", ["is not a directory"]),
    ("adir", ["is a directory"]),
    ("", ["empty"]),
])
def test_unusable_json_is_rejected_before_the_suite_runs(target, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    _never_run(monkeypatch)
    code, out, err = _main(capsys, "bench", "linear", "--quick", "--json", target)
    _clean_failure(code, err, "--json", *words)
    assert out == "" and sorted(os.listdir(tmp_path)) == ["adir", "afile"]
    assert os.listdir(tmp_path / "adir") == []


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs a directory that takes no files")
def test_unwritable_json_folder_is_rejected_before_the_suite_runs(capsys, monkeypatch):
    # /proc takes no new files even for root, for whom permission bits do not apply.
    _never_run(monkeypatch)
    code, _, err = _main(capsys, "bench", "lora", "--json", "/proc/jaxla-bench.json")
    _clean_failure(code, err, "/proc", "cannot create a file")


def test_suite_main_checks_json_before_running(tmp_path, capsys, monkeypatch):
    """``python -m jaxla.benchmarks.SUITE`` goes through harness.main: the same check, usage exit 2."""
    _never_run(monkeypatch)
    with pytest.raises(SystemExit) as info:
        harness.main("linear", _fake_suite([]), ["--json", str(tmp_path / "no" / "x.json")])
    assert info.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_json_write_failure_at_the_end_is_an_error_not_a_traceback(tmp_path, capsys):
    folder = tmp_path / "out"
    folder.mkdir()

    def run(*, quick):  # the folder disappears while the suite runs
        shutil.rmtree(folder)
        return [{"name": "row", "ok": True}]

    code = harness.main("fake", run, ["--json", str(folder / "r.json")])
    captured = capsys.readouterr()
    assert code == 2 and "could not write" in captured.err and "row" in captured.out
    assert not folder.exists()


def test_failed_numerics_exit_1(tmp_path, capsys):
    code = harness.main("fake", _fake_suite([{"name": "bad row", "ok": False}]),
                        ["--json", str(tmp_path / "r.json")])
    assert code == 1 and "bad row" in capsys.readouterr().err
    assert json.loads((tmp_path / "r.json").read_text())["rows"][0]["ok"] is False


def test_suite_rejects_paths_and_tools_reject_suite_options(capsys):
    code, _, err = _main(capsys, "bench", "linear", "some.json")
    _clean_failure(code, err, "takes no PATH")
    code, _, err = _main(capsys, "bench", "summarize", "--quick")
    _clean_failure(code, err, "not a suite")
    code, _, err = _main(capsys, "bench", "plot_attention", "only_one.json")
    _clean_failure(code, err, "two paths", "got 1")


def _write_results(path, suite, rows):
    harness.main(suite, _fake_suite(rows), ["--json", str(path)])


def test_summarize_files_folders_and_recorded_results(tmp_path, capsys, monkeypatch):
    _write_results(tmp_path / "a.json", "alpha", [{"name": "a row", "jaxla_ms": 1.5, "ok": True,
                                                   "ignored_column": 7}])
    _write_results(tmp_path / "b.json", "beta", [{"name": "b row", "speedup_x": 2.0}])
    capsys.readouterr()
    code, out, _ = _main(capsys, "bench", "summarize", str(tmp_path))
    assert code == 0 and "# alpha" in out and "# beta" in out and "a row" in out and "1.5" in out
    assert "ignored_column" not in out
    # The recorded results are valid results files; without PATH, summarize reads them from the checkout.
    monkeypatch.chdir(ROOT)
    code, out, _ = _main(capsys, "bench", "summarize")
    recorded = sorted(RECORDED.glob("*.json"))
    assert code == 0 and recorded and all(str(p.relative_to(ROOT)) in out for p in recorded)
    assert out.count("\n# ") + out.startswith("# ") == len(recorded)


def test_summarize_without_results_here_explains(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = _main(capsys, "bench", "summarize")
    _clean_failure(code, err, "needs result files", "benchmarks/results")
    code, _, err = _main(capsys, "bench", "summarize", "nowhere.json")
    _clean_failure(code, err, "nowhere.json", "does not exist")
    code, _, err = _main(capsys, "bench", "summarize", str(tmp_path))
    _clean_failure(code, err, "holds no *.json")


@pytest.mark.parametrize("content,words", [
    (b"{not json", ["not valid JSON"]),
    (b"\xff\xfe", ["not valid JSON"]),
    (b"[" * 100_000 + b"]" * 100_000, ["not valid JSON", "nested too deeply"]),
    (b"[1, 2]", ["JSON list", "expected an object"]),
    (b'{"rows": {"name": "x"}}', ["no list 'rows'"]),
    (b'{"rows": [{"ok": true}]}', ["rows[0]", "string 'name'"]),
    (b'{"rows": [{"name": "x", "ms": {"a": 1}}]}', ["rows[0]['ms']", "dict"]),
    (b'{"rows": [], "machine": "cpu"}', ["'machine'"]),
])
def test_hostile_results_files_are_clean_errors(content, words, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_bytes(content)
    code, _, err = _main(capsys, "bench", "summarize", str(bad))
    _clean_failure(code, err, "bad.json", *words)
    code, _, err = _main(capsys, "bench", "plot_attention", str(bad), str(tmp_path / "p.png"))
    _clean_failure(code, err, "bad.json", *words)
    assert not (tmp_path / "p.png").exists()


def test_oversized_results_file_is_not_read(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(harness, "MAX_RESULTS_BYTES", 64)
    _write_results(tmp_path / "big.json", "big", [{"name": "x" * 100}])
    capsys.readouterr()
    code, _, err = _main(capsys, "bench", "summarize", str(tmp_path / "big.json"))
    _clean_failure(code, err, "big.json", "more than a results file")


def test_plot_attention_checks_its_inputs_before_matplotlib(tmp_path, capsys, monkeypatch):
    recorded = str(RECORDED / "cpu_attention.json")
    code, _, err = _main(capsys, "bench", "plot_attention", recorded, str(tmp_path / "no" / "p.png"))
    _clean_failure(code, err, "PNG", "does not exist")
    _write_results(tmp_path / "linear.json", "linear", [{"name": "linear 4x8->16", "jaxla_ms": 1.0}])
    code, _, err = _main(capsys, "bench", "plot_attention", str(tmp_path / "linear.json"),
                         str(tmp_path / "p.png"))
    _clean_failure(code, err, "linear.json", "no fwd/fwd+bwd rows", "jaxla bench attention")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if matplotlib were not installed
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    code, _, err = _main(capsys, "bench", "plot_attention", recorded, str(tmp_path / "p.png"))
    _clean_failure(code, err, "needs matplotlib", "jaxla[plot]")
    assert sorted(os.listdir(tmp_path)) == ["linear.json"]


def test_plot_attention_draws_the_recorded_sweep(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "sweep.png"
    code, out, err = _main(capsys, "bench", "plot_attention", str(RECORDED / "cpu_attention.json"),
                           str(png))
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(png) in out
    assert len(plot_attention.sweep_rows(harness.read_results(RECORDED / "cpu_attention.json"))) > 4


def test_finetune_suite_finds_its_demo_configs():
    assert finetune_suite.demo_config_path("lowrank") is None  # the built-in default demo
    assert finetune_suite.demo_config_path("tiny_lm") == "tiny_lm"  # shipped inside the package
    with pytest.raises(FileNotFoundError, match="no built-in config 'nope'"):
        finetune_suite.demo_config_path("nope")


def test_bench_runs_from_a_package_without_its_checkout(tmp_path):
    """A copy of the package alone on PYTHONPATH, cwd elsewhere: no import reaches the checkout."""
    site = tmp_path / "site"
    shutil.copytree(ROOT / "jaxla", site / "jaxla", ignore=shutil.ignore_patterns("__pycache__"))
    results = tmp_path / "results.json"
    results.write_text((RECORDED / "cpu_linear.json").read_text())
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(site)}
    script = (
        "import importlib, sys\n"
        "from jaxla import benchmarks, cli\n"
        "for e in benchmarks.SUITES + benchmarks.TOOLS:\n"
        "    m = importlib.import_module('jaxla.benchmarks.' + e.name)\n"
        "    assert m.__file__.startswith(sys.argv[1]), m.__file__\n"
        "assert 'benchmarks' not in sys.modules\n"
        "from jaxla.benchmarks import finetune\n"
        "assert finetune.demo_config_path('lowrank') is None\n"
        "assert finetune.demo_config_path('tiny_lm') == 'tiny_lm'  # built into the package\n"
        "sys.exit(cli.main(['bench', 'summarize', sys.argv[2]]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(site), str(results)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "# linear" in proc.stdout and "linear 4096x768->3072 float32" in proc.stdout


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


def test_bf16_ceiling_includes_the_f32_product_of_the_bf16_values():
    """Without bf16 units XLA's bf16 matmul ran at 0.54x of NumPy's f32 one on the upcast values,
    which computes the same products: a bf16 ceiling from XLA alone was one a kernel could pass."""
    import jax.numpy as jnp

    c = harness.matmul_ceilings(jnp.bfloat16, quick=True)
    assert c.numpy is not None and c.numpy > 0 and c.xla > 0
    assert c.best == max(c.xla, c.numpy)


def test_measure_reports_compile_apart():
    import jax
    import jax.numpy as jnp

    res = harness.measure(jax.jit(lambda x: x @ x), jnp.ones((64, 64), jnp.float32), iters=3)
    assert res["iters"] == 3 and res["compile_s"] > 0 and res["min_s"] <= res["median_s"] <= res["max_s"]
    assert float(res["out"][0, 0]) == 64.0


def test_quant_scaling_sizes_and_the_synthetic_base(monkeypatch):
    """``quant --scaling``'s configs are SmolLM2's architecture at the size each is named (within
    5%), every blocked axis a multiple of the formats' blocks; the piecewise q4_1 base is bitwise
    what ``models.quantize`` gives on the same random weights (table pieces with a tail), and the
    f32 base is those weights decoded."""
    import jax
    import numpy as np

    from jaxla import models, quant
    from jaxla.benchmarks import quant as qbench

    for name in qbench.SCALING_SIZES:
        c = qbench.scaling_config(name)
        want = float(name[:-1]) * {"M": 1e6, "B": 1e9}[name[-1]]
        assert abs(qbench.scaling_param_count(c) / want - 1) <= 0.05, name
        assert (c.head_dim, c.num_heads // c.num_kv_heads, c.num_heads % c.num_kv_heads) == (64, 3, 0)
        assert c.vocab_size == 49152 and c.tie_word_embeddings
        for dim in (c.hidden_size, c.intermediate_size, c.num_kv_heads * c.head_dim):
            assert dim % 64 == 0, (name, dim)
    with pytest.raises(ValueError, match="size must be one of"):
        qbench.scaling_config("7B")

    tiny = models.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=64, num_layers=2,
                              num_heads=2, num_kv_heads=1, head_dim=32, tie_word_embeddings=True)
    monkeypatch.setattr(qbench, "_TABLE_PIECE_ROWS", 40)  # pieces of 40, 40 and 16 rows
    targets = [*qbench.KERNELS, "embed/table"]
    want = models.quantize(qbench._synthetic_model(tiny, "random"), format="q4_1", targets=targets)
    got = qbench._synthetic_model(tiny, "q4_1")
    dense = qbench._synthetic_model(tiny, "f32")
    assert jax.tree.structure(got.params) == jax.tree.structure(want.params)
    for g, w, d in zip(*(jax.tree.leaves(m.params, is_leaf=quant.is_qarray) for m in (got, want, dense)),
                       strict=True):
        if quant.is_qarray(w):
            np.testing.assert_array_equal(np.asarray(g.codes), np.asarray(w.codes))
            assert (g.format, g.axis, g.shape) == (w.format, w.axis, w.shape)
            np.testing.assert_array_equal(np.asarray(d), np.asarray(quant.dequantize(w)))
        else:
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    assert qbench.scaling_param_count(tiny) == sum(
        int(np.prod(x.shape)) for x in jax.tree.leaves(dense.params))


def test_quant_step_buffers_count_an_aliased_output_once():
    """The step-buffer bytes beside the peaks: XLA's arguments + outputs + temporaries of the
    compiled step, an output donated into its argument's buffer counted once."""
    import jax
    import jax.numpy as jnp

    from jaxla.benchmarks import quant as qbench

    w, a = jnp.ones((256, 512)), jnp.ones((512,))
    step = jax.jit(lambda w, a: (a + jnp.tanh(w).sum(0), jnp.tanh(w) @ a), donate_argnums=1)
    m = step.lower(w, a).compile().memory_analysis()
    child = {"argument_bytes": m.argument_size_in_bytes, "output_bytes": m.output_size_in_bytes,
             "alias_bytes": m.alias_size_in_bytes, "temp_bytes": m.temp_size_in_bytes}
    assert m.alias_size_in_bytes == a.nbytes and m.argument_size_in_bytes == w.nbytes + a.nbytes
    held = w.nbytes + a.nbytes + 256 * 4 + m.temp_size_in_bytes  # the new `a` lives in the old one's
    assert held <= qbench.step_buffer_bytes(child) <= held + 64  # (+ the output tuple's table)
    assert qbench.step_buffer_bytes({"argument_bytes": 0}) == 0  # no memory analysis here


def test_quant_scaling_flag_bounds_its_children_by_free_memory(tmp_path, capsys, monkeypatch):
    """``python -m jaxla.benchmarks.quant --scaling --json FILE`` runs the scaling rows (not the
    suite), and a child that would not fit in the memory available is skipped with a row saying so,
    never started."""
    from jaxla.benchmarks import quant as qbench

    def no_child(*args, **kwargs):
        raise AssertionError("a child was started although it does not fit")

    monkeypatch.setattr(qbench._memory, "available_bytes", lambda: 2**30)
    monkeypatch.setattr(qbench, "_child_json", no_child)
    monkeypatch.setattr(qbench, "run", no_child)
    assert qbench.main(["--scaling", "--json", str(tmp_path / "s.json")]) == 0
    payload = json.loads((tmp_path / "s.json").read_text())
    names = [r["name"] for r in payload["rows"]]
    assert payload["suite"] == "quant_scaling"
    for size in qbench.SCALING_RUN:
        for kind in qbench.SCALING_KINDS:
            assert any(n.startswith(f"synthetic {size}, {kind}: skipped, needs ~") for n in names)
    assert [r["size"] for r in payload["rows"] if "size" in r] == [
        f"none of {', '.join(qbench.SCALING_RUN)}"] * 2
    capsys.readouterr()
    assert qbench.main(["--scaling", "--sizes", "1.5B", "--json", str(tmp_path / "s.json")]) == 0
    names = [r["name"] for r in json.loads((tmp_path / "s.json").read_text())["rows"]]
    assert names[0].startswith("synthetic 1.5B: D=2304") and "none of 1.5B" in capsys.readouterr().out
    for argv in (["--sizes", "1B"], ["--scaling", "--sizes", "7B"]):
        with pytest.raises(SystemExit) as info:
            qbench.main(argv)
        assert info.value.code == 2 and "--sizes" in capsys.readouterr().err
