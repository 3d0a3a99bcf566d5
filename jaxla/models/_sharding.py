"""Sharding rules by parameter path: tensor parallel over a ``model`` mesh axis, FSDP over ``data``.

A :class:`ShardingRule` says, for the leaves whose "/"-joined pytree path ends with its pattern
(whole path components, as ``jaxla.lora`` targets match), which mesh axis each of the leaf's
*trailing* dimensions goes on; leading dimensions (the stacked layers L) are never split. The first
matching rule decides; a leaf no rule matches is replicated. Because rules match path endings, the
same rules lay out the params, their LoRA adapters and an optimizer state over either
(``opt/0/mu/layers/attn/q/w`` ends like ``layers/attn/q/w``).

The rules of the Llama and BERT families (:func:`sharding_rules`):

======================  =================  ==============================  =====================
leaf                    shape              split (model axis M, data D)    why
======================  =================  ==============================  =====================
attn q / k / v kernel   (L, D, N·H)        d_out on M, d_in on D           column parallel
attn q / k / v bias     (L, N·H)           on M                            with its kernel
attn o kernel           (L, N·H, D)        d_in on M, d_out on D           row parallel
mlp gate / up kernel    (L, D, F)          d_out on M, d_in on D           column parallel
mlp gate / up bias      (L, F)             on M                            with its kernel
mlp down kernel         (L, F, D)          d_in on M, d_out on D           row parallel
embedding table         (V, D)             V on M, D on D                  vocabulary parallel
lm_head kernel          (D, V)             V on M, D on D                  column parallel
LoRA ``a`` (L, r, I)    of a kernel        I as the kernel's d_in, M only  follows its kernel
LoRA ``b`` (L, O, r)    of a kernel        O as the kernel's d_out, M only follows its kernel
DoRA ``m`` (L, O)       of a kernel        O as ``b``
everything else         (norms, o / down   replicated
                        biases, BERT
                        position and
                        token-type tables)
======================  =================  ==============================  =====================

(BERT has D = N·H and no gate.) The ``data`` splits are FSDP: each device stores 1/|D| of every
large kernel and XLA gathers a kernel where a step needs it whole; ``fsdp=False`` keeps them off
``data`` (pure tensor parallelism, kernels replicated over the batch axis). Adapters are small and
never go on ``data``.

Divisibility: a dimension holding attention heads (N·H of q and o, K·H of k and v) is split in whole
heads only: a model axis that does not divide N (resp. K) is a ValueError naming the sizes, and the
head dim H is never split. Any other dimension (D, F, V, on either axis) that the axis size does not
divide stays replicated, silently, as a replicated dimension is always correct.

Quantized kernels (:class:`jaxla.quant.QArray`, stored (…, O, blocks along I)): every leaf of the
QArray (codes, scales, offsets) splits its row axis O as the kernel's d_out would be; the blocked
d_in axis is never split, so a row-parallel kernel (o, down) that is quantized is split only by
FSDP over its rows, and a quantized table by V.

Dimension legend: L layers, D model width, F MLP width, N query heads, K kv heads, H head dim,
V vocabulary, r LoRA rank, I / O a kernel's d_in / d_out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxla.lora._targets import path_str, predicate
from jaxla.models import _registry
from jaxla.models._family import Model
from jaxla.quant import _qarray

__all__ = ["ShardingRule", "param_shardings", "param_specs", "shard", "sharding_rules",
           "tree_specs"]

_MODEL, _DATA = "model", "data"  # roles in the family tables below, replaced by axis names


@dataclass(frozen=True)
class ShardingRule:
    """Leaves whose path ends with ``pattern`` put their trailing dims on the mesh axes ``spec``.

    Attributes:
      pattern: a regular expression matched against a trailing run of whole path components.
      spec: one mesh axis name (or None, unsplit) per trailing dimension of the leaf.
      heads: per entry of ``spec``, the head size H when that dimension holds attention heads
        (N·H): it may only be split in whole heads (else ValueError); None or ``()`` otherwise.
      what: a readable name of the leaf for error messages (e.g. ``"attn/q d_out (N·H)"``).
      min_ndim: the rule applies to leaves of at least this many dims (default ``len(spec)``).
    """

    pattern: str
    spec: tuple[str | None, ...]
    heads: tuple[int | None, ...] = ()
    what: str = ""
    min_ndim: int | None = None


# (path pattern, (d_in role, d_out role), (d_in heads, d_out heads) as config fields) of a kernel.
_LLAMA = (
    ("attn/q/w", (_DATA, _MODEL), (None, "num_heads")),
    ("attn/k/w", (_DATA, _MODEL), (None, "num_kv_heads")),
    ("attn/v/w", (_DATA, _MODEL), (None, "num_kv_heads")),
    ("attn/o/w", (_MODEL, _DATA), ("num_heads", None)),
    ("mlp/gate/w", (_DATA, _MODEL), (None, None)),
    ("mlp/up/w", (_DATA, _MODEL), (None, None)),
    ("mlp/down/w", (_MODEL, _DATA), (None, None)),
    ("lm_head/w", (_DATA, _MODEL), (None, None)),
)
_BERT = tuple(k for k in _LLAMA if k[0] not in ("mlp/gate/w", "lm_head/w"))
_TABLES = {"llama": ("embed/table",), "bert": ("embeddings/word",)}  # (V, D): V on model, D on data
_KERNELS = {"llama": _LLAMA, "bert": _BERT}


def _config_of(model_or_config: Any) -> Any:
    return model_or_config.config if isinstance(model_or_config, Model) else model_or_config


def sharding_rules(model_or_config: Any, *, data_axis: str | None = "data",
                   model_axis: str | None = "model", fsdp: bool = True,
                   mesh: Any = None) -> tuple[ShardingRule, ...]:
    """The family's sharding rules (see the module docstring's table) for these mesh axis names.

    Args:
      model_or_config: a :class:`jaxla.models.Model` or its config (``LlamaConfig``,
        ``BertConfig``); the config gives the head counts the rules must respect.
      data_axis: the mesh axis of the batch, used for FSDP (None: no FSDP).
      model_axis: the tensor-parallel mesh axis (None: no tensor parallelism).
      fsdp: put the other large dim of each kernel and table on ``data_axis``.
      mesh: optionally the mesh (or ``{axis: size}``) the rules are for: then the axis names and
        the head counts are checked now rather than when the rules are applied.

    Returns:
      A tuple of :class:`ShardingRule`, first match wins, for :func:`param_specs` /
      :func:`tree_specs` or ``jaxla.finetune``'s meshes.

    Raises:
      ValueError: equal axis names; with ``mesh``: an axis it lacks, or a ``model_axis`` size that
        does not divide the query or kv heads.
    """
    config = _config_of(model_or_config)
    family = _registry.family_of(config)
    if family.name not in _KERNELS:
        raise ValueError(f"no sharding rules for the {family.name!r} family")
    if data_axis is not None and data_axis == model_axis:
        raise ValueError(f"data_axis and model_axis must differ, both are {data_axis!r}")
    if not isinstance(fsdp, bool):
        raise TypeError(f"fsdp must be a bool, got {fsdp!r}")
    role = {_MODEL: model_axis, _DATA: data_axis if fsdp else None}
    model_only = {_MODEL: model_axis, _DATA: None}
    h = int(config.head_dim)
    rules = []
    for pattern, roles, heads in _KERNELS[family.name]:
        sizes = tuple(None if f is None else h for f in heads)
        names = tuple(f"{pattern[:-2]} {side}" + ("" if f is None else f" ({f} · head_dim)")
                      for side, f in zip(("d_in", "d_out"), heads, strict=True))
        din, dout = (role[r] for r in roles)
        ad_in, ad_out = (model_only[r] for r in roles)
        rules += [
            ShardingRule(pattern, (din, dout), sizes, " / ".join(names)),
            ShardingRule(pattern[:-1] + "b", (ad_out,), sizes[1:], names[1]),
            ShardingRule(pattern + "/a", (ad_in,), sizes[:1], "LoRA a of " + names[0]),
            ShardingRule(pattern + "/b", (ad_out, None), (sizes[1], None), "LoRA b of " + names[1]),
            ShardingRule(pattern + "/m", (ad_out,), sizes[1:], "DoRA m of " + names[1]),
        ]
    for table in _TABLES[family.name]:
        rules.append(ShardingRule(table, (model_axis, role[_DATA]), (), f"{table} (V, D)"))
    # A row-parallel bias (o, down) and every norm: no rule, replicated.
    rules = tuple(rules)
    if mesh is not None:
        mesh_shape = _mesh_shape(mesh)
        _check_axes(rules, mesh_shape)
        size = mesh_shape.get(model_axis, 1) if model_axis is not None else 1
        for field in ("num_heads", "num_kv_heads"):
            heads = getattr(config, field, None)
            if heads is not None and heads % size:
                raise ValueError(
                    f"mesh axis {model_axis!r} of size {size} does not divide {field}={heads} of "
                    f"the {family.name} model: tensor parallelism splits attention in whole heads "
                    f"(never within the head dim {h}); use a {model_axis!r} size dividing {heads}"
                )
    return rules


def _mesh_shape(mesh: Any) -> dict[str, int]:
    if isinstance(mesh, Mapping):
        return {str(k): int(v) for k, v in mesh.items()}
    shape = getattr(mesh, "shape", None)
    if not isinstance(shape, Mapping):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (or AbstractMesh, or a dict of axis sizes), "
                        f"got {type(mesh).__name__}")
    return dict(shape)


def _check_axes(rules: Sequence[ShardingRule], mesh_shape: Mapping[str, int]) -> None:
    used = sorted({a for r in rules for a in r.spec if a is not None})
    missing = [a for a in used if a not in mesh_shape]
    if missing:
        raise ValueError(f"sharding rules use mesh axes {missing} that the mesh does not have; its "
                         f"axes are {tuple(mesh_shape)} (pass data_axis= / model_axis= naming them, "
                         "or None for an axis the mesh lacks)")


def _leaf_spec(rule: ShardingRule, path: str, shape: tuple[int, ...],
               mesh_shape: Mapping[str, int], row_axis: int | None = None) -> PartitionSpec:
    """The spec of one leaf by ``rule``; ``row_axis`` (QArray leaves): only that axis, by the
    rule's d_out entry."""
    spec: list[Any] = [None] * len(shape)
    entries = list(zip(rule.spec, rule.heads + (None,) * (len(rule.spec) - len(rule.heads)),
                       strict=True))
    if row_axis is not None:
        positions = [(row_axis, entries[-1])]
    else:
        positions = [(len(shape) - len(entries) + i, e) for i, e in enumerate(entries)]
    for dim, (axis, head) in positions:
        size = mesh_shape.get(axis, 1) if axis is not None else 1
        if size <= 1:
            continue
        n = shape[dim]
        if head is not None:
            if n % head or (n // head) % size:
                raise ValueError(
                    f"cannot split {path!r} {shape} ({rule.what or rule.pattern}) over mesh axis "
                    f"{axis!r} of size {size}: that dimension holds {n // head} heads of "
                    f"head_dim {head}, and heads are split only whole (the head dim never); use a "
                    f"{axis!r} axis size that divides {n // head}"
                )
        elif n % size:
            continue  # not divisible: replicated (always correct)
        spec[dim] = axis
    return PartitionSpec(*spec)


def _replicated(shape: tuple[int, ...]) -> PartitionSpec:
    return PartitionSpec(*([None] * len(shape)))


def _qarray_row_axis(q: _qarray.QArray) -> int:
    return len(q.stack_shape)


def tree_specs(tree: Any, rules: Sequence[ShardingRule], mesh: Any) -> Any:
    """A pytree of ``PartitionSpec`` for ``tree`` (arrays, shape-dtype structs or QArrays) by
    ``rules`` on ``mesh`` (a Mesh, AbstractMesh or ``{axis: size}``); QArray leaves get a QArray
    of specs (its row axis split as the kernel's d_out, see the module docstring).

    Raises:
      ValueError: a rule names an axis the mesh lacks, or would split heads unevenly.
    """
    mesh_shape = _mesh_shape(mesh)
    _check_axes(rules, mesh_shape)
    matchers = [(rule, predicate(rule.pattern, "sharding rule")) for rule in rules]

    def visit(key_path, leaf):
        path = path_str(key_path)
        rule = next((r for r, match in matchers if match(path, leaf)), None)
        if _qarray.is_qarray(leaf):
            row = _qarray_row_axis(leaf)
            specs = {}
            for field in ("codes", "scales", "offsets", "scale_scales"):
                x = getattr(leaf, field)
                if x is None:
                    continue
                shape = tuple(np.shape(x))
                ok = rule is not None and len(shape) > row and leaf.ndim >= len(rule.spec)
                specs[field] = (_leaf_spec(_qarray_rule(rule, leaf), f"{path}/{field}", shape,
                                           mesh_shape, row) if ok else _replicated(shape))
            return dataclasses.replace(leaf, **specs)
        shape = tuple(np.shape(leaf))
        if rule is None or len(shape) < (len(rule.spec) if rule.min_ndim is None else rule.min_ndim):
            return _replicated(shape)
        return _leaf_spec(rule, path, shape, mesh_shape)

    return jax.tree_util.tree_map_with_path(visit, tree, is_leaf=_qarray.is_qarray)


def _qarray_rule(rule: ShardingRule, q: _qarray.QArray) -> ShardingRule:
    """The entry of ``rule`` for a QArray's row axis: d_out of a kernel, V of a table."""
    entries = list(zip(rule.spec, rule.heads + (None,) * (len(rule.spec) - len(rule.heads)),
                       strict=True))
    axis, head = entries[-1] if q.axis == -2 else entries[-2]
    return dataclasses.replace(rule, spec=(axis,), heads=(head,))


def param_specs(model_or_config: Any, params: Any, mesh: Any, *, data_axis: str | None = "data",
                model_axis: str | None = "model", fsdp: bool = True) -> Any:
    """``PartitionSpec`` pytree of ``params`` (or adapters, or an optimizer state over them) by the
    family's :func:`sharding_rules`; arguments as there, ``mesh`` a Mesh or ``{axis: size}``."""
    rules = sharding_rules(model_or_config, data_axis=data_axis, model_axis=model_axis, fsdp=fsdp,
                           mesh=mesh)
    return tree_specs(params, rules, mesh)


def param_shardings(model_or_config: Any, params: Any, mesh: jax.sharding.Mesh, *,
                    data_axis: str | None = "data", model_axis: str | None = "model",
                    fsdp: bool = True) -> Any:
    """``NamedSharding`` pytree of ``params`` on ``mesh`` (see :func:`param_specs`), for
    ``jax.device_put`` or ``jax.jit(in_shardings=...)``."""
    specs = param_specs(model_or_config, params, mesh, data_axis=data_axis, model_axis=model_axis,
                        fsdp=fsdp)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def shard(model_or_params: Any, mesh: jax.sharding.Mesh, *, config: Any = None,
          data_axis: str | None = "data", model_axis: str | None = "model",
          fsdp: bool = True) -> Any:
    """Places a model's params on ``mesh`` by its family's rules (tensor parallel + FSDP).

    Args:
      model_or_params: a :class:`jaxla.models.Model`, or a params (or adapters) pytree with
        ``config=`` its model's config.
      mesh: the device mesh; it must have the axes named by ``data_axis`` / ``model_axis``.
      config: the config when ``model_or_params`` is a pytree.
      data_axis, model_axis, fsdp: as :func:`sharding_rules`.

    Returns:
      The Model with its params placed (``jax.device_put``), or the placed pytree.

    Raises:
      ValueError: an axis name not in the mesh, or a model axis that does not divide the number
        of (kv) heads.

    Example::

        mesh = jax.make_mesh((4, 2), ("data", "model"))
        model = models.shard(models.load("smollm2-135m-instruct"), mesh)  # 9 / 3 heads: model ∈ {1, 3}
    """
    if isinstance(model_or_params, Model):
        if config is not None:
            raise ValueError("config= is for a params pytree; a Model carries its own config")
        model = model_or_params
        placed = jax.device_put(model.params, param_shardings(
            model, model.params, mesh, data_axis=data_axis, model_axis=model_axis, fsdp=fsdp))
        return dataclasses.replace(model, params=placed)
    if config is None:
        raise TypeError("shard(params, mesh) needs config= (the model's config) to know its family "
                        "and head counts; or pass the Model")
    return jax.device_put(model_or_params, param_shardings(
        config, model_or_params, mesh, data_axis=data_axis, model_axis=model_axis, fsdp=fsdp))
