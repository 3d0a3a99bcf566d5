"""The ``tiny_lm`` demo: pretrain a small transformer on one task, freeze it, LoRA-adapt it to another.

Three phases, each checkpointed and resumable (see :mod:`jaxla.finetune._runner`):

1. ``pretrain``: every parameter trained on ``tiny_lm.pretrain_task`` (e.g. copy);
2. ``adapt``: the pretrained model frozen, LoRA adapters on ``lora.targets`` trained on
   ``tiny_lm.adapt_task`` (e.g. reverse) with the ``[optim]`` settings;
3. ``full_ft`` (when ``tiny_lm.full_ft_baseline``): the baseline, every parameter fine-tuned from the
   same pretrained model on the same adapt-task batches.

The report compares held-out accuracy (per answer token and per whole answer) of the base, adapted
and fully fine-tuned models on both tasks, gives the trainable fraction, and prints generations of
the adapted model decoded greedily with the KV cache.

Dimension legend: B batch, n task length, T = 2n tokens the model reads, D ``d_model``, F ``d_ff``,
L layers, V vocabulary (digits + separator), E eval examples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from jaxla import lora
from jaxla.finetune import _checkpoints, _mesh, _runner, _steps
from jaxla.finetune import _transformer as tfm
from jaxla.finetune._config import NONNEG, POS, choice
from jaxla.finetune._demo import Demo, MemoryTerm
from jaxla.finetune._errors import ConfigError
from jaxla.finetune.demos import _spectral

__all__ = ["DEMO", "TinyLMConfig"]

_TASKS = choice("copy", "reverse", "sort", "shift")


@dataclass(frozen=True)
class TinyLMConfig:
    """The ``[tiny_lm]`` section: pretrain a tiny decoder-only transformer, LoRA-adapt it to a task."""

    digits: int = field(default=10, metadata=POS)
    length: int = field(default=6, metadata=POS)
    d_model: int = field(default=64, metadata=POS)
    n_heads: int = field(default=4, metadata=POS)
    n_layers: int = field(default=2, metadata=POS)
    d_ff: int = field(default=256, metadata=POS)
    pretrain_task: str = field(default="copy", metadata=_TASKS)
    adapt_task: str = field(default="reverse", metadata=_TASKS)
    pretrain_steps: int = field(default=600, metadata=POS)
    # learning_rate_of: the phase whose learning rate this is (--resume may change it, and a NaN stop
    # in that phase names it).
    pretrain_learning_rate: float = field(default=3e-3, metadata={**POS, "learning_rate_of": "pretrain"})
    full_ft_learning_rate: float = field(default=1e-3, metadata={**POS, "learning_rate_of": "full_ft"})
    full_ft_baseline: bool = True
    eval_examples: int = field(default=512, metadata=POS)
    # How many generations are printed: reporting only, a checkpoint stays valid across it.
    generations: int = field(default=4, metadata={**NONNEG, "operational": True})


def _eval_set(seed: int, task: str, n_examples: int, length: int, digits: int) -> np.ndarray:
    """Held-out sequences from a NumPy stream the training batches (JAX keys) never use."""
    rng = np.random.default_rng([seed, 0xE7A1, len(task)])
    x = rng.integers(0, digits, size=(n_examples, length), dtype=np.int32)
    y = tfm.task_answer(x, task, digits).astype(np.int32)
    return np.concatenate([x, np.full((n_examples, 1), digits, np.int32), y], axis=1)


def validate(cfg) -> None:
    """Cross-key checks of the model shape and the tasks (ConfigError)."""
    tl = cfg.tiny_lm
    if tl.d_model % tl.n_heads or (tl.d_model // tl.n_heads) % 2:
        raise ConfigError(
            f"config key tiny_lm.n_heads = {tl.n_heads} does not fit tiny_lm.d_model = "
            f"{tl.d_model}: expected d_model divisible by n_heads with an even head dimension "
            "(RoPE rotates pairs of features)."
        )
    if cfg.lora.rank > tl.d_model:
        raise ConfigError(
            f"config key lora.rank = {cfg.lora.rank} is too large: expected at most "
            f"tiny_lm.d_model = {tl.d_model}."
        )
    if cfg.lora.dropout:
        raise ConfigError(
            f"config key lora.dropout = {cfg.lora.dropout} is not supported by tiny_lm: it merges "
            "the adapters into the weights (lora.wrap), and LoRA dropout needs the adapter's own "
            "input branch (lora.linear, as in the lowrank demo); expected 0."
        )
    if tl.pretrain_task == tl.adapt_task:
        raise ConfigError(
            f"config key tiny_lm.adapt_task = {tl.adapt_task!r} equals tiny_lm.pretrain_task: "
            "expected a different task to adapt to."
        )


def _arch(tl) -> dict[str, int]:
    return dict(vocab=tl.digits + 1, d_model=tl.d_model, n_heads=tl.n_heads,
                n_layers=tl.n_layers, d_ff=tl.d_ff)


def preflight(cfg) -> None:
    """Fails early (ConfigError) when ``lora.targets`` do not fit the model's matrices."""

    def init_adapters():
        params = tfm.init(jax.random.key(0), **_arch(cfg.tiny_lm))
        return lora.init(jax.random.key(1), params, rank=cfg.lora.rank, alpha=cfg.lora.alpha,
                         targets=list(cfg.lora.targets))

    _steps.check_lora_targets(init_adapters, cfg.lora.targets)


