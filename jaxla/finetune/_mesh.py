"""Device meshes for the fine-tune demos, on JAX's own SPMD engine (``jax.sharding``).

The mesh has two axes: ``data`` (the batch is split over it) and ``model`` (kernels and adapters are
split over it, by rule). Sharding is expressed with ``NamedSharding``/``PartitionSpec`` on the jitted
step's inputs and outputs plus one ``with_sharding_constraint`` on each generated batch; XLA's
partitioner inserts the collectives. The default mesh is 1 × 1, so the same program runs unchanged on
one device, and the loss trajectory on a larger mesh matches it up to float reassociation.

Sharding rules (applied to parameter and optimizer-state pytrees alike, by the leaf's dict key):

- ``"w"`` kernels ``(..., d_in, d_out)``: ``d_out`` over ``model``;
- LoRA ``"b"`` ``(..., d_out, r)`` (rank ≥ 2): ``d_out`` over ``model``, matching the kernel;
- LoRA ``"a"`` ``(..., r, d_in)``, biases, norms, embeddings, scalars: replicated;
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

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxla.finetune import _config, _rundir

__all__ = ["batch_sharding", "make_mesh", "partition_spec", "replicated", "tree_shardings"]

AXES = ("data", "model")


def make_mesh(mesh_cfg: _config.MeshConfig) -> Mesh:
    """A ``(data, model)`` mesh over the first ``data * model`` devices.

    Raises:
      RunError: when more devices are requested than exist.
    """
    devices = jax.devices()
    need = mesh_cfg.data * mesh_cfg.model
    if need > len(devices):
        raise _rundir.RunError(
            f"the mesh needs mesh.data × mesh.model = {mesh_cfg.data} × {mesh_cfg.model} = {need} "
            f"devices but only {len(devices)} {devices[0].platform} device(s) exist. Lower mesh.data"
            " / mesh.model (e.g. --set mesh.data=1 --set mesh.model=1), or on CPU simulate devices "
            f"with 'jaxla finetune --cpu-devices {need}' (or "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={need})."
        )
    grid = np.asarray(devices[:need], dtype=object).reshape(mesh_cfg.data, mesh_cfg.model)
    return Mesh(grid, AXES)


def partition_spec(path: tuple, shape: tuple[int, ...], model_size: int) -> PartitionSpec:
    """The rule above for one leaf, given its pytree path and shape."""
    name = None
    for entry in reversed(path):
        # Dict keys name kernels; attribute names name the fields of a jaxla.lora.Adapter.
        if isinstance(entry, jax.tree_util.DictKey):
            name = entry.key
            break
        if isinstance(entry, jax.tree_util.GetAttrKey):
            name = entry.name
            break
    spec = [None] * len(shape)
    if len(shape) >= 2 and name in ("w", "b"):
        axis = len(shape) - 1 if name == "w" else len(shape) - 2
        if shape[axis] % model_size == 0 and model_size > 1:
            spec[axis] = "model"
    return PartitionSpec(*spec)


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """A pytree of ``NamedSharding`` for ``tree`` (arrays or shape-dtype structs) by the rules."""
    model_size = mesh.shape["model"]
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, partition_spec(path, np.shape(x), model_size)), tree
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
