"""Fine-tune configuration: frozen dataclasses filled from TOML, validated on load.

A config has one section per dataclass below (``[run]``, ``[train]``, ``[optim]``, ``[lora]``,
``[mesh]``, and the demo's own ``[lowrank]`` or ``[tiny_lm]``). Every key is optional; the dataclass
defaults are the default demo, and ``configs/lowrank.toml`` spells the same values out (a test keeps
the two identical), so an installed jaxla needs no data files to run its default demo.

Any problem (unknown section or key, wrong type, out-of-range value, inconsistent values) raises
:class:`ConfigError` with one message that names the key, the value and what was expected.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Config",
    "ConfigError",
    "LoraConfig",
    "LowRankConfig",
    "MeshConfig",
    "OptimConfig",
    "RunConfig",
    "TinyLMConfig",
    "TrainConfig",
    "apply_overrides",
    "config_fingerprint",
    "config_from_dict",
    "config_to_dict",
    "config_to_toml",
    "load_config",
]


_STRS = tuple[str, ...]


class ConfigError(ValueError):
    """A config file or override is missing, malformed or invalid (the CLI exits with status 2)."""


# Range checks attached to fields as metadata: (predicate, description of what is expected).
def _positive(v) -> bool:
    return v > 0


def _non_negative(v) -> bool:
    return v >= 0


_POS = {"check": (_positive, "a value > 0")}
_NONNEG = {"check": (_non_negative, "a value >= 0")}


def _choice(*options: str) -> dict:
    return {"check": (lambda v: v in options, "one of " + ", ".join(repr(o) for o in options))}


@dataclass(frozen=True)
class RunConfig:
    """What to run and how it reports (none of these change the numbers except ``demo``/``seed``)."""

    demo: str = field(default="lowrank", metadata=_choice("lowrank", "tiny_lm"))
    name: str = "lowrank"
    seed: int = field(default=0, metadata=_NONNEG)
    log_every: int = field(default=50, metadata=_POS)
    checkpoint_every: int = field(default=100, metadata=_POS)
    keep_checkpoints: int = field(default=2, metadata=_POS)
    plots: bool = True
    # XLA backend optimisation level 0: compiles several times faster, runs slower. For tests and
    # toy sizes; part of the fingerprint since generated code may round differently.
    fast_compile: bool = False


@dataclass(frozen=True)
class TrainConfig:
    """The adapter training phase."""

    steps: int = field(default=300, metadata=_POS)
    batch_size: int = field(default=64, metadata=_POS)


@dataclass(frozen=True)
class OptimConfig:
    """The Optax optimizer of the adapter phase: warmup then constant or cosine decay."""

    optimizer: str = field(default="adam", metadata=_choice("adam", "adamw", "sgd"))
    learning_rate: float = field(default=0.01, metadata=_POS)
    schedule: str = field(default="cosine", metadata=_choice("constant", "cosine"))
    warmup_steps: int = field(default=20, metadata=_NONNEG)
    grad_clip: float = field(default=0.0, metadata=_NONNEG)
    weight_decay: float = field(default=0.0, metadata=_NONNEG)


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters: ΔW = alpha / rank · aᵀbᵀ on every targeted kernel."""

    rank: int = field(default=8, metadata=_POS)
    alpha: float = field(default=8.0, metadata=_POS)
    init: str = field(default="kaiming", metadata=_choice("kaiming", "gaussian"))
    targets: tuple[str, ...] = ("w",)


@dataclass(frozen=True)
class LowRankConfig:
    """The default demo: recover a known low-rank update ΔW* of a frozen (d_in, d_out) matrix W."""

    d_in: int = field(default=768, metadata=_POS)
    d_out: int = field(default=3072, metadata=_POS)
    true_rank: int = field(default=8, metadata=_POS)
    delta_scale: float = field(default=2.0, metadata=_POS)
    noise: float = field(default=0.0, metadata=_NONNEG)
    eval_examples: int = field(default=1024, metadata=_POS)


