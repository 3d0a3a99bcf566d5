"""The training loop shared by the demos: jitted step, checkpoints, exact resume, faults, progress.

A *phase* trains one state pytree ``{"params": ..., "opt": ...}`` for a fixed number of steps with a
jitted ``step_fn(state, frozen, step) -> (state, metrics)``. The step function draws its own batch
from ``fold_in(key, step)``, so the data a step sees depends only on the seed and the step number:
restoring a checkpoint's exact bytes and replaying from its step reproduces an uninterrupted run bit
for bit (same machine, same compiled program).

Faults: a non-finite loss stops the run (:class:`NonFiniteLossError`) without writing the bad state,
so the last checkpoint stays the last good one. SIGINT/SIGTERM (Ctrl-C) finish the current step,
write a checkpoint and end the phase with ``interrupted=True``.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxla.finetune import _config, _mesh, _rundir

__all__ = [
    "NonFiniteLossError",
    "PhaseResult",
    "RunContext",
    "handle_interrupts",
    "make_optimizer",
    "make_step",
    "train_phase",
]


# jax.jit's compiler_options appeared in 2024 releases; older ones simply compile normally.
_JIT_TAKES_OPTIONS = "compiler_options" in inspect.signature(jax.jit).parameters


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the run stopped and kept its last good checkpoint."""


@dataclass
class RunContext:
    """What every phase of one run shares: where it writes, how it reports, when it must stop.

    ``stop_after`` (tests and benchmarks) stops the run like Ctrl-C after that many steps executed by
    this process, across phases.
    """

    out: Path
    config: _config.Config
    resume: bool = False
    progress: bool | None = None
    stop_after: int | None = None
    echo: Callable[[str], None] = print
    steps_done: int = 0
    interrupt: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        self.metrics = _rundir.MetricsLog(self.out / "metrics.jsonl")
        self.fingerprint = _rundir.checkpoint_fingerprint(self.config)
        if self.progress is None:
            self.progress = sys.stderr.isatty()

    def jit(self, fn: Callable, **kwargs) -> Callable:
        """``jax.jit`` honouring ``run.fast_compile`` (XLA backend optimisation level 0)."""
        if self.config.run.fast_compile and _JIT_TAKES_OPTIONS:
            kwargs["compiler_options"] = {"xla_backend_optimization_level": 0}
        return jax.jit(fn, **kwargs)


@dataclass(frozen=True)
class PhaseResult:
    """The outcome of :func:`train_phase`."""

    state: Any
    interrupted: bool
    start_step: int
    end_step: int
    compile_s: float
    run_s: float
    last_loss: float

    @property
    def steps_per_s(self) -> float:
        n = self.end_step - self.start_step
        return n / self.run_s if n and self.run_s > 0 else float("nan")


