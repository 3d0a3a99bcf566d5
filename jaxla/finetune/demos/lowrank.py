"""The default demo ``lowrank``: LoRA recovers a known low-rank update of a frozen matrix.

A frozen W ``(I, O)`` (default 768 × 3072) and a teacher ``W + ΔW*`` whose update ``ΔW* = U·diag(σ)·Vᵀ``
has rank ``true_rank`` and singular values spaced evenly from ``delta_scale`` down to half of it.
Each step draws ``x ~ N(0, 1)`` of shape ``(B, I)`` from ``fold_in(key, step)`` and regresses the
teacher's outputs ``x·(W + ΔW*)`` (plus optional noise) with ``jaxla.lora.linear(W, adapter, x)``.
Since ``E[xᵀx] = I``, the loss is ``‖ΔW − ΔW*‖²_F / O`` in expectation, so the adapter's update must
converge to ΔW* itself; the report (:func:`jaxla.spectral.adapter_report` with ΔW* as the reference)
checks exactly that: the relative error, the principal angles between the learned and the true
subspaces, and the singular values of the learned update.

Dimension legend: B batch, I ``d_in``, O ``d_out``, r LoRA rank, k ``true_rank``, E eval examples.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxla import lora, spectral
from jaxla.finetune import _checkpoints, _mesh, _runner, _steps
from jaxla.finetune._config import NONNEG, POS
from jaxla.finetune._demo import Demo, MemoryTerm
from jaxla.finetune._errors import ConfigError
from jaxla.finetune.demos import _spectral

__all__ = ["DEMO", "LowRankConfig", "make_problem"]


@dataclass(frozen=True)
class LowRankConfig:
    """The ``[lowrank]`` section: recover a known low-rank update ΔW* of a frozen (d_in, d_out) W."""

    d_in: int = field(default=768, metadata=POS)
    d_out: int = field(default=3072, metadata=POS)
    true_rank: int = field(default=8, metadata=POS)
    delta_scale: float = field(default=2.0, metadata=POS)
    noise: float = field(default=0.0, metadata=NONNEG)
    eval_examples: int = field(default=1024, metadata=POS)


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


def validate(cfg) -> None:
    """Ranks that cannot fit the matrix (ConfigError)."""
    lc = cfg.lowrank
    limit = min(lc.d_in, lc.d_out)
    for key, value in (("lora.rank", cfg.lora.rank), ("lowrank.true_rank", lc.true_rank)):
        if value > limit:
            raise ConfigError(
                f"config key {key} = {value} is too large: expected at most "
                f"min(lowrank.d_in, lowrank.d_out) = {limit}."
            )


def preflight(cfg) -> None:
    """Fails early (ConfigError) when ``lora.targets`` do not select W."""
    lc = cfg.lowrank
    w = jax.ShapeDtypeStruct((lc.d_in, lc.d_out), jnp.float32)
    _steps.check_lora_targets(
        lambda: lora.init(jax.random.key(0), {"w": w}, rank=cfg.lora.rank, alpha=cfg.lora.alpha,
                          targets=list(cfg.lora.targets)),
        cfg.lora.targets)


def memory(cfg) -> list[MemoryTerm]:
    """Rough upper estimate of the bytes a run needs.

    W and the teacher, per entry: the float64 draw of W and its scaled temporary (16 bytes), the
    float64 ΔW* and teacher temporaries (16), float32 host and device copies of W and the teacher
    (16): 48 bytes, more than the peak since not all live at once. One step: the
    batch x ``(B, I)``, and targets, predictions and residuals ``(B, O)`` with their gradients
    (4 bytes, ×2 for the backward pass). The held-out evaluation the same for E examples. Adapters
    with gradients and two Adam moments are ``4 · 4 · r(I + O)`` bytes.
    """
    lc, b, r = cfg.lowrank, cfg.train.batch_size, cfg.lora.rank
    io = lc.d_in * lc.d_out
    return [
        MemoryTerm("the frozen and teacher matrices", 48 * io, ("lowrank.d_in", "lowrank.d_out")),
        MemoryTerm("one step's activations", 8 * b * (lc.d_in + 4 * lc.d_out),
                   ("train.batch_size", "lowrank.d_in", "lowrank.d_out")),
        MemoryTerm("the held-out evaluation", 8 * lc.eval_examples * (lc.d_in + 4 * lc.d_out),
                   ("lowrank.eval_examples", "lowrank.d_in", "lowrank.d_out")),
        MemoryTerm("adapters and optimizer state", 16 * r * (lc.d_in + lc.d_out),
                   ("lora.rank", "lowrank.d_in", "lowrank.d_out")),
    ]


def _loss(frozen, adapters, batch, dropout=0.0):
    """Mean squared error; a third batch entry is the step's LoRA dropout key (training only)."""
    x, y = batch[:2]
    key = batch[2] if len(batch) > 2 else None
    pred = lora.linear(frozen["base"], adapters["w"], x, dropout=dropout, dropout_key=key)
    return jnp.mean(jnp.square(pred - y))


