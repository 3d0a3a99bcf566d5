"""Key paths of arbitrary parameter pytrees, target selection and per-path settings.

Every leaf of a parameter pytree is named by its "/"-joined key path: dict keys, attribute names and
sequence indices in order, e.g. ``"params/Dense_0/kernel"`` (Flax linen), ``"layers/0/kernel/value"``
(Flax NNX state), ``"blocks/0/mlp/up/w"`` (jaxla or plain dicts), ``"layers/1/weight"`` (Equinox).
Adapters are keyed by these strings, so they are independent of the container types.

A pattern (in ``targets`` and in every per-path mapping) is a regular expression that must match a
trailing run of whole path components: ``"w"`` matches ``"mlp/up/w"`` but not ``"mlp/down/b"``,
``"up/w"`` matches ``"blocks/0/up/w"``, ``"(q|v)_proj/kernel"`` matches both projections, and
``".*kernel.*"`` matches any path with a kernel component.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import jax
import numpy as np

from jaxla.quant import _qarray

__all__ = ["TargetSpec", "flatten_with_paths", "path_str", "predicate", "resolve", "select_targets"]

TargetSpec = str | Sequence[str] | Callable[[str, Any], bool]
T = TypeVar("T")

_MAX_LISTED = 60


def _key_str(k: Any) -> str:
    tu = jax.tree_util
    if isinstance(k, tu.DictKey):
        return str(k.key)
    if isinstance(k, tu.GetAttrKey):
        return k.name
    if isinstance(k, tu.SequenceKey):
        return str(k.idx)
    if isinstance(k, tu.FlattenedIndexKey):
        return str(k.key)
    return str(k)


def path_str(key_path: Sequence[Any]) -> str:
    """The "/"-joined name of a ``jax.tree_util`` key path."""
    return "/".join(_key_str(k) for k in key_path)


def flatten_with_paths(tree: Any) -> list[tuple[str, Any]]:
    """``[(path, leaf), ...]`` in pytree order; raises if two leaves would share a name."""
    # A quantized kernel is one parameter (its codes and scales are not separate targets).
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_qarray.is_qarray)
    out = [(path_str(p), leaf) for p, leaf in flat]
    seen: set[str] = set()
    for name, _leaf in out:
        if name in seen:
            raise ValueError(f"two parameter leaves share the path {name!r}; rename one of them")
        seen.add(name)
    return out


def describe_paths(named: Sequence[tuple[str, Any]]) -> str:
    """A readable list of paths and shapes for error messages (truncated when long)."""
    lines = [f"  {name} {tuple(np.shape(leaf))}" for name, leaf in named[:_MAX_LISTED]]
    if len(named) > _MAX_LISTED:
        lines.append(f"  ... and {len(named) - _MAX_LISTED} more")
    return "\n".join(lines) if lines else "  (the pytree has no leaves)"


def _compile(pattern: str, what: str) -> re.Pattern:
    """A regex that matches the end of a path at a "/" boundary (PEFT's suffix rule)."""
    if not isinstance(pattern, str):
        raise TypeError(f"{what} must be a regex string, got {type(pattern).__name__} {pattern!r}")
    try:
        re.compile(pattern)
        return re.compile(rf"(?:^|/)(?:{pattern})$")
    except re.error as e:
        raise ValueError(f"{what} {pattern!r} is not a valid regular expression: {e}") from None


def predicate(targets: TargetSpec, what: str) -> Callable[[str, Any], bool]:
    """``targets`` (regex, regexes or callable) as a callable ``(path, leaf) -> bool``."""
    if callable(targets):
        return targets
    if isinstance(targets, str):
        rx = _compile(targets, what)
        return lambda name, leaf: rx.search(name) is not None
    if isinstance(targets, Sequence) and targets:
        rxs = [_compile(t, what) for t in targets]
        return lambda name, leaf: any(rx.search(name) for rx in rxs)
    raise TypeError(
        f"{what} must be a regex string, a non-empty sequence of regex strings, or a callable "
        f"(path, leaf) -> bool, got {targets!r}"
    )


def select_targets(params: Any, targets: TargetSpec) -> list[tuple[str, Any]]:
    """The ``(path, leaf)`` pairs of ``params`` that ``targets`` chooses (see the pattern rule above).

    Raises:
      ValueError: nothing matched; the message lists every available path with its shape.
    """
    pred = predicate(targets, "targets")
    named = flatten_with_paths(params)
    chosen = [(name, leaf) for name, leaf in named if pred(name, leaf)]
    if not chosen:
        raise ValueError(
            f"targets {targets!r} matched no parameter; available paths (shape):\n"
            + describe_paths(named)
        )
    return chosen


def resolve(setting: T | Mapping[str, T] | None, name: str, default: T, what: str) -> T:
    """A per-path setting: a single value, or a mapping from regex to value (first match wins)."""
    if setting is None:
        return default
    if isinstance(setting, Mapping):
        for pattern, value in setting.items():
            if _compile(pattern, f"{what} key").search(name):
                return value
        return default
    return setting  # type: ignore[return-value]
