"""Compiled attention backends run per shard when query/key/value are sharded over batch and/or heads.

The "cpu" and "pallas" backends are custom calls, opaque to XLA's SPMD partitioner: given sharded
operands it would gather them and have every device compute the whole attention. Attention is
independent per batch row and per kv head (with its G query heads), so :func:`per_shard` wraps the
backend's ``attend`` in ``jax.shard_map`` over the mesh axes that split the batch (B) and head
(N, K) axes: each device runs the kernel on its own rows and heads only, and the result keeps the
input sharding. Gradients go through the shard_map too (the backend's own VJP, per shard).

The sharding is read at trace time from the arrays' types (``jax.typeof(x).sharding``), which
carries it in explicit-sharding mode (a mesh made with ``axis_types=(AxisType.Explicit, ...)``, used
with ``jax.set_mesh``). With automatic sharding (``Mesh`` + ``in_shardings``, or eager calls on
arrays placed on an Auto mesh) the partitioning is not known when tracing, and the backend runs as
before (XLA gathers, every device computes everything).

Rules: the batch and head axes may be split (the head axes of query, key and value by the same mesh
axes, so that a query head's kv head is on the same device; jax already requires K to divide); the
sequence may not (that is :func:`jaxla.ring_attention`'s job: a split sequence is gathered, logged
at DEBUG), and a split head dim H or Hv is an error. Bias and mask arrays are not partitioned (the
compiled backends do not take them).

Dimension legend: B batch, T query length, S key length, N query heads, K kv heads, H head dim,
Hv value head dim.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxla.attention._args import AttentionArgs

_log = logging.getLogger("jaxla.attention")

# Backends that are opaque custom calls to XLA's partitioner.
PARTITIONED = ("cpu", "pallas")
# Backends whose results are not typed for shard_map's varying manual axes (check_vma).
UNTYPED = ("pallas",)


def _spec(x) -> tuple | None:
    """The (per-dimension) mesh axes of x, or None when no concrete named sharding is known."""
    try:
        sharding = jax.typeof(x).sharding
    except (AttributeError, TypeError):
        return None
    if not isinstance(sharding, NamedSharding) or sharding.mesh.empty:
        return None
    spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
    return spec


def _axes(entry) -> tuple:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def per_shard(name: str, attend, args: AttentionArgs):
    """``attend`` (a backend's) wrapped to run per batch/head shard, or ``attend`` itself.

    Raises:
      ValueError: the head dim H or Hv is split, or query and key/value batch or heads are split
        over different mesh axes.
    """
    if name not in PARTITIONED or args.bias is not None or args.mask is not None:
        return attend
    specs = [_spec(x) for x in (args.query, args.key, args.value)]
    if any(s is None for s in specs):
        return attend
    qs, ks, vs = specs
    if not any(qs + ks + vs):
        return attend  # replicated: nothing to partition
    shapes = (f"query {args.query.shape} {P(*qs)}, key {args.key.shape} {P(*ks)}, "
              f"value {args.value.shape} {P(*vs)}")
    if qs[3] or ks[3] or vs[3]:
        raise ValueError(
            f"dot_product_attention: the head dim (H / Hv, last axis) must not be sharded; got "
            f"{shapes}. Shard batch (B) and heads (N, K) instead"
        )
    if qs[1] or ks[1] or vs[1]:
        _log.debug("attention %r: the sequence axis is sharded (%s); XLA gathers it (use "
                   "jaxla.ring_attention to keep it split)", name, shapes)
        return attend
    mesh = jax.typeof(args.query).sharding.mesh
    batch_axes, head_axes = _axes(qs[0]), _axes(qs[2])
    if (_axes(ks[0]), _axes(vs[0])) != (batch_axes, batch_axes) or (
            (_axes(ks[2]), _axes(vs[2])) != (head_axes, head_axes)):
        raise ValueError(
            "dot_product_attention: query, key and value must split batch and heads over the same "
            f"mesh axes (so that each device holds whole kv heads with their query heads); got "
            f"{shapes}"
        )
    b, h = qs[0], qs[2]
    rows, per_batch = P(b, None, h, None), P(b)
    arrays = dict(query=args.query, key=args.key, value=args.value,
                  q_segment_ids=args.q_segment_ids, kv_segment_ids=args.kv_segment_ids,
                  query_seq_lengths=args.query_seq_lengths,
                  key_value_seq_lengths=args.key_value_seq_lengths)
    specs = dict(query=rows, key=rows, value=rows, q_segment_ids=P(b, None),
                 kv_segment_ids=P(b, None), query_seq_lengths=per_batch,
                 key_value_seq_lengths=per_batch)
    present = [k for k, x in arrays.items() if x is not None]

    def wrapped(args_: AttentionArgs, **options):
        def local(*xs):
            return attend(dataclasses.replace(args_, **dict(zip(present, xs, strict=True))),
                          **options)

        # The "cpu" kernel types its results and gradients as varying over the mesh axes its
        # operands vary over (jaxla.attention._vma); the Pallas kernels' pallas_call out_shapes
        # carry no such type yet, so their shard_map is unchecked.
        run = jax.shard_map(local, mesh=mesh, in_specs=tuple(specs[k] for k in present),
                            out_specs=(rows, P(b, None, h)), check_vma=name not in UNTYPED)
        return run(*(getattr(args_, k) for k in present))

    return wrapped
