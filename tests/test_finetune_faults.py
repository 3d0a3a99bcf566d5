"""Faults around a fine-tune run: dead-end run directories, damaged checkpoints, changed optimizer
settings on --resume, full disks, out-of-memory, and CLI arguments that used to misbehave."""

import dataclasses
import errno
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxla import cli, finetune, lora
from jaxla.finetune import _rundir, _steps
from jaxla.finetune.demos import lowrank as _lowrank

# One tiny config: every run of it compiles the same programs. Checkpoints after every step, three
# kept, so a damaged newest one leaves older intact ones to fall back on.
TINY = [
    "lowrank.d_in=16", "lowrank.d_out=32", "lowrank.true_rank=2", "lora.rank=2",
    "train.batch_size=8", "train.steps=6", "optim.warmup_steps=2", "run.checkpoint_every=1",
    "run.keep_checkpoints=3", "lowrank.eval_examples=16", "run.plots=false",
    "run.fast_compile=true",
]
SETS = [a for s in TINY for a in ("--set", s)]


def _cfg(*extra):
    return finetune.apply_overrides(finetune.load_config(None), [*TINY, *extra])


def _run(cfg, out, **kw):
    return finetune.run_finetune(cfg, out=out, progress=False, echo=lambda s: None, **kw)


def _main(capsys, *argv):
    code = cli.main(["finetune", "--no-progress", *SETS, *argv])
    out, err = capsys.readouterr()
    return code, out, " ".join(err.split())  # messages are wrapped paragraphs


def _adapter_bytes(out):
    adapters, _ = lora.load(out / "adapter.safetensors")
    return {k: (np.asarray(v.a).tobytes(), np.asarray(v.b).tobytes()) for k, v in adapters.items()}


def _ckpts(out, phase="adapt"):
    return [p.name for _, p in _rundir.list_checkpoints(out / "checkpoints" / phase)]


