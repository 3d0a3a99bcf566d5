"""The demo registry: every module of :mod:`jaxla.finetune.demos`, found by listing the package.

Discovery imports each non-underscore module of the ``demos`` package once (on first use) and reads
its module-level ``DEMO`` (a :class:`jaxla.finetune._demo.Demo`), so adding a demo is adding
``demos/<name>.py`` and ``demos/<name>.toml`` with no edit elsewhere. The demo modules import only
the core (sections, loop, checkpoints, mesh), never this module or the API, so the dependency graph
has no cycle.

The ``*.toml`` files of the package are the built-in configs: ``load_config("tiny_lm")`` (or
``jaxla finetune tiny_lm``) reads ``demos/tiny_lm.toml`` from the installed package.
"""

from __future__ import annotations

import functools
import importlib
import importlib.resources
import pkgutil

from jaxla.finetune import demos as _demos_pkg
from jaxla.finetune._demo import Demo

__all__ = ["builtin_config_names", "builtin_config_text", "get", "names"]


@functools.cache
def _all() -> dict[str, Demo]:
    found = {}
    for info in sorted(pkgutil.iter_modules(_demos_pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_") or info.ispkg:
            continue
        module = importlib.import_module(f"{_demos_pkg.__name__}.{info.name}")
        demo = getattr(module, "DEMO", None)
        if not isinstance(demo, Demo):
            raise TypeError(
                f"demo module {module.__name__} must define DEMO = jaxla.finetune._demo.Demo(...)"
            )
        if demo.name != info.name:
            raise ValueError(f"demo module {module.__name__} registers the name {demo.name!r}; a "
                             f"demo's name must be its module's name {info.name!r}")
        found[demo.name] = demo
    return found


def names() -> tuple[str, ...]:
    """The registered demo names, sorted."""
    return tuple(_all())


def get(name: str) -> Demo | None:
    """The demo registered as ``name``, or None."""
    return _all().get(name)


def builtin_config_names() -> tuple[str, ...]:
    """Names of the configs shipped in the package (``demos/<name>.toml``), sorted."""
    files = importlib.resources.files(_demos_pkg)
    return tuple(sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".toml")))


def builtin_config_text(name: str) -> str | None:
    """The text of the built-in config ``name`` (with or without ``.toml``), or None."""
    stem = name[:-5] if name.endswith(".toml") else name
    if stem not in builtin_config_names():
        return None
    return importlib.resources.files(_demos_pkg).joinpath(f"{stem}.toml").read_text("utf-8")