def memory(cfg) -> list[MemoryTerm]:
    """Rough upper estimate of the bytes a run needs.

    Parameters P = L(4D² + 2DF + 4D) + 2VD + V: base, pretrained, full fine-tune and merged copies
    with gradients and two Adam moments, host and device (4 bytes · 12 · P). One step keeps per
    layer and token about 12D + 2F activations plus the N·T attention scores, and the T·V logits,
    twice for the backward pass; the evaluation does the same for E sequences (no backward).
    """
    tl, b = cfg.tiny_lm, cfg.train.batch_size
    v, d, f, t = tl.digits + 1, tl.d_model, tl.d_ff, 2 * tl.length
    params = tl.n_layers * (4 * d * d + 2 * d * f + 4 * d) + 2 * v * d + v
    per_seq = t * (tl.n_layers * (12 * d + 2 * f + tl.n_heads * t) + 3 * v)
    arch = ("tiny_lm.d_model", "tiny_lm.d_ff", "tiny_lm.n_layers", "tiny_lm.digits")
    seq = ("tiny_lm.length", "tiny_lm.n_heads", "tiny_lm.d_model", "tiny_lm.d_ff")
    return [
        MemoryTerm("parameters and optimizer state", 48 * params, arch),
        MemoryTerm("one step's activations", 8 * b * per_seq, ("train.batch_size", *seq)),
        MemoryTerm("the evaluation", 4 * 2 * tl.eval_examples * per_seq,
                   ("tiny_lm.eval_examples", *seq)),
    ]


