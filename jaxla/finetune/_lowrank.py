"""The default demo: LoRA recovers a known low-rank update of a frozen matrix.

A frozen W ``(I, O)`` (default 768 × 3072) and a teacher ``W + ΔW*`` whose update ``ΔW* = U·diag(σ)·Vᵀ``
has rank ``true_rank`` and singular values spaced evenly from ``delta_scale`` down to half of it.
Each step draws ``x ~ N(0, 1)`` of shape ``(B, I)`` from ``fold_in(key, step)`` and regresses the
teacher's outputs ``x·(W + ΔW*)`` (plus optional noise) with ``jaxla.lora.linear(W, adapter, x)``.
Since ``E[xᵀx] = I``, the loss is ``‖ΔW − ΔW*‖²_F / O`` in expectation, so the adapter's update must
converge to ΔW* itself; the report checks exactly that: the relative error, the principal angles
between the learned and the true subspaces, and the singular values of the learned update.

Dimension legend: B batch, I ``d_in``, O ``d_out``, r LoRA rank, k ``true_rank``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxla import lora
from jaxla.finetune import _mesh, _plots, _rundir, _runner

__all__ = ["check", "low_rank_factors", "make_problem", "principal_angles", "run"]


def make_problem(seed: int, d_in: int, d_out: int, true_rank: int, delta_scale: float):
    """The frozen W ``(I, O)``, orthonormal U ``(I, k)``, V ``(O, k)`` and σ ``(k,)`` of ΔW*.

    Drawn with NumPy from ``seed``: a one-off setup that would otherwise compile a handful of tiny
    XLA programs (QR included) for nothing.
    """
    rng = np.random.default_rng([seed, 0x10AA])
    w = (rng.standard_normal((d_in, d_out)) / np.sqrt(d_in)).astype(np.float32)
    u, _ = np.linalg.qr(rng.standard_normal((d_in, true_rank)))
    v, _ = np.linalg.qr(rng.standard_normal((d_out, true_rank)))
    sigma = np.linspace(delta_scale, delta_scale / 2, true_rank)
    return w, u, v, sigma


def low_rank_factors(a: np.ndarray, b: np.ndarray, scale: float):
    """Thin SVD of ``ΔW = scale · aᵀ·bᵀ`` ``(I, O)`` from its factors, never forming ΔW.

    Args:
      a: ``(r, I)``; b: ``(O, r)``; scale: the adapter's scale.

    Returns:
      ``(left (I, r), sigma (r,), right (O, r))`` in float64, σ descending.
    """
    qa, ra = np.linalg.qr(np.asarray(a, np.float64).T)
    qb, rb = np.linalg.qr(np.asarray(b, np.float64))
    uc, s, vct = np.linalg.svd(scale * ra @ rb.T)
    return qa @ uc, s, qb @ vct.T


def principal_angles(q1: np.ndarray, q2: np.ndarray) -> np.ndarray:
    """Principal angles (radians, ascending) between the spans of orthonormal ``q1``, ``q2``."""
    cos = np.linalg.svd(q1.T @ q2, compute_uv=False)
    return np.arccos(np.clip(cos, -1.0, 1.0))


def _relative_error(left, s, right, u, sigma, v) -> float:
    """``‖ΔW − ΔW*‖_F / ‖ΔW*‖_F`` from both factorisations (Gram matrices, no (I, O) array)."""
    a1, a2 = left * s, u * sigma

    def inner(x1, y1, x2, y2):  # <x1·y1ᵀ, x2·y2ᵀ>_F
        return float(np.sum((x1.T @ x2) * (y1.T @ y2)))

    sq = inner(a1, right, a1, right) - 2 * inner(a1, right, a2, v) + inner(a2, v, a2, v)
    return float(np.sqrt(max(sq, 0.0)) / np.linalg.norm(sigma))


def check(cfg) -> None:
    """Fails early (ConfigError) when ``lora.targets`` do not select W."""
    from jaxla.finetune._api import check_lora_targets

    lc = cfg.lowrank
    w = jax.ShapeDtypeStruct((lc.d_in, lc.d_out), jnp.float32)
    check_lora_targets(lambda: lora.init(jax.random.key(0), {"w": w}, rank=cfg.lora.rank,
                                         alpha=cfg.lora.alpha, targets=list(cfg.lora.targets)),
                       cfg.lora.targets)


def run(ctx: _runner.RunContext) -> dict[str, Any]:
    """Trains the adapter (resuming when asked), evaluates it and writes the adapter and plots.

    Returns:
      The summary: ``{"title", "rows": [(label, value)], "metrics": {...}, "interrupted"}``.
    """
    cfg = ctx.config
    lc, bsz = cfg.lowrank, cfg.train.batch_size
    mesh = _mesh.make_mesh(cfg.mesh)
    w, u64, v64, sig64 = make_problem(cfg.run.seed, lc.d_in, lc.d_out, lc.true_rank, lc.delta_scale)
    teacher = (w + (u64 * sig64) @ v64.T).astype(np.float32)
    params = {"w": w}
    optimizer, schedule = _runner.make_optimizer(cfg.optim, steps=cfg.train.steps)

    # One compiled program instead of a dozen eager ones.
    def init_state(params):
        adapters = lora.init(
            _runner.stream_key(cfg.run.seed, "adapter"), params, rank=cfg.lora.rank,
            alpha=cfg.lora.alpha, targets=list(cfg.lora.targets), init=cfg.lora.init,
        )
        return {"params": adapters, "opt": optimizer.init(adapters)}

    frozen = {"base": params, "teacher": {"w": teacher}}
    frozen = jax.device_put(frozen, _mesh.tree_shardings(frozen, mesh))

    def batch_fn(frozen, step):
        kx, kn = jax.random.split(jax.random.fold_in(_runner.stream_key(cfg.run.seed, "data"), step))
        x = _mesh.constrain_batch(jax.random.normal(kx, (bsz, lc.d_in), jnp.float32), mesh)
        y = x @ frozen["teacher"]["w"]
        if lc.noise:
            y = y + jnp.float32(lc.noise) * jax.random.normal(kn, y.shape, jnp.float32)
        return x, y

    def loss_fn(adapters, frozen, batch):
        x, y = batch
        pred = lora.linear(frozen["base"], adapters["w"], x)
        return jnp.mean(jnp.square(pred - y))

    step_fn = _runner.make_step(loss_fn, optimizer, schedule, batch_fn)
    res = _runner.train_phase(
        ctx, phase="adapt", init_state=init_state, init_args=(params,), frozen=frozen,
        step_fn=step_fn, steps=cfg.train.steps, items_per_step=bsz, mesh=mesh,
    )
    title = (f"lowrank: frozen W {lc.d_in}×{lc.d_out}, ΔW* of rank {lc.true_rank}, "
             f"mesh {cfg.mesh.data}×{cfg.mesh.model}")
    if res.interrupted:
        return _runner.interrupted_summary(ctx, title, res)
    adapters = _rundir.to_host(res.state["params"])
    eval_loss = float(ctx.jit(_eval_loss(loss_fn, lc, cfg.run.seed))(adapters, frozen))
    adapter = adapters["w"]
    left, s_learned, right = low_rank_factors(adapter.a, adapter.b, adapter.scale)
    k = min(lc.true_rank, cfg.lora.rank)
    angles = np.degrees(principal_angles(left[:, :k], u64))
    angles_right = np.degrees(principal_angles(right[:, :k], v64))
    rel_err = _relative_error(left, s_learned, right, u64, sig64, v64)
    count = lora.count_params(params, adapters)

    lora.save(ctx.out / "adapter.safetensors", adapters, config={"demo": "lowrank"})
    records = ctx.metrics.records()
    plots = []
    if cfg.run.plots:
        plots = _plots.write_plots(ctx.out, records, {"learned ΔW": s_learned, "true ΔW*": sig64})

    def fmt(xs):
        return " ".join(f"{x:.3f}" for x in xs)

    metrics = {
        "final_train_loss": res.last_loss,
        "held_out_loss": eval_loss,
        "relative_error": rel_err,
        "principal_angles_deg": angles.tolist(),
        "principal_angles_right_deg": angles_right.tolist(),
        "singular_values_learned": s_learned.tolist(),
        "singular_values_true": sig64.tolist(),
        "trainable_params": count.trainable,
        "frozen_params": count.frozen,
        "steps": res.end_step,
        "compile_s": res.compile_s,
        "run_s": res.run_s,
        "steps_per_s": res.steps_per_s,
    }
    rows = [
        ("trainable params", f"{count.trainable:,} (LoRA r={cfg.lora.rank}) vs W {count.frozen:,} "
                             f"({100 * count.trainable / count.frozen:.2f}%)"),
        ("steps", f"{res.end_step}/{cfg.train.steps}"),
        ("final train loss", f"{res.last_loss:.4e}"),
        ("held-out loss", f"{eval_loss:.4e}"),
        ("‖ΔW − ΔW*‖/‖ΔW*‖", f"{rel_err:.4e}"),
        ("principal angles (deg)", f"max {angles.max():.3f}, mean {angles.mean():.3f} (inputs); "
                                   f"max {angles_right.max():.3f} (outputs)"),
        ("σ(ΔW) learned", fmt(s_learned)),
        ("σ(ΔW*) true", fmt(sig64)),
        ("time", f"compile {res.compile_s:.2f} s, run {res.run_s:.2f} s "
                 f"({res.steps_per_s:.1f} steps/s)"),
        ("outputs", f"{ctx.out} (adapter.safetensors, metrics.jsonl"
                    + (", " + ", ".join(plots) if plots else "") + ")"),
    ]
    return {"title": title, "rows": rows, "metrics": metrics, "interrupted": res.interrupted}


def _eval_loss(loss_fn, lc, seed):
    """Held-out loss on fresh inputs from a key the training stream never uses."""

    def fn(adapters, frozen):
        x = jax.random.normal(_runner.stream_key(seed, "eval"), (lc.eval_examples, lc.d_in), jnp.float32)
        return loss_fn(adapters, frozen, (x, x @ frozen["teacher"]["w"]))

    return fn
