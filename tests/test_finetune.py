"""Fine-tune runs: smoke runs, exact resume, NaN stop, interrupts, multi-device trajectories."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxla import finetune, lora
from jaxla.finetune import _lowrank, _rundir

ROOT = Path(__file__).resolve().parent.parent

TINY_LOWRANK = [
    "lowrank.d_in=16", "lowrank.d_out=32", "lowrank.true_rank=2", "lora.rank=2",
    "train.batch_size=8", "train.steps=6", "optim.warmup_steps=2", "run.checkpoint_every=2",
    "lowrank.eval_examples=16", "run.plots=false",
]


def _cfg(*extra, base=None):
    cfg = finetune.load_config(base)
    return finetune.apply_overrides(cfg, [*TINY_LOWRANK, *extra])


def _run(cfg, out, **kw):
    return finetune.run_finetune(cfg, out=out, progress=False, echo=lambda s: None, **kw)


def _adapter_arrays(out):
    adapters, _ = lora.load(out / "adapter.safetensors")
    return {k: (np.asarray(v.a), np.asarray(v.b)) for k, v in adapters.items()}


def test_lowrank_smoke(tmp_path):
    out = tmp_path / "run"
    summary = _run(_cfg(), out)
    assert not summary["interrupted"]
    m = summary["metrics"]
    assert m["steps"] == 6 and m["trainable_params"] == 2 * (16 + 32)
    assert m["frozen_params"] == 16 * 32
    assert math.isfinite(m["final_train_loss"]) and math.isfinite(m["relative_error"])
    assert len(m["singular_values_learned"]) == 2
    assert all(0 <= a <= 90 for a in m["principal_angles_deg"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(6))
    assert {"loss", "lr", "grad_norm", "rate", "phase"} <= set(records[0])
    saved = json.loads((out / "summary.json").read_text())
    assert saved["metrics"]["steps"] == 6
    assert finetune.load_config(out / "config.toml") == _cfg()
    assert sorted(p.name for p in (out / "checkpoints" / "adapt").iterdir()) == [
        "step_00000004.npz", "step_00000006.npz"]  # keep_checkpoints = 2
    text = finetune.format_summary(summary)
    assert "trainable params" in text and "‖ΔW − ΔW*‖/‖ΔW*‖" in text


def test_default_demo_learns_the_update(tmp_path):
    """Scaled-down default demo: the learned update matches ΔW* in value, subspace and spectrum."""
    cfg = finetune.apply_overrides(finetune.Config(), [
        "lowrank.d_in=48", "lowrank.d_out=96", "lowrank.true_rank=3", "lora.rank=3",
        "train.steps=250", "train.batch_size=32", "optim.learning_rate=0.03", "run.plots=false",
        "lowrank.eval_examples=64"])
    m = _run(cfg, tmp_path / "run")["metrics"]
    assert m["relative_error"] < 0.05, m
    assert max(m["principal_angles_deg"]) < 3.0
    np.testing.assert_allclose(m["singular_values_learned"], m["singular_values_true"], rtol=0.05)


def test_resume_is_bitwise(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    _run(_cfg(), full)
    first = _run(_cfg(), part, stop_after=3)
    assert first["interrupted"] and not (part / "adapter.safetensors").exists()
    # Operational keys may change between the two halves.
    _run(_cfg("run.log_every=1"), part, resume=True)
    a, b = _adapter_arrays(full), _adapter_arrays(part)
    assert a.keys() == b.keys()
    for k in a:
        for x, y in zip(a[k], b[k], strict=True):
            assert x.tobytes() == y.tobytes()
    steps = [json.loads(line)["step"] for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(6))


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    cfg = _cfg("optim.optimizer=sgd", "optim.learning_rate=40", "optim.schedule=constant",
               "optim.warmup_steps=0", "train.steps=60", "run.checkpoint_every=1",
               "run.keep_checkpoints=100")
    with pytest.raises(finetune.NonFiniteLossError, match="last good checkpoint") as info:
        _run(cfg, out)
    assert "step" in str(info.value)
    ckpts = sorted((out / "checkpoints" / "adapt").glob("step_*.npz"))
    assert ckpts
    # Every kept checkpoint is finite (the state whose loss blew up was never written).
    for path in ckpts:
        with np.load(path) as data:
            assert all(np.isfinite(data[k]).all() for k in data.files if k.startswith("leaf_"))
    assert not (out / "adapter.safetensors").exists()


def test_interrupt_saves_and_resumes(tmp_path):
    out = tmp_path / "run"
    cfg = _cfg()
    echo = []

    def interrupting_echo(line):
        echo.append(line)

    # Simulate Ctrl-C arriving during step 2: the handler only sets a flag the loop checks.
    from jaxla.finetune import _runner

    original = _runner._Progress.update

    def update(self, step, m):
        original(self, step, m)
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)

    _runner._Progress.update = update
    try:
        summary = finetune.run_finetune(cfg, out=out, progress=False, echo=interrupting_echo)
    finally:
        _runner._Progress.update = original
    assert summary["interrupted"]
    assert _rundir.latest_checkpoint(out / "checkpoints" / "adapt").name == "step_00000002.npz"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    summary = _run(cfg, out, resume=True)
    assert not summary["interrupted"] and summary["metrics"]["steps"] == 6


def _loss_trajectory(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_mesh_matches_single_device(tmp_path):
    assert jax.device_count() >= 8, "conftest simulates 8 CPU devices"
    single = _run(_cfg(), tmp_path / "one")
    meshed_cfg = _cfg("mesh.data=4", "mesh.model=2", base=ROOT / "configs" / "lowrank_mesh.toml")
    meshed = _run(meshed_cfg, tmp_path / "mesh")
    np.testing.assert_allclose(
        _loss_trajectory(tmp_path / "mesh"), _loss_trajectory(tmp_path / "one"), rtol=1e-4)
    np.testing.assert_allclose(
        meshed["metrics"]["singular_values_learned"], single["metrics"]["singular_values_learned"],
        rtol=1e-4)


def test_mesh_shards_by_rule():
    from jax.sharding import PartitionSpec as P

    from jaxla.finetune import _mesh

    mesh = _mesh.make_mesh(finetune.MeshConfig(data=4, model=2))
    tree = {"base": {"w": np.zeros((16, 32))}, "ad": {"w": lora.Adapter(np.zeros((2, 16)),
                                                                         np.zeros((32, 2)), 2.0)},
            "norm": {"b": np.zeros(32)}, "odd": {"w": np.zeros((4, 5))}}
    specs = jax.tree.map(lambda s: s.spec, _mesh.tree_shardings(tree, mesh))
    assert specs["base"]["w"] == P(None, "model")
    assert specs["ad"]["w"].a == P(None, None)
    assert specs["ad"]["w"].b == P("model", None)
    assert specs["norm"]["b"] == P(None)
    assert specs["odd"]["w"] == P(None, None)  # 5 is not divisible by the model axis


def test_low_rank_helpers_match_dense(rng):
    a, b = rng.standard_normal((3, 7)), rng.standard_normal((9, 3))
    left, s, right = _lowrank.low_rank_factors(a, b, 0.5)
    dense = 0.5 * a.T @ b.T
    np.testing.assert_allclose((left * s) @ right.T, dense, atol=1e-12)
    np.testing.assert_allclose(s, np.linalg.svd(dense, compute_uv=False)[:3], rtol=1e-12)
    q, _ = np.linalg.qr(rng.standard_normal((7, 2)))
    rot = np.array([[np.cos(0.3), -np.sin(0.3)], [np.sin(0.3), np.cos(0.3)]])
    np.testing.assert_allclose(_lowrank.principal_angles(q, q @ rot), [0, 0], atol=1e-7)
    e = np.eye(7)
    np.testing.assert_allclose(
        _lowrank.principal_angles(e[:, :1], (e[:, :1] + e[:, 1:2]) / np.sqrt(2)), [np.pi / 4])


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise(tmp_path):
    """A real SIGKILL at an arbitrary moment after the first checkpoint, then --resume."""
    args = ["finetune", "--no-progress", *[a for s in TINY_LOWRANK for a in ("--set", s)],
            "--set", "train.steps=40", "--set", "run.checkpoint_every=1"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "jaxla"]
    full = subprocess.run([*cmd, *args, "--out", str(tmp_path / "full")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert full.returncode == 0, full.stderr
    part = tmp_path / "part"
    proc = subprocess.Popen([*cmd, *args, "--out", str(part)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = part / "checkpoints" / "adapt"
    import time

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpts.is_dir() and any(ckpts.glob("step_*.npz")):
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run([*cmd, *args, "--out", str(part), "--resume"], env=env,
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    a, b = _adapter_arrays(tmp_path / "full"), _adapter_arrays(part)
    for k in a:
        for x, y in zip(a[k], b[k], strict=True):
            assert x.tobytes() == y.tobytes()