def _leftovers(out):
    return sorted(str(p.relative_to(out)) for p in out.rglob("*.tmp"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every recovered run must match bit for bit."""
    out = tmp_path_factory.mktemp("reference") / "run"
    _run(_cfg(), out)
    return out


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A run stopped (like Ctrl-C) after 4 of 6 steps: checkpoints at steps 2, 3 and 4."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    assert _run(_cfg(), out, stop_after=4)["interrupted"]
    assert _ckpts(out) == ["step_00000002.npz", "step_00000003.npz", "step_00000004.npz"]
    return out


@pytest.fixture
def stopped_copy(stopped, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    return out


# -- 1. a run that never reached its first checkpoint ----------------------------------------------


def test_resume_restarts_a_run_killed_before_its_first_checkpoint(capsys, tmp_path, reference,
                                                                   monkeypatch):
    out = tmp_path / "run"

    def killed(*args, **kwargs):  # the process dies as it writes its first checkpoint
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(_rundir, "save_checkpoint", killed)
        code, _, err = _main(capsys, "--out", str(out))
    assert code == 130 and err.startswith("jaxla: error: aborted by Ctrl-C"), err
    assert (out / "config.json").is_file() and not _ckpts(out)
    assert (out / "metrics.jsonl").read_text()  # steps ran, then the process died
    code, _, err = _main(capsys, "--out", str(out))  # a fresh run into it is refused...
    assert code == 2 and "already holds a run" in err and "--resume" in err
    code, _, err = _main(capsys, "--out", str(out), "--resume")  # ...and --resume restarts it
    assert code == 0, err
    assert "jaxla: warning:" in err and "restarting the run from step 0" in err
    assert _adapter_bytes(out) == _adapter_bytes(reference)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(6))
    log = [json.loads(line) for line in (out / "resume.jsonl").read_text().splitlines()]
    assert log[-1]["from_steps"] == {} and log[-1]["changed"] == {}


def test_resume_of_a_directory_without_a_run_still_fails(capsys, tmp_path):
    code, _, err = _main(capsys, "--out", str(tmp_path / "empty"), "--resume")
    assert code == 2 and "no config.json" in err and "no checkpoint" in err, err
    assert not (tmp_path / "empty").exists()


# -- 2. damaged checkpoints ------------------------------------------------------------------------


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_data_bit(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x10
    path.write_bytes(bytes(data))


def _empty(path):
    path.write_bytes(b"")


def _random_bytes(path):
    path.write_bytes(np.random.default_rng(0).bytes(4096))


@pytest.mark.parametrize("damage", [_truncate, _flip_data_bit, _empty, _random_bytes])
def test_resume_skips_a_damaged_newest_checkpoint(capsys, stopped_copy, reference, damage):
    out = stopped_copy
    newest = out / "checkpoints" / "adapt" / "step_00000004.npz"
    damage(newest)
    # A kill during a checkpoint write leaves write_atomic's temporary file: resume removes it.
    (out / "checkpoints" / "adapt" / ".step_00000005.npz.k3_x9q.tmp").write_bytes(b"PK\x03")
    assert _rundir.verify_checkpoint(newest) is not None
    code, _, err = _main(capsys, "--out", str(out), "--resume")
    assert code == 0, err
    assert f"jaxla: warning: checkpoint {str(newest)!r} is damaged" in err, err
    assert "resumes from the newest intact checkpoint, step 3" in err
    assert "pickle" not in err
    assert (out / "checkpoints" / "adapt" / "step_00000004.npz.damaged").is_file()
    assert _adapter_bytes(out) == _adapter_bytes(reference)  # bit-exact despite the fallback
    assert _ckpts(out) == ["step_00000004.npz", "step_00000005.npz", "step_00000006.npz"]
    assert _leftovers(out) == []
    log = json.loads((out / "resume.jsonl").read_text().splitlines()[-1])
    assert log["from_steps"] == {"adapt": 3} and log["damaged"][0]["checkpoint"] == str(newest)


def test_resume_with_every_checkpoint_damaged_restarts_from_step_0(capsys, stopped_copy, reference):
    out = stopped_copy
    for name in _ckpts(out):
        _flip_data_bit(out / "checkpoints" / "adapt" / name)
    code, _, err = _main(capsys, "--out", str(out), "--resume")
    assert code == 0, err
    assert err.count("' is damaged (") == 3 and "resumes from step 0" in err
    assert "(every checkpoint is damaged): restarting the run from step 0" in err
    assert _adapter_bytes(out) == _adapter_bytes(reference)


def test_random_bytes_are_reported_without_pickle_advice(tmp_path):
    path = tmp_path / "step_00000001.npz"
    _random_bytes(path)
    template = {"w": jax.ShapeDtypeStruct((2,), jnp.float32)}
    with pytest.raises(finetune.RunError) as info:
        _rundir.load_checkpoint(path, template, fingerprint="x")
    message = str(info.value)
    assert str(path) in message and "damaged" in message and "not a zip archive" in message
    assert "pickle" not in message.lower()


def _tiny_checkpoint(tmp_path):
    state = {"params": {"a": np.arange(6, dtype=np.float32).reshape(2, 3)},
             "opt": (np.int32(7), np.linspace(-1, 1, 5, dtype=np.float32))}
    path = _rundir.save_checkpoint(tmp_path, 7, state, fingerprint="f", keep=1)
    return path, state


def test_every_flipped_byte_is_detected_or_harmless(tmp_path):
    """Flip bytes of a small checkpoint (every 4th, and every byte of array data): verification
    reports damage, or the file still loads to exactly the saved arrays (a flip in a zip
    timestamp, say). Every flip of array data is detected."""
    path, state = _tiny_checkpoint(tmp_path)
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), state)
    original = path.read_bytes()
    want = [np.asarray(x).tobytes() for x in jax.tree.leaves(state)]
    data_bytes = set()
    for leaf in (state["params"]["a"], state["opt"][1]):
        start = original.find(leaf.tobytes())
        assert start > 0
        data_bytes |= set(range(start, start + leaf.nbytes))
    detected = set()
    for i in sorted(set(range(0, len(original), 4)) | data_bytes):
        data = bytearray(original)
        data[i] ^= 0xFF
        path.write_bytes(bytes(data))
        if _rundir.verify_checkpoint(path) is not None:
            detected.add(i)
            continue
        step, loaded = _rundir.load_checkpoint(path, template, fingerprint="f")
        assert step == 7 and [np.asarray(x).tobytes() for x in jax.tree.leaves(loaded)] == want, i
    assert data_bytes <= detected


def test_checkpoints_are_plain_npz_read_without_pickle(tmp_path):
    path, state = _tiny_checkpoint(tmp_path)
    with np.load(path, allow_pickle=False) as data:  # still an .npz NumPy reads
        assert sorted(data.files) == ["__meta__", "leaf_00000", "leaf_00001", "leaf_00002"]
        np.testing.assert_array_equal(data["leaf_00002"], state["params"]["a"])
    assert _rundir.verify_checkpoint(path) is None


def test_resume_verifies_each_phase_on_its_own(tmp_path):
    """Several phases (as tiny_lm has): each resumes from its own newest intact checkpoint."""
    cfg, out = _cfg(), tmp_path / "run"
    assert _rundir.prepare_run_dir(out, cfg, resume=False) is None
    fingerprint = _rundir.checkpoint_fingerprint(cfg)
    state = {"w": np.ones(3, np.float32)}
    for phase, steps in (("pretrain", (5, 10)), ("adapt", (1, 2))):
        for step in steps:
            _rundir.save_checkpoint(out / "checkpoints" / phase, step, state,
                                    fingerprint=fingerprint, keep=5)
    _empty(out / "checkpoints" / "pretrain" / "step_00000010.npz")
    with pytest.warns(_rundir.RunWarning, match=r"step_00000010\.npz' is damaged"):
        record = _rundir.prepare_run_dir(out, cfg, resume=True)
    assert record.from_steps == {"adapt": 2, "pretrain": 5} and record.changed == {}
    assert [p for p, _ in record.damaged] == [str(out / "checkpoints/pretrain/step_00000010.npz")]
    assert _ckpts(out, "pretrain") == ["step_00000005.npz"]


def test_resume_refuses_an_intact_checkpoint_of_another_config(tmp_path):
    cfg, out = _cfg(), tmp_path / "run"
    _rundir.prepare_run_dir(out, cfg, resume=False)
    _rundir.save_checkpoint(out / "checkpoints" / "adapt", 3, {"w": np.ones(2, np.float32)},
                            fingerprint="0123456789abcdef", keep=2)
    before = sorted(out.rglob("*"))
    with pytest.raises(finetune.RunError, match=r"step_00000003\.npz' was written by a different"):
        _rundir.prepare_run_dir(out, cfg, resume=True)
    assert sorted(out.rglob("*")) == before


# -- 3. changed optimizer settings on --resume -----------------------------------------------------


def test_resume_accepts_a_lower_learning_rate_and_records_it(capsys, stopped_copy):
    out = stopped_copy
    code, _, err = _main(capsys, "--out", str(out), "--resume",
                         "--set", "optim.learning_rate=0.001")
    assert code == 0, err
    assert "changed optimizer settings (optim.learning_rate: 0.01 -> 0.001) from adapt step 4" in err
    log = json.loads((out / "resume.jsonl").read_text().splitlines()[-1])
    assert log["from_steps"] == {"adapt": 4}
    assert log["changed"] == {"optim.learning_rate": {"before": 0.01, "after": 0.001}}
    saved = json.loads((out / "config.json").read_text())
    assert saved["config"]["optim"]["learning_rate"] == 0.001  # the config the run continues with
    assert finetune.load_config(out / "config.toml").optim.learning_rate == 0.001
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lr = {r["step"]: r["lr"] for r in records}
    assert lr[3] > 2e-3 and 0 < lr[4] < 1.1e-3  # the new rate takes effect at the resumed step
    # Resuming again with the same setting changes nothing more.
    code, _, err = _main(capsys, "--out", str(out), "--resume", "--set", "optim.learning_rate=0.001")
    assert code == 0 and "changed optimizer settings" not in err, err
    assert json.loads((out / "resume.jsonl").read_text().splitlines()[-1])["changed"] == {}


@pytest.mark.parametrize("override, words", [
    ("optim.optimizer=sgd", ["optim.optimizer 'adam' -> 'sgd'", "structure"]),
    ("optim.grad_clip=1.0", ["optim.grad_clip 0.0 -> 1.0", "clipping stage"]),
    ("train.batch_size=4", ["different config", "train.batch_size", "8", "4"]),
])
def test_resume_refuses_changes_the_checkpoints_cannot_follow(capsys, stopped_copy, override,
                                                               words):
    out = stopped_copy
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, _, err = _main(capsys, "--out", str(out), "--resume", "--set", override)
    assert code == 2 and err.startswith("jaxla: error: --resume") and "Traceback" not in err
    for w in words:
        assert w in err, (w, err)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def _state_structure(optim, **kw):
    params = {"w": jax.ShapeDtypeStruct((3, 2), jnp.float32)}
    return jax.tree_util.tree_structure(
        jax.eval_shape(_steps.make_optimizer(optim, steps=10, **kw)[0].init, params))


def test_structural_change_rules_match_the_optimizers():
    """The resume rules agree with the optimizer state make_optimizer actually builds."""
    alternatives = {"optimizer": ["adam", "adamw", "sgd"], "learning_rate": [1e-3, 0.5],
                    "schedule": ["constant", "cosine"], "warmup_steps": [0, 5],
                    "grad_clip": [0.0, 0.5, 2.0], "weight_decay": [0.0, 0.1]}
    assert set(alternatives) == {f.name for f in dataclasses.fields(finetune.OptimConfig)}
    base = finetune.OptimConfig()
    for optimizer in alternatives["optimizer"]:
        start = dataclasses.replace(base, optimizer=optimizer)
        for key, values in alternatives.items():
            for value in values:
                other = dataclasses.replace(start, **{key: value})
                same = _state_structure(start) == _state_structure(other)
                rule = _rundir.structural_change(f"optim.{key}", getattr(start, key), value)
                assert (rule is None) == same, (optimizer, key, value)
                if key != "optimizer":
                    assert f"optim.{key}" in _rundir.RESUME_ADJUSTABLE
    # tiny_lm's full-parameter phases take their learning rate as an argument: values only.
    assert _state_structure(base, learning_rate=1.0) == _state_structure(base)
    tiny = finetune.load_config("tiny_lm")
    assert {"tiny_lm.pretrain_learning_rate", "tiny_lm.full_ft_learning_rate"} < \
        _rundir.resume_adjustable(tiny)
    assert _rundir.resume_adjustable(finetune.Config()) == _rundir.RESUME_ADJUSTABLE


def test_nan_stop_before_a_checkpoint_then_resume_with_the_advised_rate(capsys, tmp_path):
    out = tmp_path / "run"
    blowup = ["--set", "optim.optimizer=sgd", "--set", "optim.learning_rate=1000",
              "--set", "optim.schedule=constant", "--set", "optim.warmup_steps=0",
              "--set", "run.checkpoint_every=100"]
    code, _, err = _main(capsys, *blowup, "--out", str(out))
    assert code == 3, err
    assert "no checkpoint had been written yet" in err
    advice = f"(--out {out}) with --resume --set optim.learning_rate=100:"
    assert advice in err, err
    code, _, err = _main(capsys, *blowup, "--out", str(out), "--resume",
                         "--set", "optim.learning_rate=0.01")
    assert code == 0, err
    assert "restarting the run from step 0" in err and "1000.0 -> 0.01" in err
    assert (out / "adapter.safetensors").is_file()


def test_nan_advice_names_the_phase_learning_rate(tmp_path):
    cfg = finetune.apply_overrides(finetune.load_config(None), ["run.demo=tiny_lm"])
    text = _rundir.nonfinite_advice(cfg, "pretrain", tmp_path)
    assert f"--set tiny_lm.pretrain_learning_rate={cfg.tiny_lm.pretrain_learning_rate / 10:.3g}" \
        in text
    assert "--set optim.learning_rate=0.001" in _rundir.nonfinite_advice(cfg, "adapt", tmp_path)


# -- 4. command line, full disk, out of memory -----------------------------------------------------


def test_empty_out_is_rejected(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for value in ("", "  "):
        code, _, err = _main(capsys, "--out", value)
        assert code == 2 and "names no directory" in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("n", ["0", "-3", "1025", "100000"])
def test_cpu_devices_out_of_range(capsys, tmp_path, monkeypatch, n):
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    code, _, err = _main(capsys, "--cpu-devices", n, "--out", str(tmp_path / "run"))
    assert code == 2 and f"--cpu-devices {n} is out of range: expected 1 to 1024" in err, err
    assert not (tmp_path / "run").exists()


def _fail_fsync_of(monkeypatch, fragment):
    """os.fsync raises ENOSPC for files whose name contains ``fragment`` (after their data was
    written to the temporary file, as a full disk does)."""
    real = os.fsync

    def fsync(fd):
        if fragment in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")


@needs_proc
def test_full_disk_at_a_checkpoint_exits_4_then_resumes(capsys, tmp_path, monkeypatch, reference):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _fail_fsync_of(m, ".step_00000001.npz.")
        code, _, err = _main(capsys, "--out", str(out))
    assert code == 4, err
    path = out / "checkpoints" / "adapt" / "step_00000001.npz"
    assert err.startswith(f"jaxla: error: cannot write {str(path)!r}: No space left on device")
    assert "ENOSPC" in err and "--resume" in err and "Traceback" not in err
    assert _leftovers(out) == [] and not _ckpts(out)  # no half-written file
    code, _, err = _main(capsys, "--out", str(out), "--resume")
    assert code == 0, err
    assert _adapter_bytes(out) == _adapter_bytes(reference)


@needs_proc
def test_full_disk_writing_the_config_leaves_nothing(capsys, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _fail_fsync_of(monkeypatch, ".config.json.")
    code, _, err = _main(capsys, "--out", str(out))
    assert code == 4 and "config.json" in err and "Nothing was written" in err, err
    assert not out.exists()


@needs_proc
def test_full_disk_writing_the_adapter_exits_4(capsys, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _fail_fsync_of(monkeypatch, ".adapter.safetensors.")
    code, _, err = _main(capsys, "--out", str(out))
    assert code == 4 and str(out) in err and "No space left on device" in err, err
    assert "Traceback" not in err and _leftovers(out) == []
    assert not (out / "adapter.safetensors").exists() and _ckpts(out)


def test_metrics_append_failure_leaves_no_torn_line(tmp_path, monkeypatch):
    log = _rundir.MetricsLog(tmp_path / "metrics.jsonl")
    log.append({"phase": "adapt", "step": 0, "loss": 1.0})
    real_open = open

    class Full:
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def write(self, data):
            self.f.write(data[:5])  # part of the line reaches the file, then the disk is full
            self.f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("builtins.open", lambda *a, **k: Full(real_open(*a, **k)))
    with pytest.raises(_rundir.RunWriteError, match=r"metrics\.jsonl.*No space left"):
        log.append({"phase": "adapt", "step": 1, "loss": 0.5})
    monkeypatch.undo()
    assert (tmp_path / "metrics.jsonl").read_text() == json.dumps(
        {"phase": "adapt", "step": 0, "loss": 1.0}) + "\n"


@pytest.mark.parametrize("error", [
    MemoryError("Unable to allocate 1.2 TiB for an array"),
    jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1288490188800 bytes."),
], ids=["MemoryError", "RESOURCE_EXHAUSTED"])
def test_out_of_memory_exits_5_with_advice(capsys, tmp_path, monkeypatch, error):
    def make_problem(*args, **kwargs):
        raise error

    monkeypatch.setattr(_lowrank, "make_problem", make_problem)
    code, _, err = _main(capsys, "--out", str(tmp_path / "run"))
    assert code == 5, err
    assert err.startswith("jaxla: error: out of memory while running the 'lowrank' demo")
    for key in ("train.batch_size", "lowrank.d_in", "lowrank.d_out", "--set train.batch_size=2"):
        assert key in err, (key, err)
    assert "Traceback" not in err


def test_other_runtime_errors_are_not_disguised(capsys, tmp_path, monkeypatch):
    def make_problem(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    monkeypatch.setattr(_lowrank, "make_problem", make_problem)
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        cli.main(["finetune", *SETS, "--no-progress", "--out", str(tmp_path / "run")])
