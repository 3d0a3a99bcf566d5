"""The spectral rows of the demos' summaries: curvature of the LoRA loss and heavy tails of ΔW.

Sharpness λ_max(H) (Lanczos) and the Hutchinson trace of the LoRA loss over the adapter
parameters, on the first training batch, at the initial and at the learned adapters (one compiled
program for both); the threshold 2/η uses the peak learning rate (Adam rescales curvature, so the
ratio is a diagnostic, not a stability verdict). Then the ESD of each learned ΔW from its factors:
power-law α, the Marchenko–Pastur edge and the spikes above it (:mod:`jaxla.spectral`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxla import spectral
from jaxla.finetune import _steps

__all__ = ["summary"]


def summary(
    ctx: Any,
    loss_fn: Callable[[Any, Any, Any], jax.Array],
    frozen: Any,
    batch_fn: Callable[[Any, int], Any],
    init_fn: Callable[..., Any],
    init_args: tuple,
    end: Any,
) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """``(rows, metrics)`` for a demo summary, from one compiled program.

    Args:
      ctx: the run context (its ``jit`` and config: ``optim.learning_rate``, ``run.seed``).
      loss_fn: ``loss_fn(frozen, adapters, batch) -> scalar``, the demo's training loss.
      frozen: the frozen pytree the loss takes.
      batch_fn: ``batch_fn(frozen, step) -> batch``; the curvature uses step 0's batch.
      init_fn: ``init_fn(*init_args) -> adapters``, the initial adapters (recomputed inside the
        program: they are a deterministic function of the seed).
      init_args: its arguments.
      end: the learned adapters dict.

    Runs on one device (the frozen weights, the batch and both adapter sets are gathered there),
    whatever the run's mesh.
    """
    cfg = ctx.config
    lr = cfg.optim.learning_rate
    key = jax.random.fold_in(_steps.stream_key(cfg.run.seed, "eval"), 1)

    def program(init_args, end, frozen, batch):
        start = init_fn(*init_args)
        both = jax.tree_util.tree_map(lambda s, e: jnp.stack([s, e.astype(s.dtype)]), start, end)
        curv = jax.vmap(lambda ad: spectral.curvature_summary(
            lambda p, b: loss_fn(frozen, p, b), ad, batch, key=key, learning_rate=lr))(both)
        return curv, spectral.heavy_tail_report(factors=end)

    # One device, no mesh: a sharded run of these loops hung twice on the 8 simulated CPU devices
    # of the mesh tests (in-process collectives inside Lanczos loops), and the diagnostic is small.
    batch = ctx.jit(lambda frozen: batch_fn(frozen, 0))(frozen)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    args = jax.device_put((init_args, end, frozen, batch), one)
    curv, tails = ctx.jit(program)(*args)
    per_point = {when: spectral.CurvatureSummary(*(x[i] for x in curv))
                 for i, when in enumerate(("start", "end"))}
    rows = [(f"curvature at {when}", c.text()) for when, c in per_point.items()]
    rows += [(f"heavy tail of ΔW {r['name']}",
              f"α {r['alpha']:.3g} (xmin {r['xmin']:.3g}, KS {r['ks_distance']:.3f}, tail "
              f"{r['num_tail']}/{r['num_eigenvalues']}), {r['num_spikes']} spikes above MP λ+ "
              f"{r['mp_edge']:.3g}") for r in tails.rows()]
    metrics = {
        "curvature": {when: {f: (bool(v) if f == "converged" else float(v))
                             for f, v in c._asdict().items()} for when, c in per_point.items()},
        "heavy_tail": [{k: v for k, v in r.items() if k != "shape"} for r in tails.rows()],
    }
    return rows, metrics
