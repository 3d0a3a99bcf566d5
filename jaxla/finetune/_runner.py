"""The plain training loop shared by the demos: one phase, resumable bit for bit.

A *phase* trains one state pytree ``{"params": ..., "opt": ...}`` for a fixed number of steps with a
step ``step_fn(state, frozen, step) -> (state, metrics)`` built by
:func:`jaxla.finetune._steps.make_step` on :func:`jaxla.lora.train_step`. The step draws its own
batch from ``fold_in(key, step)``, so the data a step sees depends only on the seed and the step
number: restoring a checkpoint's exact bytes and replaying from its step reproduces an
uninterrupted run bit for bit (same machine, same program).

:func:`train_phase` is a sequence of small pieces: restore or initialise the state, lay it out on
the mesh, compile the step once, then the loop, which checks each step's metrics (NaN policy),
writes deferred checkpoints (:class:`_DeferredSave`) and reports progress (:class:`_Progress`).

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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxla import spectral
from jaxla._host_memory import release_freed_memory
from jaxla.finetune import _checkpoints, _mesh
from jaxla.finetune._errors import NonFiniteLossError

__all__ = [
    "PhaseResult",
    "RunContext",
    "handle_interrupts",
    "interrupted_summary",
    "plot_losses",
    "train_phase",
]


# jax.jit's compiler_options appeared in 2024 releases; older ones simply compile normally.
_JIT_TAKES_OPTIONS = "compiler_options" in inspect.signature(jax.jit).parameters


@dataclass
class RunContext:
    """What every phase of one run shares: where it writes, its mesh, how it reports, when to stop.

    ``mesh`` is built once by the API (it also validated the device count). ``stop_after`` (tests
    and benchmarks) stops the run like Ctrl-C after that many steps executed by this process,
    across phases.
    """

    out: Path
    config: Any
    mesh: jax.sharding.Mesh
    resume: bool = False
    progress: bool | None = None
    stop_after: int | None = None
    echo: Callable[[str], None] = print
    steps_done: int = 0
    interrupt: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        self.metrics = _checkpoints.metrics_log(self.out)
        self.fingerprint = _checkpoints.fingerprint(self.config)
        if self.progress is None:
            self.progress = sys.stderr.isatty()

    def jit(self, fn: Callable, **kwargs) -> Callable:
        """``jax.jit`` honouring ``run.fast_compile`` (XLA backend optimisation level 0)."""
        if self.config.run.fast_compile and _JIT_TAKES_OPTIONS:
            kwargs["compiler_options"] = {"xla_backend_optimization_level": 0}
        return jax.jit(fn, **kwargs)

    def checkpoints(self, phase: str) -> _checkpoints.Checkpoints:
        return _checkpoints.Checkpoints.for_phase(
            self.out, phase, fingerprint=self.fingerprint, keep=self.config.run.keep_checkpoints
        )

    def should_stop(self) -> bool:
        return self.interrupt.is_set() or (
            self.stop_after is not None and self.steps_done >= self.stop_after
        )


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


class _DeferredSave:
    """Periodic checkpoints written one step late.

    The state after step k is saved only once step k + 1 has shown that state's loss to be finite,
    so the newest checkpoint is always a good one. The final (or interrupted) state is saved at once.
    """

    def __init__(self, ckpts: _checkpoints.Checkpoints, every: int):
        self.ckpts, self.every, self.pending = ckpts, every, None

    def confirmed(self) -> None:
        """The pending state's loss proved finite: write it."""
        if self.pending is not None:
            self.ckpts.save(*self.pending)
            self.pending = None

    def after_step(self, done: int, state: Any, *, final: bool) -> None:
        if final:
            self.ckpts.save(done, state)
        elif done % self.every == 0:
            self.pending = (done, state)


def _restore_or_init(ctx: RunContext, ckpts, init_state: Callable, init_args: tuple):
    """``(start step, state, template)``: the newest checkpoint when resuming, else a fresh state."""
    template = jax.eval_shape(init_state, *init_args)
    restored = ckpts.restore(template) if ctx.resume else None
    if restored is not None:
        start, state = restored
        return start, state, template
    return 0, ctx.jit(init_state)(*init_args), template


def _compile(ctx: RunContext, step_fn: Callable, state, frozen, start: int, sharding):
    """The step compiled once for these shapes and layouts; returns ``(compiled, seconds)``."""
    kw = {}
    if sharding is not None:
        kw = dict(in_shardings=(sharding, None, None), out_shardings=(sharding, None))
    t0 = time.perf_counter()
    compiled = ctx.jit(step_fn, **kw).lower(state, frozen, jnp.int32(start)).compile()
    return compiled, time.perf_counter() - t0


