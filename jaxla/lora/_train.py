"""Training adapters with any Optax transformation while the base parameters stay frozen.

Gradients are taken with respect to the adapters argument only, so W never appears in the gradient,
in the optimizer state or in the updates: the optimizer state scales with the adapter size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxla.lora._adapter import Adapters, is_adapter

__all__ = ["loraplus", "scale_b", "train_step"]

# optax.tree.norm replaced optax.global_norm (deprecated) in newer optax releases.
_tree_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


def scale_b(ratio: float) -> optax.GradientTransformation:
    """An Optax transformation multiplying the updates of every ``b`` by ``ratio`` (``a`` untouched).

    Args:
      ratio: the factor (> 0).

    Returns:
      A stateless ``optax.GradientTransformation`` for updates shaped like ``{path: Adapter}``.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not ratio > 0:
        raise ValueError(f"ratio must be a number > 0, got {ratio!r}")

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params

        def f(node):
            if not is_adapter(node):
                return node
            b = jnp.asarray(node.b)
            return dataclasses.replace(node, b=b * jnp.asarray(ratio, b.dtype))

        return jax.tree_util.tree_map(f, updates, is_leaf=is_adapter), state

    return optax.GradientTransformation(init_fn, update_fn)


def loraplus(optimizer: optax.GradientTransformation, *, ratio: float = 16.0):
    """LoRA+: ``b`` learns ``ratio`` times faster than ``a`` (Hayou et al., 2024; ratio 16 suggested).

    The rescaling follows ``optimizer``, so it multiplies the final step of ``b``: for SGD and Adam
    alike this is a learning rate of ``ratio · lr`` for ``b`` (decoupled weight decay included).

    Args:
      optimizer: any Optax transformation, e.g. ``optax.adamw(1e-4)``.
      ratio: learning-rate ratio ``lr_b / lr_a`` (> 0).

    Returns:
      ``optax.chain(optimizer, scale_b(ratio))``.
    """
    return optax.chain(optimizer, scale_b(ratio))


def _freeze_gains(tree: Any) -> Any:
    """Zeroes the updates of every traced scale (``gain``, see :func:`jaxla.lora.pad_rank`): the
    scale is a hyper-parameter, not a parameter (no gradient step, no weight decay)."""

    def f(node):
        if is_adapter(node) and node.gain is not None:
            return dataclasses.replace(node, gain=jnp.zeros_like(node.gain))
        return node

    return jax.tree_util.tree_map(f, tree, is_leaf=is_adapter)


def train_step(
    loss_fn: Callable[..., Any],
    optimizer: optax.GradientTransformation,
    *,
    has_aux: bool = False,
    jit: bool = True,
    donate: bool = False,
    grad_norm: bool = False,
) -> Callable[..., Any]:
    """Builds ``step(params, adapters, opt_state, *batch) -> (adapters, opt_state, loss[, aux][, gnorm])``.

    The loss is differentiated with respect to ``adapters`` only (``params`` is also wrapped in
    ``stop_gradient``), then ``optimizer`` turns the gradients into updates that are added to the
    adapters. Create the state with ``optimizer.init(adapters)``. DoRA magnitudes ``m`` are trained
    like ``a`` and ``b``; a traced scale (``gain``, from :func:`jaxla.lora.pad_rank`) gets a zero
    gradient and a zero update.

    Args:
      loss_fn: ``loss_fn(params, adapters, *batch) -> scalar`` (or ``(scalar, aux)`` with
        ``has_aux``), e.g. built from :func:`jaxla.lora.wrap` or :func:`jaxla.lora.linear`.
      optimizer: any Optax transformation (see :func:`loraplus`).
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      jit: return the step compiled with ``jax.jit``; with ``jit=False`` the step composes under
        the caller's own ``jax.jit`` (e.g. one with ``in_shardings``/``out_shardings`` for a mesh).
      donate: let XLA reuse the buffers of ``adapters`` and ``opt_state`` for the new values (the
        old ones must not be used afterwards).
      grad_norm: also return the global L2 norm of the gradients (float32 scalar), last in the
        tuple, for logging and for stopping on a non-finite gradient.

    Returns:
      The step function. Since only ``adapters`` is differentiated, any pytree of arrays can play
      that role: pass every parameter as ``adapters`` (and ``{}`` as ``params``) for a full
      fine-tune with the same step.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(f"optimizer must be an optax.GradientTransformation, "
                        f"got {type(optimizer).__name__}")
    grad_fn = jax.value_and_grad(loss_fn, argnums=1, has_aux=has_aux)

    def step(params: Any, adapters: Adapters, opt_state: Any, *batch: Any):
        frozen = jax.lax.stop_gradient(params)
        if has_aux:
            (loss, aux), grads = grad_fn(frozen, adapters, *batch)
        else:
            loss, grads = grad_fn(frozen, adapters, *batch)
        # Optax mixes Python floats with int32 step counts (bias correction, schedules), which
        # strict promotion rejects; the adapters' own dtypes are unaffected.
        grads = _freeze_gains(grads)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, opt_state, adapters)
            adapters = optax.apply_updates(adapters, _freeze_gains(updates))
            norm = _tree_norm(grads).astype(jnp.float32) if grad_norm else None
        out = (adapters, opt_state, loss) + ((aux,) if has_aux else ())
        return out + ((norm,) if grad_norm else ())

    if not jit:
        return step
    return jax.jit(step, donate_argnums=(1, 2) if donate else ())
