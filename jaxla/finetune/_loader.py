"""The full config of a run: the shared sections plus the section of its demo, read from TOML.

:class:`Config` holds ``[run] [train] [optim] [lora] [mesh]`` and ``section``, the dataclass of the
demo that ``run.demo`` names (found in the registry); ``cfg.<demo name>`` (e.g. ``cfg.lowrank``) is
the same section. ``Config()`` is the default demo, whose dataclass defaults the shipped
``demos/lowrank.toml`` spells out (a test keeps the two identical), so an installed jaxla needs no
data file to run it.

A config is named by a path to a TOML file, or by the name of a built-in one (``"tiny_lm"``, the
file ``jaxla/finetune/demos/tiny_lm.toml`` of the installed package); a path that exists wins.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jaxla.finetune import _config, _registry
from jaxla.finetune._config import LoraConfig, MeshConfig, OptimConfig, RunConfig, TrainConfig
from jaxla.finetune._errors import ConfigError

__all__ = ["Config", "apply_overrides", "config_from_dict", "load_config"]


def _demo_or_error(name: str):
    demo = _registry.get(name)
    if demo is None:
        raise ConfigError(
            f"config key run.demo = {name!r} is invalid: expected one of "
            + ", ".join(repr(n) for n in _registry.names()) + "."
        )
    return demo


@dataclass(frozen=True)
class Config:
    """A complete, validated fine-tune configuration.

    ``section`` defaults to the defaults of the demo ``run.demo`` names; ``cfg.<run.demo>`` reads it
    under the demo's name (``cfg.lowrank``).
    """

    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    section: Any = None

    def __post_init__(self):
        demo = _demo_or_error(self.run.demo)
        if self.section is None:
            object.__setattr__(self, "section", demo.section())
        elif type(self.section) is not demo.section:
            raise TypeError(
                f"Config.section must be a {demo.section.__name__} for run.demo = "
                f"{self.run.demo!r}, got {type(self.section).__name__}"
            )

    def __getattr__(self, name: str):
        # Only reached when normal lookup fails: the demo's section under its own name.
        if name in ("run", "section") or name.startswith("__"):
            raise AttributeError(name)
        if name == self.run.demo:
            return self.section
        if _registry.get(name) is not None:
            raise AttributeError(
                f"this config is for run.demo = {self.run.demo!r} and has no [{name}] section")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


def _section_names(demo: str) -> list[str]:
    return [*_config.SHARED_SECTIONS, demo]


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """Builds and validates a :class:`Config` from nested mappings (e.g. parsed TOML)."""
    for name, values in data.items():
        if not isinstance(values, Mapping):
            raise ConfigError(
                f"config section [{name}] must be a table of keys, got {type(values).__name__} "
                f"{values!r}."
            )
    run = _config.build_section("run", RunConfig, data.get("run", {}))
    demo = _demo_or_error(run.demo)
    for name in data:
        if name in _config.SHARED_SECTIONS or name == demo.name:
            continue
        if _registry.get(name) is not None:
            raise ConfigError(
                f"config section [{name}] does not apply to run.demo = {demo.name!r}; remove it or "
                f"set run.demo = {name!r}."
            )
        raise ConfigError(
            f"unknown config section [{name}]; expected sections: "
            f"{', '.join(_section_names(demo.name))} (or another demo's section: "
            f"{', '.join(n for n in _registry.names() if n != demo.name)})."
        )
    shared = {name: _config.build_section(name, cls, data.get(name, {}))
              for name, cls in _config.SHARED_SECTIONS.items() if name != "run"}
    section = _config.build_section(demo.name, demo.section, data.get(demo.name, {}))
    cfg = Config(run=run, section=section, **shared)
    _check_shared(cfg)
    demo.validate(cfg)
    return cfg


def _check_shared(cfg: Config) -> None:
    """Cross-key checks of the shared sections."""
    if cfg.train.batch_size % cfg.mesh.data:
        raise ConfigError(
            f"config key train.batch_size = {cfg.train.batch_size} is not divisible by the data "
            f"axis mesh.data = {cfg.mesh.data}: expected a multiple of {cfg.mesh.data} so every "
            "device gets the same number of examples."
        )


def _read(path: str | Path) -> tuple[str, str]:
    """``(text, where)`` of a config file, or of a built-in config when no such file exists."""
    p = Path(path)
    try:
        return p.read_bytes().decode("utf-8"), str(p)
    except FileNotFoundError:
        # Only a bare name ("tiny_lm", "tiny_lm.toml") may mean a built-in; "./x" means a file.
        text = os.fspath(path)
        bare = not any(sep and sep in text for sep in (os.sep, os.altsep, "/"))
        builtin = _registry.builtin_config_text(text) if bare else None
        if builtin is not None:
            return builtin, f"built-in config {p.name!r}"
        raise ConfigError(
            f"config file {str(p)!r} does not exist (built-in configs, named without a path: "
            f"{', '.join(_registry.builtin_config_names())})."
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"config file {str(p)!r} is a directory, expected a TOML file.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {str(p)!r} cannot be read: {e}.") from None


def load_config(path: str | Path | None) -> Config:
    """Loads and validates a TOML config; ``None`` gives the default demo (:class:`Config`()).

    ``path`` is a file, or the name of a built-in config (``"tiny_lm"``, ``"lowrank_mesh.toml"``)
    when no file of that name exists.
    """
    if path is None:
        return Config()
    text, where = _read(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {where!r} is not valid TOML: {e}.") from None
    try:
        return config_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _parse_override_value(text: str, tp, key: str) -> Any:
    where = f"--set {key}={text}"
    if tp is str:
        return text
    if tp == _config.STRS:
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
    raise ConfigError(f"{where}: {text!r} cannot be read as {_config.type_name(tp)}.")


def _split_override(item: str) -> tuple[str, str, str]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r} is malformed: expected section.key=value.")
    dotted, text = item.split("=", 1)
    section, _, key = dotted.strip().partition(".")
    return section, key, text


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """Applies ``section.key=value`` overrides (converted to the key's type) and revalidates.

    ``run.demo=<name>`` switches demo: the new demo's section starts from its defaults.
    """
    parsed = [(item, *_split_override(item)) for item in overrides]
    demo_name = cfg.run.demo
    for _item, section, key, text in parsed:
        if (section, key) == ("run", "demo"):
            demo_name = _parse_override_value(text, str, "run.demo")
    demo = _demo_or_error(demo_name)
    data = _config.config_to_dict(cfg)
    if demo.name != cfg.run.demo:
        data.pop(cfg.run.demo)
        data[demo.name] = {}
    classes = {**_config.SHARED_SECTIONS, demo.name: demo.section}
    for item, section, key, text in parsed:
        if section not in classes:
            if _registry.get(section) is not None and key:
                raise ConfigError(
                    f"--set {section}.* does not apply to run.demo = {demo.name!r}; set run.demo = "
                    f"{section!r} or drop the override."
                )
            raise ConfigError(
                f"--set {item!r} names no config key: expected section.key with a section among "
                f"{', '.join(classes)}."
            )
        if not key:
            raise ConfigError(f"--set {item!r} names no config key: expected section.key=value.")
        hints = _config.field_types(classes[section])
        if key not in hints:
            raise ConfigError(
                f"unknown config key {section}.{key} in --set {item!r}; the [{section}] section "
                f"accepts: {', '.join(hints)}."
            )
        data[section][key] = _parse_override_value(text, hints[key], f"{section}.{key}")
    return config_from_dict(data)

