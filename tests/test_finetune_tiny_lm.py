"""The tiny-LM demo: model pieces, KV-cache decoding, phases, resume across phases, mesh variant."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxla import finetune, lora
from jaxla.finetune import _transformer as tfm

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "tiny_lm.n_layers=1", "tiny_lm.d_model=16", "tiny_lm.n_heads=2", "tiny_lm.d_ff=32",
    "tiny_lm.length=3", "tiny_lm.pretrain_steps=3", "train.steps=3", "train.batch_size=8",
    "tiny_lm.eval_examples=8", "tiny_lm.generations=2", "run.plots=false", "lora.rank=2",
    "run.fast_compile=true",
]
# Optimisation level 0: these toy programs compile several times faster.
FAST = {"compiler_options": {"xla_backend_optimization_level": 0}}


def _init(seed, **arch):
    # Jitted: eagerly, every small op of the initialisers would compile on its own.
    return jax.jit(lambda k: tfm.init(k, **arch), **FAST)(jax.random.key(seed))


def _cfg(name, *extra):
    return finetune.apply_overrides(finetune.load_config(ROOT / "configs" / name), [*TINY, *extra])


def _run(cfg, out, **kw):
    return finetune.run_finetune(cfg, out=out, progress=False, echo=lambda s: None, **kw)


@pytest.mark.parametrize("task", ["copy", "reverse", "sort", "shift"])
def test_tasks(task):
    make = jax.jit(lambda k: tfm.make_sequences(k, task, batch=4, length=5, digits=7), **FAST)
    seqs = np.asarray(make(jax.random.key(0)))
    x, sep, y = seqs[:, :5], seqs[:, 5], seqs[:, 6:]
    assert seqs.dtype == np.int32 and (sep == 7).all() and ((x >= 0) & (x < 7)).all()
    np.testing.assert_array_equal(y, tfm.task_answer(x, task, 7))
    expected = {"copy": x, "reverse": x[:, ::-1], "sort": np.sort(x, 1), "shift": (x + 1) % 7}
    np.testing.assert_array_equal(y, expected[task])


def test_kv_cache_decoding_matches_full_forward():
    n_heads, length = 2, 3
    params = _init(1, vocab=6, d_model=16, n_heads=n_heads, n_layers=1, d_ff=32)
    prompts = jnp.asarray(np.random.default_rng(2).integers(0, 6, (3, 5)), jnp.int32)

    generated = jax.jit(lambda p, x: tfm.decode_greedy(p, x, length, n_heads=n_heads), **FAST)(
        params, prompts)
    assert generated.shape == (3, length) and generated.dtype == jnp.int32
    # Without a cache: one causal forward over prompt + generated tokens must predict each
    # generated token greedily from the tokens before it.
    seq = jnp.concatenate([prompts, generated], axis=1)
    logits = jax.jit(lambda p, t: tfm.apply(p, t, n_heads=n_heads), **FAST)(params, seq)
    p = prompts.shape[1]
    np.testing.assert_array_equal(jnp.argmax(logits[:, p - 1:-1], axis=-1), generated)


def test_model_is_causal():
    params = _init(3, vocab=6, d_model=16, n_heads=2, n_layers=1, d_ff=32)
    a = jnp.array([[1, 2, 3, 4]], jnp.int32)
    b = jnp.array([[1, 2, 5, 0]], jnp.int32)
    apply = jax.jit(lambda p, t: tfm.apply(p, t, n_heads=2), **FAST)
    la, lb = apply(params, a), apply(params, b)
    assert la.shape == (1, 4, 6) and la.dtype == jnp.float32
    np.testing.assert_allclose(la[:, :2], lb[:, :2], rtol=1e-6, atol=1e-6)
    assert not np.allclose(la[:, 2:], lb[:, 2:])


def test_tiny_lm_phases_resume_and_report(tmp_path):
    cfg = _cfg("tiny_lm.toml")
    out = tmp_path / "run"
    # Stop inside the adapt phase (3 pretrain steps + 1), then resume through the remaining phases.
    first = _run(cfg, out, stop_after=4)
    assert first["interrupted"]
    assert (out / "checkpoints" / "pretrain" / "step_00000003.npz").is_file()
    assert (out / "checkpoints" / "adapt" / "step_00000001.npz").is_file()
    summary = _run(cfg, out, resume=True)
    assert not summary["interrupted"]
    m = summary["metrics"]
    assert set(m["phases"]) == {"pretrain", "adapt", "full_ft"}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    seen = [(r["phase"], r["step"]) for r in records]
    assert all(r["tokens_per_s"] > 0 for r in records)
    assert seen == [(p, s) for p in ("pretrain", "adapt", "full_ft") for s in range(3)]
    for model in ("base", "LoRA-adapted", "full fine-tune"):
        for task in ("copy", "reverse"):
            acc = m["accuracy"][f"{model}/{task}"]
            assert 0 <= acc["exact"] <= acc["token"] <= 1
    assert len(m["generations"]) == 2 and "→" in m["generations"][0]
    adapters, _ = lora.load(out / "adapter.safetensors")
    assert sorted(adapters) == [f"layers/0/{p}/w" for p in
                                ("attn/k", "attn/o", "attn/q", "attn/v", "mlp/down", "mlp/up")]
    assert m["trainable_params"] == sum(a.a.size + a.b.size for a in adapters.values())
    assert 0 < m["trainable_fraction"] < 1
    text = finetune.format_summary(summary)
    assert "LoRA-adapted on reverse (adapt task)" in text and "generation 1 (KV cache)" in text


def test_tiny_lm_mesh_variant(tmp_path):
    cfg = _cfg("tiny_lm_mesh.toml", "tiny_lm.full_ft_baseline=false", "tiny_lm.generations=0")
    assert (cfg.mesh.data, cfg.mesh.model) == (4, 2)
    summary = _run(cfg, tmp_path / "run")
    m = summary["metrics"]
    assert set(m["phases"]) == {"pretrain", "adapt"}
    assert all(np.isfinite(p["final_loss"]) for p in m["phases"].values())
    assert "mesh 4×2" in summary["title"]