def _check_finite(ctx: RunContext, phase: str, step: int, m: dict[str, float], ckpts) -> None:
    """Raises :class:`NonFiniteLossError` when the loss or the gradient norm is NaN/inf."""
    bad = [k for k in ("loss", "grad_norm") if not math.isfinite(m[k])]
    if not bad:
        return
    last = ckpts.latest()
    kept = (f"the last good checkpoint {str(last)!r} was kept" if last
            else "no checkpoint had been written yet")
    what = "loss" if bad[0] == "loss" else "gradient norm"
    raise NonFiniteLossError(
        f"[{phase}] the {what} became {m[bad[0]]} at step {step}: training stopped and {kept}. "
        + _checkpoints.nonfinite_advice(ctx.config, phase, ctx.out)
    )


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
    rules: Sequence[_mesh.ShardingRule] | None = None,
) -> PhaseResult:
    """Runs (or resumes) one phase and returns its final state.

    Args:
      ctx: the run context (its mesh lays the state out by :func:`_mesh.tree_shardings`).
      phase: name used for the checkpoint folder, metrics records and progress.
      init_state: ``init_state(*init_args) -> state``, the initial trainable state pytree; jitted
        here, and not run when resuming from a checkpoint (its ``jax.eval_shape`` is the template
        then).
      init_args: arrays passed to ``init_state``.
      frozen: pytree of arrays the step reads but does not train (passed as an argument so large
        frozen weights are not baked into the compiled program as constants).
      step_fn: ``(state, frozen, step) -> (state, {"loss", "grad_norm", "lr"})`` (see
        :func:`jaxla.finetune._steps.make_step`), jitted here.
      steps: total steps of the phase.
      items_per_step: examples (or tokens) per step, for the reported rate.
      unit: name of the items.
      rules: sharding rules for the state and ``frozen`` on the mesh, e.g. a real model's
        ``_mesh.model_rules(model.config, cfg.mesh)``; None: the state by
        ``_mesh.SHARDING_RULES`` and ``frozen`` left as the caller placed it.

    Returns:
      A :class:`PhaseResult`.

    Raises:
      NonFiniteLossError: when the loss or the gradient norm becomes NaN or inf.
      RunError: when a checkpoint to resume from is unusable.
    """
    ckpts = ctx.checkpoints(phase)
    start, state, template = _restore_or_init(ctx, ckpts, init_state, init_args)
    sharding = _mesh.tree_shardings(template, ctx.mesh, rules or _mesh.SHARDING_RULES)
    state = jax.device_put(state, sharding)
    if rules is not None:
        frozen = jax.device_put(frozen, _mesh.tree_shardings(frozen, ctx.mesh, rules))
    if start >= steps:
        done = [r["loss"] for r in ctx.metrics.records() if r.get("phase") == phase]
        return PhaseResult(state, False, start, start, 0.0, 0.0, done[-1] if done else float("nan"))
    ctx.metrics.rewind(phase, start)
    compiled, compile_s = _compile(ctx, step_fn, state, frozen, start, sharding)
    release_freed_memory()  # XLA's compile-time allocations, freed but kept resident by glibc
    state, end, loss, interrupted, run_s = _loop(
        ctx, phase, compiled, state, frozen, start, steps, ckpts, items_per_step, unit)
    return PhaseResult(state, interrupted, start, end, compile_s, run_s, loss)


def _loop(ctx, phase, compiled, state, frozen, start, steps, ckpts, items_per_step, unit):
    """The loop proper: ``(state, steps done, last loss, interrupted, seconds)``."""
    progress = _Progress(ctx, phase, start, steps, unit)
    saver = _DeferredSave(ckpts, ctx.config.run.checkpoint_every)
    loss, done, interrupted = float("nan"), start, False
    t_run = time.perf_counter()
    try:
        for step in range(start, steps):
            t_step = time.perf_counter()
            new_state, metrics = compiled(state, frozen, jnp.int32(step))
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            _check_finite(ctx, phase, step, m, ckpts)
            saver.confirmed()
            state, loss, done = new_state, m["loss"], step + 1
            if step == start:
                # The first run of the step allocates what later steps reuse or free; glibc keeps
                # the freed pages resident unless trimmed. Trimmed after the compile and here, a
                # lean SmolLM2-135M step's steady state was 178 MiB (QLoRA) / 146 MiB (f32) lower.
                release_freed_memory()
            m[f"{unit}_per_s"] = items_per_step / max(time.perf_counter() - t_step, 1e-9)
            ctx.metrics.append({"phase": phase, "step": step, **m})
            progress.update(step, m)
            ctx.steps_done += 1
            stop = ctx.should_stop()
            saver.after_step(done, state, final=stop or done == steps)
            if stop and done < steps:
                interrupted = True
                break
    finally:
        progress.close()
    jax.block_until_ready(state)
    return state, done, loss, interrupted, time.perf_counter() - t_run


def interrupted_summary(ctx: RunContext, title: str, res: PhaseResult) -> dict[str, Any]:
    """The summary of a run stopped early (Ctrl-C or ``stop_after``): where to resume from."""
    rows = [
        ("status", f"stopped at step {res.end_step}; checkpoint saved"),
        ("last loss", f"{res.last_loss:.4e}"),
        ("resume with", f"jaxla finetune ... --out {ctx.out} --resume"),
    ]
    return {"title": title, "rows": rows, "metrics": {"steps": res.end_step}, "interrupted": True}


def plot_losses(ctx: RunContext, path: Path) -> None:
    """Writes the loss of every phase recorded in ``metrics.jsonl`` to ``path`` as a PNG.

    Raises:
      ImportError: matplotlib is not installed (the demos then skip their plots).
    """
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for r in ctx.metrics.records():
        steps, losses = curves.setdefault(r["phase"], ([], []))
        steps.append(r["step"])
        losses.append(r["loss"])
    if curves:
        spectral.plot_training_curves(curves, path=path)