@dataclass(frozen=True)
class TinyLMConfig:
    """The tiny decoder-only transformer demo: pretrain on one task, LoRA-adapt to another."""

    digits: int = field(default=10, metadata=_POS)
    length: int = field(default=6, metadata=_POS)
    d_model: int = field(default=64, metadata=_POS)
    n_heads: int = field(default=4, metadata=_POS)
    n_layers: int = field(default=2, metadata=_POS)
    d_ff: int = field(default=256, metadata=_POS)
    pretrain_task: str = field(default="copy", metadata=_choice("copy", "reverse", "sort", "shift"))
    adapt_task: str = field(default="reverse", metadata=_choice("copy", "reverse", "sort", "shift"))
    pretrain_steps: int = field(default=600, metadata=_POS)
    pretrain_learning_rate: float = field(default=3e-3, metadata=_POS)
    full_ft_learning_rate: float = field(default=1e-3, metadata=_POS)
    full_ft_baseline: bool = True
    eval_examples: int = field(default=512, metadata=_POS)
    generations: int = field(default=4, metadata=_NONNEG)


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh: the batch is sharded over ``data``, kernels and adapters over ``model``."""

    data: int = field(default=1, metadata=_POS)
    model: int = field(default=1, metadata=_POS)


@dataclass(frozen=True)
class Config:
    """A complete, validated fine-tune configuration."""

    run: RunConfig = RunConfig()
    train: TrainConfig = TrainConfig()
    optim: OptimConfig = OptimConfig()
    lora: LoraConfig = LoraConfig()
    mesh: MeshConfig = MeshConfig()
    lowrank: LowRankConfig = LowRankConfig()
    tiny_lm: TinyLMConfig = TinyLMConfig()


_SECTIONS: dict[str, type] = typing.get_type_hints(Config)
_DEMO_SECTIONS = {"lowrank", "tiny_lm"}

# Keys that only change how a run reports or where it writes, never its numbers: a checkpoint
# stays valid across changes to these.
_OPERATIONAL = {
    ("run", "name"),
    ("run", "log_every"),
    ("run", "checkpoint_every"),
    ("run", "keep_checkpoints"),
    ("run", "plots"),
    ("tiny_lm", "generations"),
}


def _type_name(tp) -> str:
    if tp == _STRS:
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
    elif tp == _STRS:
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return tuple(value)
    raise ConfigError(
        f"{where} has the wrong type {type(value).__name__}: expected {_type_name(tp)}."
    )


def _build_section(section: str, cls: type, values: Mapping[str, Any]):
    hints = typing.get_type_hints(cls)
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


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """Builds and validates a :class:`Config` from nested mappings (e.g. parsed TOML)."""
    sections = {}
    for name, values in data.items():
        if name not in _SECTIONS:
            raise ConfigError(
                f"unknown config section [{name}]; expected sections: {', '.join(_SECTIONS)}."
            )
        if not isinstance(values, Mapping):
            raise ConfigError(
                f"config section [{name}] must be a table of keys, got {type(values).__name__} "
                f"{values!r}."
            )
        sections[name] = _build_section(name, _SECTIONS[name], values)
    cfg = Config(**sections)
    demo = cfg.run.demo
    for other in _DEMO_SECTIONS - {demo}:
        if other in data:
            raise ConfigError(
                f"config section [{other}] does not apply to run.demo = {demo!r}; remove it or set "
                f"run.demo = {other!r}."
            )
    _check_consistency(cfg)
    return cfg


def _check_consistency(cfg: Config) -> None:
    """Cross-key checks that single-key ranges cannot express."""
    if cfg.train.batch_size % cfg.mesh.data:
        raise ConfigError(
            f"config key train.batch_size = {cfg.train.batch_size} is not divisible by the data "
            f"axis mesh.data = {cfg.mesh.data}: expected a multiple of {cfg.mesh.data} so every "
            "device gets the same number of examples."
        )
    if cfg.run.demo == "lowrank":
        lr = cfg.lowrank
        limit = min(lr.d_in, lr.d_out)
        if cfg.lora.rank > limit:
            raise ConfigError(
                f"config key lora.rank = {cfg.lora.rank} is too large: expected at most "
                f"min(lowrank.d_in, lowrank.d_out) = {limit}."
            )
        if lr.true_rank > limit:
            raise ConfigError(
                f"config key lowrank.true_rank = {lr.true_rank} is too large: expected at most "
                f"min(lowrank.d_in, lowrank.d_out) = {limit}."
            )
    else:
        tl = cfg.tiny_lm
        if tl.d_model % tl.n_heads or (tl.d_model // tl.n_heads) % 2:
            raise ConfigError(
                f"config key tiny_lm.n_heads = {tl.n_heads} does not fit tiny_lm.d_model = "
                f"{tl.d_model}: expected d_model divisible by n_heads with an even head dimension "
                "(RoPE rotates pairs of features)."
            )
        if cfg.lora.rank > tl.d_model:
            raise ConfigError(
                f"config key lora.rank = {cfg.lora.rank} is too large: expected at most "
                f"tiny_lm.d_model = {tl.d_model}."
            )
        if tl.pretrain_task == tl.adapt_task:
            raise ConfigError(
                f"config key tiny_lm.adapt_task = {tl.adapt_task!r} equals tiny_lm.pretrain_task: "
                "expected a different task to adapt to."
            )


def load_config(path: str | Path | None) -> Config:
    """Loads and validates a TOML config; ``None`` gives the default demo (:class:`Config`())."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist.") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {str(path)!r} is a directory, expected a TOML file.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {e}.") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {e}.") from None
    try:
        return config_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _parse_override_value(text: str, tp, key: str) -> Any:
    where = f"--set {key}={text}"
    if tp is str:
        return text
    if tp == _STRS:
        return tuple(part.strip() for part in text.split(",") if part.strip())
    if tp is bool:
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
    else:
        try:
            return tp(text.replace("_", "")) if tp is int else float(text)
        except ValueError:
            pass
    raise ConfigError(f"{where}: {text!r} cannot be read as {_type_name(tp)}.")


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """Applies ``section.key=value`` overrides (converted to the key's type) and revalidates."""
    data = config_to_dict(cfg, only_demo=False)
    touched: set[str] = set()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} is malformed: expected section.key=value.")
        dotted, text = item.split("=", 1)
        dotted = dotted.strip()
        section, _, key = dotted.partition(".")
        if section not in _SECTIONS or not key:
            raise ConfigError(
                f"--set {item!r} names no config key: expected section.key with a section among "
                f"{', '.join(_SECTIONS)}."
            )
        hints = typing.get_type_hints(_SECTIONS[section])
        if key not in hints:
            raise ConfigError(
                f"unknown config key {dotted} in --set {item!r}; the [{section}] section accepts: "
                f"{', '.join(hints)}."
            )
        data[section][key] = _parse_override_value(text, hints[key], dotted)
        touched.add(section)
    demo = data["run"]["demo"]
    for other in _DEMO_SECTIONS - {demo}:
        if other in touched:
            raise ConfigError(
                f"--set {other}.* does not apply to run.demo = {demo!r}; set run.demo = {other!r} "
                "or drop the override."
            )
        data.pop(other)
    return config_from_dict(data)


