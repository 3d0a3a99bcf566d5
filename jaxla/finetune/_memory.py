"""Does a config fit the machine? A demo's memory estimate against the memory available now.

Each demo estimates, roughly and from above, the host bytes its config needs (see
:attr:`jaxla.finetune._demo.Demo.memory`). Before any work starts the core compares the sum with
``MemAvailable`` of ``/proc/meminfo`` (or ``os.sysconf`` available pages elsewhere) and raises
:class:`ConfigError` naming the keys of the largest terms, instead of a MemoryError or an XLA
RESOURCE_EXHAUSTED traceback minutes into a run. The check is skipped when the platform does not
report available memory.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from jaxla.finetune._demo import MemoryTerm
from jaxla.finetune._errors import ConfigError

__all__ = ["available_bytes", "check_fits"]


def available_bytes() -> int | None:
    """Memory the OS could give this process now, in bytes, or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


def check_fits(terms: Sequence[MemoryTerm], *, available: int | None) -> None:
    """Raises :class:`ConfigError` when the estimated bytes exceed ``available`` (None: no check)."""
    total = sum(t.bytes for t in terms)
    if available is None or total <= available:
        return
    ranked = sorted(terms, key=lambda t: t.bytes, reverse=True)
    top = [t for t in ranked if t.bytes >= ranked[0].bytes / 10][:3]
    keys = []
    for t in top:
        keys += [k for k in t.keys if k not in keys]
    parts = ", ".join(f"{t.what} {_gib(t.bytes)}" for t in top)
    raise ConfigError(
        f"the config needs about {_gib(total)} of memory but only {_gib(available)} is available "
        f"(largest parts: {parts}). Lower {', '.join(keys)}."
    )
