"""Config sections: the shared ones, the machinery every section uses, and the text forms of a config.

A config is the shared sections ``[run] [train] [optim] [lora] [mesh]`` (defined here) plus the
section of the demo ``run.demo`` names, which the demo's own module defines (see
:mod:`jaxla.finetune.demos`). Every section is a frozen dataclass whose fields carry their range
check as metadata (``check=(predicate, what is expected)``); :func:`build_section` converts and
validates one TOML table into it. A field with ``operational=True`` metadata only changes how a run
reports, never its numbers: checkpoints stay valid across changes to it. A field with
``learning_rate_of=PHASE`` metadata is the learning rate of that phase of the demo (instead of
``optim.learning_rate``): ``--resume`` may change it like the [optim] settings.

This module knows nothing about the demos: :class:`jaxla.finetune.Config` and the loaders that find a
demo's section by name live in :mod:`jaxla.finetune._loader`; the functions here work on any config
record whose fields are the shared sections and ``section`` (the demo's).

Any problem (unknown key, wrong type, out-of-range value) raises :class:`ConfigError` with one
message that names the key, the value and what was expected.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from jaxla.finetune._errors import ConfigError

__all__ = [
    "SHARED_SECTIONS",
    "LoraConfig",
    "MeshConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "build_section",
    "choice",
    "config_fingerprint",
    "config_to_dict",
    "config_to_toml",
    "numeric_dict",
    "section_items",
]


STRS = tuple[str, ...]


# Range checks attached to fields as metadata: (predicate, description of what is expected).
def _positive(v) -> bool:
    return v > 0


def _non_negative(v) -> bool:
    return v >= 0


POS = {"check": (_positive, "a value > 0")}
NONNEG = {"check": (_non_negative, "a value >= 0")}


def choice(*options: str) -> dict:
    """Field metadata accepting only ``options``."""
    return {"check": (lambda v: v in options, "one of " + ", ".join(repr(o) for o in options))}


# jax.random.key takes a C long: seeds beyond it overflow deep inside JAX.
MAX_SEED = 2**63 - 1
_SEED = {"check": (lambda v: 0 <= v <= MAX_SEED, f"an integer in [0, 2**63 - 1 = {MAX_SEED}]")}

# Characters that would make a run name a path or a glob pattern (latest_run_dir globs name-*).
_NAME_FORBIDDEN = set('/\\*?[]') | {chr(c) for c in range(32)} | {"\x7f"}


def _plain_name(v: str) -> bool:
    return v not in ("", ".", "..") and not (set(v) & _NAME_FORBIDDEN) and len(v) <= 200


_NAME = {"check": (_plain_name, "a plain directory name (not empty, '.' or '..'; no '/', '\\', "
                                "'*', '?', '[', ']' or control characters; at most 200 characters)")}


@dataclass(frozen=True)
class RunConfig:
    """What to run and how it reports (none of these change the numbers except ``demo``/``seed``).

    ``demo`` must name a registered demo (checked by the loader against the registry).
    """

    demo: str = "lowrank"
    name: str = field(default="lowrank", metadata=_NAME)
    seed: int = field(default=0, metadata=_SEED)
    log_every: int = field(default=50, metadata=POS)
    checkpoint_every: int = field(default=100, metadata=POS)
    keep_checkpoints: int = field(default=2, metadata=POS)
    plots: bool = True
    # XLA backend optimisation level 0: compiles several times faster, runs slower. For tests and
    # toy sizes; part of the fingerprint since generated code may round differently.
    fast_compile: bool = False


@dataclass(frozen=True)
class TrainConfig:
    """The adapter training phase."""

    steps: int = field(default=300, metadata=POS)
    batch_size: int = field(default=64, metadata=POS)


@dataclass(frozen=True)
class OptimConfig:
    """The Optax optimizer of the adapter phase: warmup then constant or cosine decay."""

    optimizer: str = field(default="adam", metadata=choice("adam", "adamw", "sgd"))
    learning_rate: float = field(default=0.01, metadata=POS)
    schedule: str = field(default="cosine", metadata=choice("constant", "cosine"))
    warmup_steps: int = field(default=20, metadata=NONNEG)
    grad_clip: float = field(default=0.0, metadata=NONNEG)
    weight_decay: float = field(default=0.0, metadata=NONNEG)


def _dropout_rate(v) -> bool:
    return 0 <= v < 1


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters: ΔW = alpha / rank · aᵀbᵀ on every targeted kernel.

    ``init``: kaiming / gaussian draw ``a`` (b = 0); pissa / olora start from the top-r SVD / the QR
    of each weight and train on the residual base. ``rslora``: scale ``alpha / √rank``. ``dropout``:
    LoRA dropout on the adapter input (demos whose model applies ``lora.linear``). ``dora``: DoRA's
    trainable magnitude per output column. ``loraplus_ratio``: LoRA+ learning-rate ratio of b to a
    (1 = plain LoRA). The defaults are plain LoRA.
    """

    rank: int = field(default=8, metadata=POS)
    alpha: float = field(default=8.0, metadata=POS)
    init: str = field(default="kaiming", metadata=choice("kaiming", "gaussian", "pissa", "olora"))
    targets: tuple[str, ...] = ("w",)
    rslora: bool = False
    dropout: float = field(default=0.0, metadata={"check": (_dropout_rate, "a value in [0, 1)")})
    dora: bool = False
    loraplus_ratio: float = field(default=1.0, metadata=POS)


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh: the batch is sharded over ``data``, kernels and adapters over ``model``."""

    data: int = field(default=1, metadata=POS)
    model: int = field(default=1, metadata=POS)


SHARED_SECTIONS: dict[str, type] = {
    "run": RunConfig, "train": TrainConfig, "optim": OptimConfig, "lora": LoraConfig,
    "mesh": MeshConfig,
}

# Shared keys that only change how a run reports or where it writes, never its numbers.
_OPERATIONAL = {
    ("run", "name"),
    ("run", "log_every"),
    ("run", "checkpoint_every"),
    ("run", "keep_checkpoints"),
    ("run", "plots"),
}


def field_types(cls: type) -> dict[str, Any]:
    """``{field name: type}`` of a section dataclass."""
    return typing.get_type_hints(cls)


def type_name(tp) -> str:
    if tp == STRS:
        return "a list of strings"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[tp]


def _convert(section: str, key: str, value: Any, tp) -> Any:
    where = f"config key {section}.{key} = {value!r}"
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{where} is invalid: expected a finite number.")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp == STRS:
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return tuple(value)
    raise ConfigError(
        f"{where} has the wrong type {type(value).__name__}: expected {type_name(tp)}."
    )


def build_section(section: str, cls: type, values: Mapping[str, Any]):
    """The section dataclass ``cls`` from a mapping of its keys, converted and range-checked."""
    hints = field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(
                f"unknown config key {section}.{key} (value {value!r}); the [{section}] section "
                f"accepts: {', '.join(fields)}."
            )
        value = _convert(section, key, value, hints[key])
        check = fields[key].metadata.get("check")
        if check is not None and not check[0](value):
            raise ConfigError(f"config key {section}.{key} = {value!r} is invalid: expected {check[1]}.")
        kwargs[key] = value
    return cls(**kwargs)


def section_items(cfg: Any) -> list[tuple[str, Any]]:
    """``[(section name, section dataclass)]``: the shared sections, then the demo's."""
    items = [(name, getattr(cfg, name)) for name in SHARED_SECTIONS]
    items.append((cfg.run.demo, cfg.section))
    return items