def config_to_dict(cfg: Config, *, only_demo: bool = True) -> dict[str, dict[str, Any]]:
    """Nested plain dict of the config; ``only_demo`` drops the section of the other demo."""
    out = {}
    for f in dataclasses.fields(cfg):
        if only_demo and f.name in _DEMO_SECTIONS and f.name != cfg.run.demo:
            continue
        section = dataclasses.asdict(getattr(cfg, f.name))
        out[f.name] = {k: list(v) if isinstance(v, tuple) else v for k, v in section.items()}
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


def config_to_toml(cfg: Config) -> str:
    """The resolved config as TOML text that :func:`load_config` reads back to an equal config."""
    lines = []
    for section, values in config_to_dict(cfg).items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items())
        lines.append("")
    return "\n".join(lines)


def config_fingerprint(cfg: Config) -> str:
    """Hash of every key that changes the numbers of a run (operational keys excluded)."""
    data = config_to_dict(cfg)
    for section, key in _OPERATIONAL:
        data.get(section, {}).pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def numeric_dict(cfg: Config) -> dict[str, Any]:
    """Flat ``section.key -> value`` of the keys in :func:`config_fingerprint` (to explain mismatches)."""
    data = config_to_dict(cfg)
    return {
        f"{s}.{k}": v
        for s, values in data.items()
        for k, v in values.items()
        if (s, k) not in _OPERATIONAL
    }