def make_optimizer(
    optim: _config.OptimConfig, *, steps: int, learning_rate: float | None = None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The Optax optimizer and its schedule: linear warmup, then constant or cosine decay to 0."""
    lr = optim.learning_rate if learning_rate is None else learning_rate
    warmup = min(optim.warmup_steps, max(steps - 1, 0))
    if optim.schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, lr, warmup_steps=warmup, decay_steps=max(steps, warmup + 1), end_value=0.0
        )
    elif warmup:
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup]
        )
    else:
        schedule = optax.constant_schedule(lr)
    if optim.optimizer == "adam":
        opt = optax.adam(schedule)
    elif optim.optimizer == "adamw":
        opt = optax.adamw(schedule, weight_decay=optim.weight_decay)
    else:
        opt = optax.sgd(schedule, momentum=0.9)
    if optim.grad_clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(optim.grad_clip), opt)
    return opt, schedule


_STREAMS = {"data": 1, "eval": 2, "adapter": 3, "model": 4, "pretrain": 5, "full_ft": 6}


def stream_key(seed: int, stream: str) -> jax.Array:
    """The PRNG key of one named random stream of a run (call inside jit: it is two cheap ops)."""
    return jax.random.fold_in(jax.random.key(seed), _STREAMS[stream])


# optax.tree.norm replaced optax.global_norm (deprecated) in newer optax releases.
_tree_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


def make_step(
    loss_fn: Callable[[Any, Any, Any], jax.Array],
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    batch_fn: Callable[[Any, jax.Array], Any],
) -> Callable:
    """A step ``(state, frozen, step) -> (state, metrics)`` for :func:`train_phase`.

    Args:
      loss_fn: ``loss_fn(trainable, frozen, batch) -> scalar``; differentiated in ``trainable`` only.
      optimizer: any Optax transformation.
      schedule: the learning-rate schedule (reported per step).
      batch_fn: ``batch_fn(frozen, step) -> batch``, deterministic in ``step``.
    """

    def step_fn(state, frozen, step):
        batch = batch_fn(frozen, step)
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], frozen, batch)
        # Optax mixes int32 step counts with Python floats; keep it working for users who run
        # with jax_numpy_dtype_promotion="strict".
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, state["opt"], state["params"])
            params = optax.apply_updates(state["params"], updates)
            lr = jnp.asarray(schedule(step), jnp.float32)
        metrics = {"loss": loss, "grad_norm": _tree_norm(grads), "lr": lr}
        return {"params": params, "opt": opt_state}, metrics

    return step_fn


@contextlib.contextmanager
def handle_interrupts(ctx: RunContext) -> Iterator[None]:
    """Turns SIGINT/SIGTERM into a request to checkpoint and stop (a second Ctrl-C aborts)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if ctx.interrupt.is_set():
            raise KeyboardInterrupt
        ctx.interrupt.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class _Progress:
    """tqdm bar on a terminal, otherwise a plain line every ``log_every`` steps."""

    def __init__(self, ctx: RunContext, phase: str, start: int, total: int, unit: str):
        self.ctx, self.phase, self.total, self.unit = ctx, phase, total, unit
        self.every = ctx.config.run.log_every
        self.t0 = time.perf_counter()
        self.start = start
        self.bar = None
        if ctx.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc=phase, unit="step", dynamic_ncols=True)

    def update(self, step: int, m: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{m['loss']:.4g}", lr=f"{m['lr']:.2g}", refresh=False)
            return
        done = step + 1
        if done % self.every and done != self.total:
            return
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(done - self.start, 1) * (self.total - done)
        self.ctx.echo(
            f"[{self.phase}] step {done}/{self.total}  loss {m['loss']:.4e}  lr {m['lr']:.2e}  "
            f"|g| {m['grad_norm']:.3e}  {m[self.unit + '_per_s']:.0f} {self.unit}/s  eta {eta:.0f}s"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train_phase(
    ctx: RunContext,
    *,
    phase: str,
    init_state: Callable[..., Any],
    init_args: tuple = (),
    frozen: Any,
    step_fn: Callable,
    steps: int,
    items_per_step: int,
    unit: str = "examples",
    mesh: Any = None,
) -> PhaseResult:
    """Runs (or resumes) one phase and returns its final state.

    Args:
      ctx: the run context.
      phase: name used for the checkpoint folder, metrics records and progress.
      init_state: ``init_state(*init_args) -> state``, the initial trainable state pytree; jitted
        here, and not run when resuming from a checkpoint (its ``jax.eval_shape`` is the template
        then).
      init_args: arrays passed to ``init_state``.
      frozen: pytree of arrays the step reads but does not train (passed as an argument so large
        frozen weights are not baked into the compiled program as constants).
      step_fn: ``(state, frozen, step) -> (state, {"loss", "grad_norm", "lr"})``, jitted here.
      steps: total steps of the phase.
      items_per_step: examples (or tokens) per step, for the reported rate.
      unit: name of the items.
      mesh: the device mesh; the state is laid out on it by :func:`_mesh.tree_shardings`.

    Returns:
      A :class:`PhaseResult`.

    Raises:
      NonFiniteLossError: when the loss becomes NaN or inf.
      RunError: when a checkpoint to resume from is unusable.
    """
    ckpt_dir = ctx.out / "checkpoints" / phase
    start = 0
    latest = _rundir.latest_checkpoint(ckpt_dir) if ctx.resume else None
    template = jax.eval_shape(init_state, *init_args)
    if latest is not None:
        start, state = _rundir.load_checkpoint(latest, template, fingerprint=ctx.fingerprint)
    else:
        state = ctx.jit(init_state)(*init_args)
    state_sharding = None if mesh is None else _mesh.tree_shardings(template, mesh)
    if state_sharding is not None:
        state = jax.device_put(state, state_sharding)
    if start >= steps:
        done = [r["loss"] for r in ctx.metrics.records() if r.get("phase") == phase]
        return PhaseResult(state, False, start, start, 0.0, 0.0, done[-1] if done else float("nan"))
    ctx.metrics.rewind(phase, start)

    shard_kw = {}
    if state_sharding is not None:
        shard_kw = dict(in_shardings=(state_sharding, None, None), out_shardings=(state_sharding, None))
    t0 = time.perf_counter()
    compiled = ctx.jit(step_fn, **shard_kw).lower(state, frozen, jnp.int32(start)).compile()
    compile_s = time.perf_counter() - t0

    def save(step, st):
        _rundir.save_checkpoint(
            ckpt_dir, step, st, fingerprint=ctx.fingerprint, keep=ctx.config.run.keep_checkpoints
        )

    progress = _Progress(ctx, phase, start, steps, unit)
    every = ctx.config.run.checkpoint_every
    interrupted = False
    loss = float("nan")
    done = start
    # A periodic checkpoint of the state after step k is written once step k + 1 has shown that
    # state's loss to be finite, so the newest checkpoint is always a good one.
    pending = None
    t_run = time.perf_counter()
    try:
        for step in range(start, steps):
            t_step = time.perf_counter()
            new_state, metrics = compiled(state, frozen, jnp.int32(step))
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            loss = m["loss"]
            if not (math.isfinite(loss) and math.isfinite(m["grad_norm"])):
                last = _rundir.latest_checkpoint(ckpt_dir)
                kept = f"the last good checkpoint {str(last)!r} was kept" if last else (
                    "no checkpoint had been written yet")
                what = "loss" if not math.isfinite(loss) else "gradient norm"
                raise NonFiniteLossError(
                    f"[{phase}] the {what} became {m['loss' if what == 'loss' else 'grad_norm']} at "
                    f"step {step}: training stopped and {kept}. "
                    + _rundir.nonfinite_advice(ctx.config, phase, ctx.out)
                )
            if pending is not None:
                save(*pending)
                pending = None
            state = new_state
            m[f"{unit}_per_s"] = items_per_step / max(time.perf_counter() - t_step, 1e-9)
            ctx.metrics.append({"phase": phase, "step": step, **m})
            progress.update(step, m)
            ctx.steps_done += 1
            done = step + 1
            stop = ctx.interrupt.is_set() or (
                ctx.stop_after is not None and ctx.steps_done >= ctx.stop_after
            )
            if stop or done == steps:
                save(done, state)
            elif done % every == 0:
                pending = (done, state)
            if stop and done < steps:
                interrupted = True
                break
    finally:
        progress.close()
    jax.block_until_ready(state)
    run_s = time.perf_counter() - t_run
    return PhaseResult(state, interrupted, start, done, compile_s, run_s, loss)


def interrupted_summary(ctx: RunContext, title: str, res: PhaseResult) -> dict[str, Any]:
    """The summary of a run stopped early (Ctrl-C or ``stop_after``): where to resume from."""
    rows = [
        ("status", f"stopped at step {res.end_step}; checkpoint saved"),
        ("last loss", f"{res.last_loss:.4e}"),
        ("resume with", f"jaxla finetune ... --out {ctx.out} --resume"),
    ]
    return {"title": title, "rows": rows, "metrics": {"steps": res.end_step}, "interrupted": True}
