"""Device meshes for the fine-tune demos, on JAX's own SPMD engine (``jax.sharding``).

The mesh has two axes: ``data`` (the batch is split over it) and ``model`` (kernels and adapters are
split over it, by rule). Sharding is expressed with ``NamedSharding``/``PartitionSpec`` on the jitted
step's inputs and outputs plus one ``with_sharding_constraint`` on each generated batch; XLA's
partitioner inserts the collectives. The default mesh is 1 × 1, so the same program runs unchanged on
one device, and the loss trajectory on a larger mesh matches it up to float reassociation.

Sharding rules are :class:`jaxla.models.ShardingRule` records: regular expressions over a leaf's
"/"-joined pytree path, matched against a trailing run of whole path components exactly as
``jaxla.lora`` targets are, each putting the leaf's trailing dims on mesh axes; they are applied to
parameter, frozen and optimizer-state pytrees alike (optimizer state paths end with the parameter's
path, e.g. ``0/mu/layers/0/attn/q/w``). The first rule that matches decides; a dimension the axis
size does not divide stays replicated. Two rule sets:

- :data:`SHARDING_RULES`, the synthetic demos' (``lowrank``, ``tiny_lm``): ``w`` kernels
  ``(..., d_in, d_out)`` put ``d_out`` on ``model``; ``w/b``, the LoRA ``b`` ``(..., d_out, r)`` of a
  kernel ``w``, its ``d_out`` likewise; everything else (LoRA ``a``, biases ``b`` even when stacked
  ``(L, d_out)``, norms, embeddings, scalars) replicated.
- :func:`model_rules`, a real model's (Llama, BERT: :func:`jaxla.models.sharding_rules`): q/k/v and
  MLP gate/up column parallel over ``model``, o and down row parallel, FSDP over ``data`` (the other
  dim of each kernel and the embedding table), LoRA ``a``/``b`` following their kernel's ``model``
  split, heads split only whole. A real-model demo passes them to
  ``_runner.train_phase(..., rules=_mesh.model_rules(model.config, ctx.config.mesh))``, which lays
  out its state and its ``frozen`` pytree (the model's params) by them; that one argument is all a
  new real-model demo needs (and :func:`model_rules` in its ``preflight`` to refuse a bad mesh
  early).

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
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxla.finetune import _config
from jaxla.finetune._errors import ConfigError, RunError
from jaxla.models import _sharding
from jaxla.models._sharding import ShardingRule

__all__ = [
    "SHARDING_RULES",
    "batch_sharding",
    "constrain_batch",
    "make_mesh",
    "model_rules",
    "replicated",
    "tree_shardings",
]

AXES = ("data", "model")

SHARDING_RULES: tuple[ShardingRule, ...] = (
    ShardingRule(r"w", ("model",), min_ndim=2),  # kernel (..., d_in, d_out): d_out
    ShardingRule(r"w/b", ("model", None)),       # LoRA b (..., d_out, r) of a kernel w: d_out
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


def model_rules(config: Any, mesh_cfg: _config.MeshConfig) -> tuple[ShardingRule, ...]:
    """A real model's sharding rules on the ``(data, model)`` mesh (see the module docstring).

    Args:
      config: the model's config (``LlamaConfig``, ``BertConfig``).
      mesh_cfg: the run's ``[mesh]`` section.

    Raises:
      ConfigError: ``mesh.model`` does not divide the model's query or kv heads.
    """
    try:
        return _sharding.sharding_rules(config, data_axis="data", model_axis="model",
                                        mesh={"data": mesh_cfg.data, "model": mesh_cfg.model})
    except ValueError as e:
        raise ConfigError(f"config key mesh.model = {mesh_cfg.model}: {e}.") from None


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[ShardingRule] = SHARDING_RULES) -> Any:
    """A pytree of ``NamedSharding`` for ``tree`` (arrays, shape-dtype structs, QArrays) by
    ``rules``."""
    specs = _sharding.tree_specs(tree, rules, mesh)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis over ``data``, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec("data", *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated on the mesh."""
    return NamedSharding(mesh, PartitionSpec())


def constrain_batch(x: jax.Array, mesh: Mesh) -> jax.Array:
    """Inside a jitted step: lay a generated batch out over ``data``."""
    return jax.lax.with_sharding_constraint(x, batch_sharding(mesh, x.ndim))
