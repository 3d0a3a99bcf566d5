"""What a demo module provides: one :class:`Demo` record, read by the registry.

A demo is one module ``jaxla/finetune/demos/<name>.py`` that defines its config section (a frozen
dataclass built with :func:`jaxla.finetune._config.build_section`'s field metadata) and a module-level
``DEMO = Demo(...)``, plus its config file ``jaxla/finetune/demos/<name>.toml``. Nothing else needs
an edit: :mod:`jaxla.finetune._registry` imports every module of the ``demos`` package.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = ["Demo", "MemoryTerm"]


class MemoryTerm(NamedTuple):
    """One part of a demo's memory estimate: ``bytes`` that grow with the config ``keys``."""

    what: str
    bytes: int
    keys: tuple[str, ...]


@dataclass(frozen=True)
class Demo:
    """A registered demo.

    Attributes:
      name: the ``run.demo`` value, and the name of the demo's config section (equal to the
        module's name).
      section: the frozen dataclass of the demo's section; its defaults are the demo's defaults.
      run: ``run(ctx) -> summary`` with ``ctx`` a :class:`jaxla.finetune._runner.RunContext`;
        the summary is ``{"title", "rows": [(label, text)], "metrics": {...}, "interrupted"}``.
      validate: ``validate(cfg)`` cross-key checks run when a config is loaded (cheap; raises
        ConfigError).
      preflight: ``preflight(cfg)`` checks run before a run starts that need tracing, e.g. that
        ``lora.targets`` select matrices of the model (raises ConfigError).
      memory: ``memory(cfg) -> [MemoryTerm]``, a documented rough upper estimate of the host
        memory the run needs (parameters, optimizer state, one step's activations); the core
        compares the sum with the memory available before any work starts.
    """

    name: str
    section: type
    run: Callable[[Any], dict[str, Any]]
    validate: Callable[[Any], None]
    preflight: Callable[[Any], None]
    memory: Callable[[Any], Sequence[MemoryTerm]]