def run(ctx: _runner.RunContext) -> dict[str, Any]:
    """Runs the three phases, evaluates, generates, and writes the adapter and plots."""
    cfg = ctx.config
    tl, bsz, seed, mesh = cfg.tiny_lm, cfg.train.batch_size, cfg.run.seed, ctx.mesh
    n, arch = tl.length, _arch(tl)
    title = (f"tiny_lm: {tl.n_layers}-layer transformer (d_model {tl.d_model}, {tl.n_heads} heads), "
             f"{tl.pretrain_task} → {tl.adapt_task}, mesh {cfg.mesh.data}×{cfg.mesh.model}")
    tokens_per_step = bsz * 2 * n

    def batch_fn_for(task, stream):
        def batch_fn(frozen, step):
            key = jax.random.fold_in(_steps.stream_key(seed, stream), step)
            seqs = tfm.make_sequences(key, task, batch=bsz, length=n, digits=tl.digits)
            return _mesh.constrain_batch(seqs, mesh)

        return batch_fn

    def full_loss(frozen, params, seqs):
        return tfm.loss_and_accuracy(tfm.apply(params, seqs[:, :-1], n_heads=tl.n_heads), seqs, n)[0]

    adapted_apply = lora.wrap(lambda p, tokens: tfm.apply(p, tokens, n_heads=tl.n_heads))

    def lora_loss(frozen, adapters, seqs):
        logits = adapted_apply(frozen["base"], adapters, seqs[:, :-1])
        return tfm.loss_and_accuracy(logits, seqs, n)[0]

    def init_full(params):
        # The optimizer state's structure does not depend on the learning rate.
        return {"params": params, "opt": _steps.make_optimizer(cfg.optim, steps=1)[0].init(params)}

    def full_phase(phase, init_state, init_args, steps, lr, task, stream):
        optimizer, schedule = _steps.make_optimizer(cfg.optim, steps=steps, learning_rate=lr)
        step_fn = _steps.make_step(full_loss, optimizer, schedule, batch_fn_for(task, stream))
        return _runner.train_phase(
            ctx, phase=phase, init_state=init_state, init_args=init_args, frozen={},
            step_fn=step_fn, steps=steps, items_per_step=tokens_per_step, unit="tokens",
        )

    def init_pretrain():
        return init_full(tfm.init(_steps.stream_key(seed, "model"), **arch))

    phases = {}
    res = full_phase("pretrain", init_pretrain, (), tl.pretrain_steps, tl.pretrain_learning_rate,
                     tl.pretrain_task, "pretrain")
    phases["pretrain"] = res
    if res.interrupted:
        return _runner.interrupted_summary(ctx, title, res)
    base = _checkpoints.to_host(res.state["params"])

    optimizer, schedule = _steps.make_optimizer(cfg.optim, steps=cfg.train.steps)
    optimizer = _steps.adapter_optimizer(optimizer, cfg.lora)
    adapter_key = _steps.stream_key(seed, "adapter")

    if cfg.lora.init in _steps.BASE_INITS:
        # PiSSA / OLoRA: the adapters start from the weights' own factors, trained on the residual.
        initial, adapt_base = _steps.make_adapters(cfg.lora, adapter_key, base)

        def init_adapters(adapters):
            return {"params": adapters, "opt": optimizer.init(adapters)}

        init_args = (initial,)
    else:
        adapt_base = base

        def init_adapters(base):
            adapters, _ = _steps.make_adapters(cfg.lora, adapter_key, base)
            return {"params": adapters, "opt": optimizer.init(adapters)}

        init_args = (base,)

    frozen = jax.device_put({"base": adapt_base}, _mesh.tree_shardings({"base": adapt_base}, mesh))
    res = _runner.train_phase(
        ctx, phase="adapt", init_state=init_adapters, init_args=init_args, frozen=frozen,
        step_fn=_steps.make_step(lora_loss, optimizer, schedule,
                                  batch_fn_for(tl.adapt_task, "data")),
        steps=cfg.train.steps, items_per_step=tokens_per_step, unit="tokens",
    )
    phases["adapt"] = res
    if res.interrupted:
        return _runner.interrupted_summary(ctx, title, res)
    adapters = _checkpoints.to_host(res.state["params"])

    full = None
    if tl.full_ft_baseline:
        res = full_phase("full_ft", init_full, (base,), cfg.train.steps, tl.full_ft_learning_rate,
                         tl.adapt_task, "data")
        phases["full_ft"] = res
        if res.interrupted:
            return _runner.interrupted_summary(ctx, title, res)
        full = _checkpoints.to_host(res.state["params"])

    merged = ctx.jit(lambda b, a: lora.merge(b, a)[0])(adapt_base, adapters)
    evaluate = ctx.jit(
        lambda p, s: tfm.loss_and_accuracy(tfm.apply(p, s[:, :-1], n_heads=tl.n_heads), s, n)[1:])
    sets = {t: _eval_set(seed, t, tl.eval_examples, n, tl.digits)
            for t in (tl.pretrain_task, tl.adapt_task)}
    models = {"base": base, "LoRA-adapted": merged}
    if full is not None:
        models["full fine-tune"] = full
    acc = {(m, t): tuple(float(v) for v in evaluate(p, s))
           for m, p in models.items() for t, s in sets.items()}

    gens = []
    if tl.generations:
        prompts = sets[tl.adapt_task][: tl.generations]
        out = ctx.jit(lambda p, x: tfm.decode_greedy(p, x, n, n_heads=tl.n_heads))(
            merged, prompts[:, : n + 1])
        for prompt, got in zip(prompts, np.asarray(out), strict=True):
            want = prompt[n + 1:]
            mark = "ok" if np.array_equal(got, want) else "wrong"
            gens.append(f"{' '.join(map(str, prompt[:n]))} | → {' '.join(map(str, got))}  "
                        f"({mark}; expected {' '.join(map(str, want))})")

    count = lora.count_params(adapt_base, adapters)
    spectral_rows, spectral_metrics = _spectral.summary(
        ctx, lora_loss, frozen, batch_fn_for(tl.adapt_task, "data"),
        lambda *args: init_adapters(*args)["params"], init_args, adapters)
    lora.save(ctx.out / "adapter.safetensors", adapters, config={"demo": "tiny_lm"})
    plots = _write_plots(ctx) if cfg.run.plots else []

    def acc_text(m, t):
        tok, exact = acc[(m, t)]
        return f"{100 * tok:5.1f}% tokens, {100 * exact:5.1f}% whole answers"

    kind = "DoRA" if cfg.lora.dora else "LoRA"
    rows = [("adapter", _steps.describe_lora(cfg.lora)),
            ("parameters", f"{count.frozen:,} in the model; {kind} r={cfg.lora.rank} trains "
                           f"{count.trainable:,} ({100 * count.trainable / count.frozen:.2f}%)")]
    for m in models:
        for t in sets:
            role = "pretrain task" if t == tl.pretrain_task else "adapt task"
            rows.append((f"{m} on {t} ({role})", acc_text(m, t)))
    for name, r in phases.items():
        rows.append((f"{name} phase", f"{r.end_step} steps, final loss {r.last_loss:.3e}, compile "
                                      f"{r.compile_s:.2f} s, run {r.run_s:.2f} s "
                                      f"({r.steps_per_s:.1f} steps/s)"))
    rows += spectral_rows
    rows += [(f"generation {i + 1} (KV cache)", g) for i, g in enumerate(gens)]
    rows.append(("outputs", f"{ctx.out} (adapter.safetensors, metrics.jsonl"
                            + (", " + ", ".join(plots) if plots else "") + ")"))
    metrics = {
        "accuracy": {f"{m}/{t}": {"token": a[0], "exact": a[1]} for (m, t), a in acc.items()},
        "trainable_params": count.trainable,
        "model_params": count.frozen,
        "trainable_fraction": count.trainable / count.frozen,
        "adapter": _steps.describe_lora(cfg.lora),
        "phases": {k: {"steps": r.end_step, "final_loss": r.last_loss, "compile_s": r.compile_s,
                       "run_s": r.run_s, "steps_per_s": r.steps_per_s} for k, r in phases.items()},
        "generations": gens,
        "steps": phases["adapt"].end_step,
    }
    metrics.update(spectral_metrics)
    return {"title": title, "rows": rows, "metrics": metrics, "interrupted": False}


def _write_plots(ctx: _runner.RunContext) -> list[str]:
    """``loss.png``, one curve per phase (none without matplotlib)."""
    try:
        _runner.plot_losses(ctx, ctx.out / "loss.png")
    except ImportError:
        return []
    return ["loss.png"]


DEMO = Demo(
    name="tiny_lm",
    section=TinyLMConfig,
    run=run,
    validate=validate,
    preflight=preflight,
    memory=memory,
)