def _operational(cfg: Any) -> set[tuple[str, str]]:
    keys = set(_OPERATIONAL)
    for f in dataclasses.fields(cfg.section):
        if f.metadata.get("operational"):
            keys.add((cfg.run.demo, f.name))
    return keys


def phase_learning_rate_keys(cfg: Any) -> dict[str, str]:
    """``{phase: "demo.key"}`` for the demo fields marked ``learning_rate_of`` (other phases use
    ``optim.learning_rate``)."""
    return {f.metadata["learning_rate_of"]: f"{cfg.run.demo}.{f.name}"
            for f in dataclasses.fields(cfg.section) if f.metadata.get("learning_rate_of")}


def config_to_dict(cfg: Any) -> dict[str, dict[str, Any]]:
    """Nested plain dict ``{section: {key: value}}`` of a config (the demo's section last)."""
    out = {}
    for name, section in section_items(cfg):
        values = dataclasses.asdict(section)
        out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string literal is a valid TOML basic string
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def config_to_toml(cfg: Any) -> str:
    """The resolved config as TOML text that ``load_config`` reads back to an equal config."""
    lines = []
    for section, values in config_to_dict(cfg).items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items())
        lines.append("")
    return "\n".join(lines)


def config_fingerprint(cfg: Any) -> str:
    """Hash of every key that changes the numbers of a run (operational keys excluded)."""
    data = config_to_dict(cfg)
    for section, key in _operational(cfg):
        data.get(section, {}).pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def numeric_dict(cfg: Any) -> dict[str, Any]:
    """Flat ``section.key -> value`` of the keys in :func:`config_fingerprint` (to explain mismatches)."""
    skip = _operational(cfg)
    return {
        f"{s}.{k}": v
        for s, values in config_to_dict(cfg).items()
        for k, v in values.items()
        if (s, k) not in skip
    }