def run(ctx: _runner.RunContext) -> dict[str, Any]:
    """Trains the adapter (resuming when asked), evaluates it and writes the adapter and plots."""
    cfg, mesh = ctx.config, ctx.mesh
    lc, bsz = cfg.lowrank, cfg.train.batch_size
    w, u64, v64, sig64 = make_problem(cfg.run.seed, lc.d_in, lc.d_out, lc.true_rank, lc.delta_scale)
    teacher = (w + (u64 * sig64) @ v64.T).astype(np.float32)
    params = {"w": w}
    optimizer, schedule = _steps.make_optimizer(cfg.optim, steps=cfg.train.steps)
    optimizer = _steps.adapter_optimizer(optimizer, cfg.lora)
    adapter_key = _steps.stream_key(cfg.run.seed, "adapter")

    if cfg.lora.init in _steps.BASE_INITS:
        # PiSSA / OLoRA: the adapters start from W's own factors and train on the residual.
        initial, base = _steps.make_adapters(cfg.lora, adapter_key, params)

        def init_state(adapters):
            return {"params": adapters, "opt": optimizer.init(adapters)}

        init_args = (initial,)
    else:
        initial, base = None, params

        # One compiled program instead of a dozen eager ones.
        def init_state(params):
            adapters, _ = _steps.make_adapters(cfg.lora, adapter_key, params)
            return {"params": adapters, "opt": optimizer.init(adapters)}

        init_args = (params,)

    frozen = {"base": base, "teacher": {"w": teacher}}
    frozen = jax.device_put(frozen, _mesh.tree_shardings(frozen, mesh))

    def batch_fn(frozen, step):
        kx, kn = jax.random.split(jax.random.fold_in(_steps.stream_key(cfg.run.seed, "data"), step))
        x = _mesh.constrain_batch(jax.random.normal(kx, (bsz, lc.d_in), jnp.float32), mesh)
        y = x @ frozen["teacher"]["w"]
        if lc.noise:
            y = y + jnp.float32(lc.noise) * jax.random.normal(kn, y.shape, jnp.float32)
        if cfg.lora.dropout:
            return x, y, _steps.dropout_key(cfg.run.seed, step)
        return x, y

    res = _runner.train_phase(
        ctx, phase="adapt", init_state=init_state, init_args=init_args, frozen=frozen,
        step_fn=_steps.make_step(functools.partial(_loss, dropout=cfg.lora.dropout), optimizer,
                                 schedule, batch_fn), steps=cfg.train.steps,
        items_per_step=bsz,
    )
    title = (f"lowrank: frozen W {lc.d_in}×{lc.d_out}, ΔW* of rank {lc.true_rank}, "
             f"mesh {cfg.mesh.data}×{cfg.mesh.model}")
    if res.interrupted:
        return _runner.interrupted_summary(ctx, title, res)
    adapters = _checkpoints.to_host(res.state["params"])
    eval_loss = float(ctx.jit(_eval_loss(lc, cfg.run.seed))(adapters, frozen))
    # The update against the original W: for PiSSA / OLoRA the trained adapter minus its
    # initial value (a rank-2r adapter, lora.to_lora_delta).
    # (DoRA: the low-rank part only, its magnitudes are not a delta.)
    learned = adapters if initial is None else lora.to_lora_delta(
        *({k: dataclasses.replace(ad, m=None) for k, ad in ads.items()} for ads in (adapters, initial)))
    adapter = learned["w"]
    # ΔW* as factors (a* = Uᵀ, b* = V·σ): the report never forms an (I, O) matrix.
    truth = (u64.T.astype(np.float32), (v64 * sig64).astype(np.float32), 1.0)
    report = ctx.jit(lambda a, b: spectral.adapter_report(
        None, a=a, b=b, scale=adapter.scale, top_k=min(lc.true_rank, cfg.lora.rank),
        reference=truth))(adapter.a, adapter.b)  # for DoRA: the low-rank part (m not included)
    s_learned = np.asarray(report.singular_values, np.float64)
    angles = np.degrees(np.asarray(report.reference_input_angles, np.float64))
    angles_right = np.degrees(np.asarray(report.reference_output_angles, np.float64))
    rel_err = float(report.reference_relative_error)
    count = lora.count_params(params, adapters)
    spectral_rows, spectral_metrics = _spectral.summary(
        ctx, _loss, frozen, batch_fn, lambda *args: init_state(*args)["params"], init_args, adapters)

    lora.save(ctx.out / "adapter.safetensors", adapters, config={"demo": "lowrank"})
    extra_files = []
    if initial is not None and not cfg.lora.dora:  # apply to the original W: merge(params, delta)
        lora.save(ctx.out / "adapter_delta.safetensors", learned,
                  config={"demo": "lowrank", "against": "original W"})
        extra_files.append("adapter_delta.safetensors")
    plots = []
    if cfg.run.plots:
        plots = _write_plots(ctx, {"learned ΔW": s_learned, "true ΔW*": sig64})

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
        "adapter": _steps.describe_lora(cfg.lora),
        "steps": res.end_step,
        "compile_s": res.compile_s,
        "run_s": res.run_s,
        "steps_per_s": res.steps_per_s,
    }
    rows = [
        ("adapter", _steps.describe_lora(cfg.lora)),
        ("trainable params", f"{count.trainable:,} ({'DoRA' if cfg.lora.dora else 'LoRA'} "
                             f"r={cfg.lora.rank}) vs W {count.frozen:,} "
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
                    + "".join(", " + f for f in extra_files + plots) + ")"),
    ]
    rows[-2:-2] = spectral_rows  # before "time" and "outputs"
    metrics.update(spectral_metrics)
    return {"title": title, "rows": rows, "metrics": metrics, "interrupted": res.interrupted}


def _eval_loss(lc, seed):
    """Held-out loss on fresh inputs from a key the training stream never uses."""

    def fn(adapters, frozen):
        x = jax.random.normal(_steps.stream_key(seed, "eval"), (lc.eval_examples, lc.d_in),
                              jnp.float32)
        return _loss(frozen, adapters, (x, x @ frozen["teacher"]["w"]))

    return fn


def _write_plots(ctx: _runner.RunContext, spectra: dict[str, np.ndarray]) -> list[str]:
    """``loss.png`` and ``singular_values.png`` with jaxla.spectral's plots (none without matplotlib)."""
    try:
        _runner.plot_losses(ctx, ctx.out / "loss.png")
        spectral.plot_singular_values(spectra, path=ctx.out / "singular_values.png",
                                      title="Singular values of the learned and true updates")
    except ImportError:
        return []
    return ["loss.png", "singular_values.png"]


DEMO = Demo(
    name="lowrank",
    section=LowRankConfig,
    run=run,
    validate=validate,
    preflight=preflight,
    memory=memory,
)
