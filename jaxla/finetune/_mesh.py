"""Device meshes for the fine-tune demos, on JAX's own SPMD engine (``jax.sharding``).

The mesh has two axes: ``data`` (the batch is split over it) and ``model`` (kernels and adapters are
split over it, by rule). Sharding is expressed with ``NamedSharding``/``PartitionSpec`` on the jitted
step's inputs and outputs plus one ``with_sharding_constraint`` on each generated batch; XLA's
partitioner inserts the collectives. The default mesh is 1 × 1, so the same program runs unchanged on
one device, and the loss trajectory on a larger mesh matches it up to float reassociation.

Sharding rules (:data:`SHARDING_RULES`) are regular expressions over a leaf's "/"-joined pytree path,
matched against a trailing run of whole path components exactly as ``jaxla.lora`` targets are, and
applied to parameter and optimizer-state pytrees alike (optimizer state paths end with the
parameter's path, e.g. ``0/mu/layers/0/attn/q/w``). The first rule that matches decides:

- ``w`` kernels ``(..., d_in, d_out)``: ``d_out`` over ``model``;
- ``w/b``, the LoRA ``b`` ``(..., d_out, r)`` of a kernel ``w``: ``d_out`` over ``model``, matching it;
- everything else (LoRA ``a``, biases ``b`` even when stacked ``(L, d_out)``, norms, embeddings,
  scalars): replicated;
- a dimension not divisible by the ``model`` size stays replicated.

Multi-host use: run the same command on every host, with the same config, after JAX's distributed
runtime is initialised. On each host, before anything touches JAX devices, call::

    jax.distributed.initialize(coordinator_address="host0:1234",  # same on every host
                               num_processes=N,                   # number of hosts
                               process_id=i)                      # 0 .. N-1, unique per host

(on Cloud TPU and SLURM/Open MPI clusters ``jax.distributed.initialize()`` with no arguments finds
these itself). ``jax.devices()`` then lists every device of every host, so ``mesh.data *
mesh.model`` may be the global device count. Put the ``data`` axis across hosts and ``model`` within
a host (devices are taken in ``jax.devices()`` order, which groups them by host), keep
``train.batch_size`` the *global* batch, and give every host the same ``--out`` on a shared file
system or pass a per-host ``--out``: checkpoints hold the full (gathered) state, so any host's copy
resumes the run. The batch is generated inside the step from (seed, step), so no host reads data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxla.finetune import _config
from jaxla.finetune._errors import RunError
from jaxla.lora._targets import path_str, predicate

__all__ = [
    "SHARDING_RULES",
    "ShardRule",
    "batch_sharding",
    "constrain_batch",
    "make_mesh",
    "partition_spec",
    "replicated",
    "tree_shardings",
]

AXES = ("data", "model")


@dataclass(frozen=True)
class ShardRule:
    """Leaves whose path matches ``pattern`` (and have at least ``min_ndim`` axes) put their axis
    ``axis`` (counted like a Python index, usually from the end) on the mesh axis ``mesh_axis``."""

    pattern: str
    axis: int
    mesh_axis: str = "model"
    min_ndim: int = 2


SHARDING_RULES: tuple[ShardRule, ...] = (
    ShardRule(r"w", axis=-1),    # kernel (..., d_in, d_out)
    ShardRule(r"w/b", axis=-2),  # LoRA b (..., d_out, r) of a kernel w
)


def make_mesh(mesh_cfg: _config.MeshConfig) -> Mesh:
    """A ``(data, model)`` mesh over the first ``data * model`` devices.

    Raises:
      RunError: when more devices are requested than exist.
    """
    devices = jax.devices()
    need = mesh_cfg.data * mesh_cfg.model
    if need > len(devices):
        raise RunError(
            f"the mesh needs mesh.data × mesh.model = {mesh_cfg.data} × {mesh_cfg.model} = {need} "
            f"devices but only {len(devices)} {devices[0].platform} device(s) exist. Lower mesh.data"
            " / mesh.model (e.g. --set mesh.data=1 --set mesh.model=1), or on CPU simulate devices "
            f"with 'jaxla finetune --cpu-devices {need}' (or "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={need})."
        )
    grid = np.asarray(devices[:need], dtype=object).reshape(mesh_cfg.data, mesh_cfg.model)
    return Mesh(grid, AXES)


def partition_spec(
    path: str, shape: tuple[int, ...], mesh_shape: dict[str, int],
    rules: Sequence[ShardRule] = SHARDING_RULES,
) -> PartitionSpec:
    """The ``PartitionSpec`` of one leaf from the first rule matching its path ``path``."""
    spec = [None] * len(shape)
    for rule in rules:
        if not predicate(rule.pattern, "sharding rule")(path, None):
            continue
        size = mesh_shape.get(rule.mesh_axis, 1)
        if len(shape) >= rule.min_ndim and size > 1 and shape[rule.axis] % size == 0:
            spec[rule.axis] = rule.mesh_axis
        break
    return PartitionSpec(*spec)


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[ShardRule] = SHARDING_RULES) -> Any:
    """A pytree of ``NamedSharding`` for ``tree`` (arrays or shape-dtype structs) by ``rules``."""
    mesh_shape = dict(mesh.shape)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: NamedSharding(mesh, partition_spec(path_str(p), np.shape(x), mesh_shape, rules)),
        tree,
    )


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis over ``data``, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec("data", *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated on the mesh."""
    return NamedSharding(mesh, PartitionSpec())


def constrain_batch(x: jax.Array, mesh: Mesh) -> jax.Array:
    """Inside a jitted step: lay a generated batch out over ``data``."""
    return jax.lax.with_sharding_constraint(x, batch_sharding(mesh, x.ndim))
