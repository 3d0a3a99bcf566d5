"""The model families jaxla reads, and lookups by config type, Hugging Face model_type and GGUF
architecture. Adding a family: write ``jaxla/models/_<name>.py`` ending in ``FAMILY = Family(...)``
and add its module name to :data:`FAMILY_MODULES`."""

from __future__ import annotations

import functools
import importlib
from typing import Any

from jaxla.models._family import Family

__all__ = ["FAMILY_MODULES", "families", "family_of", "for_gguf_architecture", "for_hf_model_type"]

FAMILY_MODULES = ("jaxla.models._llama", "jaxla.models._bert")


@functools.cache
def families() -> tuple[Family, ...]:
    """Every registered family, in :data:`FAMILY_MODULES` order."""
    return tuple(importlib.import_module(m).FAMILY for m in FAMILY_MODULES)


def _supported(attr: str) -> str:
    return ", ".join(f"{v!r} ({f.name})" for f in families() for v in getattr(f, attr))


def family_of(config: Any) -> Family:
    """The family whose config type ``config`` is; TypeError otherwise."""
    for f in families():
        if isinstance(config, f.config_type):
            return f
    names = ", ".join(f.config_type.__name__ for f in families())
    raise TypeError(f"config must be a model config ({names}), got {type(config).__name__}")


def for_hf_model_type(model_type: Any, where: str) -> Family:
    """The family reading a config.json whose ``model_type`` is ``model_type``; ValueError otherwise."""
    for f in families():
        if model_type in f.hf_model_types:
            return f
    raise ValueError(
        f"{where}: unsupported model_type {model_type!r}; supported: {_supported('hf_model_types')}"
    )


def for_gguf_architecture(arch: Any, where: str) -> Family:
    """The family reading a GGUF file of ``general.architecture`` ``arch``; ValueError otherwise."""
    for f in families():
        if arch in f.gguf_architectures:
            return f
    raise ValueError(
        f"{where}: unsupported GGUF architecture {arch!r}; supported: "
        f"{_supported('gguf_architectures')}"
    )
