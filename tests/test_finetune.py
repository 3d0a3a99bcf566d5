"""Fine-tune runs: smoke runs, exact resume, NaN stop, interrupts, multi-device trajectories."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxla import cli, finetune, lora
from jaxla.finetune import _mesh, _rundir, _runner

ROOT = Path(__file__).resolve().parent.parent

# Every run of this config compiles the same programs; the module shares one uninterrupted run.
TINY_LOWRANK = [
    "lowrank.d_in=16", "lowrank.d_out=32", "lowrank.true_rank=2", "lora.rank=2",
    "train.batch_size=8", "train.steps=24", "optim.warmup_steps=2", "run.checkpoint_every=1",
    "lowrank.eval_examples=16", "run.plots=false", "run.fast_compile=true",
]
STEPS = 24


def _cfg(*extra, base=None):
    cfg = finetune.load_config(base)
    return finetune.apply_overrides(cfg, [*TINY_LOWRANK, *extra])


def _run(cfg, out, **kw):
    return finetune.run_finetune(cfg, out=out, progress=False, echo=lambda s: None, **kw)


def _adapter_arrays(out):
    adapters, _ = lora.load(out / "adapter.safetensors")
    return {k: (np.asarray(v.a), np.asarray(v.b)) for k, v in adapters.items()}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    return out, _run(_cfg(), out)


def test_lowrank_smoke(full_run):
    out, summary = full_run
    assert not summary["interrupted"]
    m = summary["metrics"]
    assert m["steps"] == STEPS and m["trainable_params"] == 2 * (16 + 32)
    assert m["frozen_params"] == 16 * 32
    assert math.isfinite(m["final_train_loss"]) and math.isfinite(m["relative_error"])
    assert len(m["singular_values_learned"]) == 2
    assert all(0 <= a <= 90 for a in m["principal_angles_deg"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(STEPS))
    assert {"loss", "lr", "grad_norm", "examples_per_s", "phase"} <= set(records[0])
    assert records[-1]["loss"] < records[0]["loss"]
    saved = json.loads((out / "summary.json").read_text())
    assert saved["metrics"]["steps"] == STEPS
    assert finetune.load_config(out / "config.toml") == _cfg()
    assert sorted(p.name for p in (out / "checkpoints" / "adapt").iterdir()) == [
        f"step_{STEPS - 1:08d}.npz", f"step_{STEPS:08d}.npz"]  # keep_checkpoints = 2
    assert not list(out.rglob("*.tmp"))
    text = finetune.format_summary(summary)
    assert "trainable params" in text and "‖ΔW − ΔW*‖/‖ΔW*‖" in text


def test_default_demo_learns_the_update(tmp_path):
    """Scaled-down default demo: the learned update matches ΔW* in value, subspace and spectrum."""
    cfg = finetune.apply_overrides(finetune.Config(), [
        "lowrank.d_in=48", "lowrank.d_out=96", "lowrank.true_rank=3", "lora.rank=3",
        "train.steps=200", "train.batch_size=32", "optim.learning_rate=0.03", "run.plots=false",
        "run.fast_compile=true",
        "lowrank.eval_examples=64"])
    m = _run(cfg, tmp_path / "run")["metrics"]
    assert m["relative_error"] < 0.05, m
    assert max(m["principal_angles_deg"]) < 3.0
    np.testing.assert_allclose(m["singular_values_learned"], m["singular_values_true"], rtol=0.05)


def _assert_same_adapter(out_a, out_b):
    a, b = _adapter_arrays(out_a), _adapter_arrays(out_b)
    assert a.keys() == b.keys()
    for k in a:
        for x, y in zip(a[k], b[k], strict=True):
            assert x.tobytes() == y.tobytes()


def test_ctrl_c_saves_then_resume_is_bitwise(full_run, tmp_path, capsys):
    out = tmp_path / "run"
    original = _runner._Progress.update

    def update(self, step, m):  # Ctrl-C arrives while step 4 runs
        original(self, step, m)
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)

    _runner._Progress.update = update
    try:
        summary = _run(_cfg(), out)
    finally:
        _runner._Progress.update = original
    assert summary["interrupted"] and not (out / "adapter.safetensors").exists()
    assert _rundir.latest_checkpoint(out / "checkpoints" / "adapt").name == "step_00000005.npz"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # Operational keys may change between the two halves; this half shows the tqdm bar.
    summary = finetune.run_finetune(_cfg("run.log_every=1", "run.checkpoint_every=7"), out=out,
                                    resume=True, progress=True, echo=lambda s: None)
    assert "adapt" in capsys.readouterr().err  # tqdm writes its bar to stderr
    assert not summary["interrupted"] and summary["metrics"]["steps"] == STEPS
    _assert_same_adapter(full_run[0], out)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(STEPS))


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    args = [a for s in TINY_LOWRANK for a in ("--set", s)]
    code = cli.main(["finetune", *args, "--no-progress", "--out", str(out),
                     "--set", "optim.optimizer=sgd", "--set", "optim.learning_rate=40",
                     "--set", "optim.schedule=constant", "--set", "optim.warmup_steps=0",
                     "--set", "train.steps=60", "--set", "run.keep_checkpoints=100"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 3, err
    assert "became inf" in err or "became nan" in err, err
    assert "last good checkpoint" in err and "Traceback" not in err
    ckpts = sorted((out / "checkpoints" / "adapt").glob("step_*.npz"))
    assert ckpts
    # Every kept checkpoint is finite (the state whose loss blew up was never written).
    for path in ckpts:
        with np.load(path) as data:
            assert all(np.isfinite(data[k]).all() for k in data.files if k.startswith("leaf_"))
    assert not (out / "adapter.safetensors").exists()


def _loss_trajectory(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_mesh_matches_single_device(full_run, tmp_path):
    assert jax.device_count() >= 8, "conftest simulates 8 CPU devices"
    meshed_cfg = _cfg(base=ROOT / "configs" / "lowrank_mesh.toml")
    assert (meshed_cfg.mesh.data, meshed_cfg.mesh.model) == (4, 2)
    meshed = _run(meshed_cfg, tmp_path / "mesh")
    np.testing.assert_allclose(
        _loss_trajectory(tmp_path / "mesh"), _loss_trajectory(full_run[0]), rtol=1e-4)
    np.testing.assert_allclose(
        meshed["metrics"]["singular_values_learned"],
        full_run[1]["metrics"]["singular_values_learned"], rtol=1e-4)


def test_mesh_shards_by_path_rule():
    from jax.sharding import PartitionSpec as P

    mesh = _mesh.make_mesh(finetune.MeshConfig(data=4, model=2))
    tree = {"base": {"w": np.zeros((16, 32))}, "ad": {"w": lora.Adapter(np.zeros((2, 16)),
                                                                         np.zeros((32, 2)), 2.0)},
            "norm": {"b": np.zeros(32)}, "odd": {"w": np.zeros((4, 5))},
            # Stacked layers: kernels (L, d_in, d_out) and biases (L, d_out). The old rule took any
            # rank-2 leaf named "b" for a LoRA b and split the bias along its layer axis.
            "stack": {"w": np.zeros((4, 16, 32)), "b": np.zeros((4, 32))},
            "stack_ad": {"stack/w": lora.Adapter(np.zeros((4, 2, 16)), np.zeros((4, 32, 2)), 2.0)}}
    specs = jax.tree.map(lambda s: s.spec, _mesh.tree_shardings(tree, mesh))
    assert specs["base"]["w"] == P(None, "model")
    assert specs["ad"]["w"].a == P(None, None)
    assert specs["ad"]["w"].b == P("model", None)
    assert specs["norm"]["b"] == P(None)
    assert specs["odd"]["w"] == P(None, None)  # 5 is not divisible by the model axis
    assert specs["stack"]["w"] == P(None, None, "model")
    assert specs["stack"]["b"] == P(None, None)
    assert specs["stack_ad"]["stack/w"].b == P(None, "model", None)
    assert specs["stack_ad"]["stack/w"].a == P(None, None, None)


def test_optimizer_state_follows_its_parameter():
    import optax
    from jax.sharding import PartitionSpec as P

    mesh = _mesh.make_mesh(finetune.MeshConfig(data=1, model=2))
    params = {"layers": {"w": np.zeros((3, 8, 6), np.float32), "b": np.zeros((3, 6), np.float32)}}
    state = optax.adam(0.1).init(params)
    specs = jax.tree.map(lambda s: s.spec, _mesh.tree_shardings(state, mesh))
    assert specs[0].mu["layers"]["w"] == P(None, None, "model")
    assert specs[0].nu["layers"]["b"] == P(None, None)
    assert specs[0].count == P()


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise(full_run, tmp_path):
    """A real SIGKILL at an arbitrary moment after the first checkpoint, then --resume."""
    args = ["finetune", "--no-progress", *[a for s in TINY_LOWRANK for a in ("--set", s)]]
    # The environment (conftest's XLA_FLAGS) carries over, so the subprocess compiles the same
    # program as the in-process full run.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "jaxla"]
    part = tmp_path / "part"
    proc = subprocess.Popen([*cmd, *args, "--out", str(part)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = part / "checkpoints" / "adapt"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpts.is_dir() and any(ckpts.glob("step_*.npz")):
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run([*cmd, *args, "--out", str(part), "--resume"], env=env,
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_adapter(full_run[0], part)
