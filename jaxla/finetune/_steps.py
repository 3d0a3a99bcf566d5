"""What a demo trains with: the optimizer and schedule, named random streams, the step, target checks.

The step is :func:`jaxla.lora.train_step` (the package's one training-step implementation), left
unjitted so it composes under the sharded jit of :func:`jaxla.finetune._runner.train_phase`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxla import lora
from jaxla.finetune import _config
from jaxla.finetune._errors import ConfigError

__all__ = [
    "BASE_INITS",
    "adapter_optimizer",
    "check_lora_targets",
    "describe_lora",
    "dropout_key",
    "make_adapters",
    "make_optimizer",
    "make_step",
    "stream_key",
]

# [lora] inits that replace the base weights by a residual (the adapters hold part of W).
BASE_INITS = ("pissa", "olora")


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


_STREAMS = {"data": 1, "eval": 2, "adapter": 3, "model": 4, "pretrain": 5, "full_ft": 6,
            "dropout": 7}


def stream_key(seed: int, stream: str) -> jax.Array:
    """The PRNG key of one named random stream of a run (call inside jit: it is two cheap ops)."""
    return jax.random.fold_in(jax.random.key(seed), _STREAMS[stream])


def dropout_key(seed: int, step: jax.Array) -> jax.Array:
    """The LoRA dropout key of one training step (evaluation passes none: no dropout)."""
    return jax.random.fold_in(stream_key(seed, "dropout"), step)


def make_adapters(lc: _config.LoraConfig, key: jax.Array, params: Any) -> tuple[Any, Any]:
    """``(adapters, base)`` for the ``[lora]`` section: the adapters and the weights they train on.

    kaiming / gaussian: :func:`jaxla.lora.init` (``base`` is ``params``); pissa / olora:
    :func:`jaxla.lora.init_pissa` / :func:`jaxla.lora.init_olora` (``base`` is the residual). The
    ``rslora`` and ``dora`` keys apply to every init.
    """
    common = dict(rank=lc.rank, alpha=lc.alpha, targets=list(lc.targets), rslora=lc.rslora,
                  dora=lc.dora)
    if lc.init == "pissa":
        return lora.init_pissa(params, **common)
    if lc.init == "olora":
        return lora.init_olora(params, **common)
    return lora.init(key, params, init=lc.init, **common), params


def adapter_optimizer(optimizer: optax.GradientTransformation, lc: _config.LoraConfig
                      ) -> optax.GradientTransformation:
    """``optimizer`` with LoRA+ (:func:`jaxla.lora.loraplus`) when ``lora.loraplus_ratio != 1``."""
    if lc.loraplus_ratio == 1.0:
        return optimizer
    return lora.loraplus(optimizer, ratio=lc.loraplus_ratio)


def describe_lora(lc: _config.LoraConfig) -> str:
    """One line saying which LoRA variant a run used, for the demos' summaries."""
    kind = "DoRA" if lc.dora else "LoRA"
    scale = lc.alpha / (lc.rank ** 0.5 if lc.rslora else lc.rank)
    parts = [f"{kind} r={lc.rank}, alpha {lc.alpha:g} (scale {scale:.4g}"
             + (", rsLoRA)" if lc.rslora else ")"), f"init {lc.init}"]
    if lc.dropout:
        parts.append(f"dropout {lc.dropout:g}")
    if lc.loraplus_ratio != 1.0:
        parts.append(f"LoRA+ ratio {lc.loraplus_ratio:g}")
    return ", ".join(parts)


def make_step(
    loss_fn: Callable[[Any, Any, Any], jax.Array],
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    batch_fn: Callable[[Any, jax.Array], Any],
) -> Callable:
    """A step ``(state, frozen, step) -> (state, metrics)`` for :func:`train_phase`.

    The update itself is :func:`jaxla.lora.train_step` (unjitted, so it composes under the
    sharded jit of :func:`train_phase`); ``state["params"]`` plays its ``adapters`` role, so the
    same step serves adapters and full fine-tunes.

    Args:
      loss_fn: ``loss_fn(frozen, trainable, batch) -> scalar``; differentiated in ``trainable``.
      optimizer: any Optax transformation.
      schedule: the learning-rate schedule (reported per step).
      batch_fn: ``batch_fn(frozen, step) -> batch``, deterministic in ``step``.
    """
    update = lora.train_step(loss_fn, optimizer, jit=False, grad_norm=True)

    def step_fn(state, frozen, step):
        batch = batch_fn(frozen, step)
        params, opt_state, loss, grad_norm = update(frozen, state["params"], state["opt"], batch)
        with jax.numpy_dtype_promotion("standard"):
            lr = jnp.asarray(schedule(step), jnp.float32)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr}
        return {"params": params, "opt": opt_state}, metrics

    return step_fn


def check_lora_targets(init_adapters: Callable[[], Any], targets) -> None:
    """Traces ``init_adapters`` (shapes only) and turns a LoRA target error into a ConfigError."""
    try:
        jax.eval_shape(init_adapters)
    except (ValueError, TypeError) as e:
        raise ConfigError(
            f"config key lora.targets = {list(targets)!r} does not fit the model: {e}"
        ) from None
