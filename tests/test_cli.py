"""The ``jaxla`` command: help texts, exit statuses, and one clean paragraph for every bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxla import cli

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--set", "lowrank.d_in=16", "--set", "lowrank.d_out=32", "--set", "lowrank.true_rank=2",
        "--set", "lora.rank=2", "--set", "train.batch_size=8", "--set", "train.steps=3",
        "--set", "lowrank.eval_examples=16", "--set", "run.plots=false",
        "--set", "run.fast_compile=true", "--no-progress"]


def _main(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, " ".join(err.split())  # messages are one wrapped paragraph


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    top = capsys.readouterr().out
    assert "finetune" in top and "bench" in top
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--help"])
    text = capsys.readouterr().out
    for option in ("CONFIG", "--set", "--out", "--resume", "--print-config", "--no-progress",
                   "--cpu-devices", "lowrank.toml", "tiny_lm.toml"):
        assert option in text, option


def test_print_config_round_trips(capsys, tmp_path):
    code, out, _ = _main(capsys, "finetune", "--set", "lora.rank=4", "--print-config")
    assert code == 0 and "rank = 4" in out
    from jaxla import finetune

    path = tmp_path / "c.toml"
    path.write_text(out)
    assert finetune.load_config(path).lora.rank == 4


def test_finetune_runs_and_prints_summary(capsys, tmp_path):
    out_dir = tmp_path / "run"
    code, out, err = _main(capsys, "finetune", *TINY, "--out", str(out_dir))
    assert code == 0, err
    assert "trainable params" in out and "‖ΔW − ΔW*‖/‖ΔW*‖" in out
    assert "[adapt] step 3/3" in out  # plain log lines when not on a terminal
    assert json.loads((out_dir / "summary.json").read_text())["metrics"]["steps"] == 3
    # The finished run can be resumed (nothing left to do) but not started over in place.
    code, _, err = _main(capsys, "finetune", *TINY, "--out", str(out_dir))
    assert code == 2 and "already holds a run" in err and "--resume" in err
    code, out, err = _main(capsys, "finetune", *TINY, "--out", str(out_dir), "--resume")
    assert code == 0, err


def _assert_clean_failure(code, err, *words):
    assert code == 2, err
    assert err.startswith("jaxla: error: ")
    assert "Traceback" not in err
    for w in words:
        assert w in err, (w, err)


@pytest.mark.parametrize(
    "args, words",
    [
        (["missing.toml"], ["missing.toml", "does not exist"]),
        (["--set", "lora.rnak=4"], ["lora.rnak", "accepts"]),
        (["--set", "lora.rank=four"], ["lora.rank", "'four'", "an integer"]),
        (["--set", "lora.rank=5000"], ["lora.rank", "5000", "too large"]),
        (["--set", "train.batch_size=9", "--set", "mesh.data=2"],
         ["train.batch_size", "9", "mesh.data", "2"]),
        (["--set", "mesh.data=16"], ["16", "devices", "exist"]),
        (["--resume"], ["no checkpoint"]),
        (["--set", "lora.targets=nomatch"], ["lora.targets", "['nomatch']", "does not fit"]),
        (["--set", "run.demo=tiny_lm", "--set", "lora.targets=down"],
         ["lora.targets", "['down']", "does not fit"]),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(capsys, tmp_path, args, words):
    out_dir = tmp_path / "run"
    argv = ["finetune", *[a if a != "missing.toml" else str(tmp_path / a) for a in args]]
    if "--set" in args and "mesh.data=16" in args:
        argv += ["--set", "train.batch_size=16"]
    code, _, err = _main(capsys, *argv, "--out", str(out_dir))
    _assert_clean_failure(code, err, *words)
    assert not out_dir.exists()


def test_malformed_and_unknown_key_files(capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[lora\nrank = 4\n")
    code, _, err = _main(capsys, "finetune", str(bad), "--out", str(tmp_path / "r"))
    _assert_clean_failure(code, err, "bad.toml", "not valid TOML")
    bad.write_text("[lora]\nrank = \"8\"\n")
    code, _, err = _main(capsys, "finetune", str(bad), "--out", str(tmp_path / "r"))
    _assert_clean_failure(code, err, "lora.rank", "'8'", "an integer")
    assert not (tmp_path / "r").exists()


def test_unwritable_out_dir(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, _, err = _main(capsys, "finetune", *TINY, "--out", str(blocker / "run"))
    _assert_clean_failure(code, err, "not writable")
    assert blocker.read_text() == "not a directory"


def test_resume_with_other_config(capsys, tmp_path):
    out_dir = tmp_path / "run"
    code, _, err = _main(capsys, "finetune", *TINY, "--out", str(out_dir))
    assert code == 0, err
    before = sorted(p.name for p in out_dir.rglob("*"))
    # Only the optimizer settings may change on --resume (tests/test_finetune_faults.py); any
    # other key is refused and nothing is written.
    code, _, err = _main(capsys, "finetune", *TINY, "--set", "lora.alpha=4",
                         "--set", "optim.learning_rate=0.5", "--out", str(out_dir), "--resume")
    _assert_clean_failure(code, err, "different config", "lora.alpha", "8.0", "4.0")
    assert "optim.learning_rate:" not in err  # an adjustable key is not listed as a difference
    assert sorted(p.name for p in out_dir.rglob("*")) == before


def test_bench_unknown_suite(capsys):
    code, _, err = _main(capsys, "bench", "no_such_suite")
    _assert_clean_failure(code, err, "no_such_suite", "available")


def test_python_dash_m_entry_point(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "jaxla", "finetune", "--set", "lora.rank=0"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("jaxla: error: config key lora.rank = 0")
    assert "Traceback" not in proc.stderr
