"""Which code path of a compiled CPU kernel runs: the best this CPU supports, or the one the
``JAXLA_CPU_KERNEL`` environment variable names (``avx512``, ``avx2`` or ``portable``).

Shared by jaxla's compiled CPU kernels, whose C++ side numbers the paths alike
(``jaxla/_cpu_dispatch.h``): the attention kernel's choice (``jaxla/attention/_cpu.py``) follows the
same rule, and one setting of the variable selects the same path for both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

ENV_VAR = "JAXLA_CPU_KERNEL"


def choose_path(env: str | None, ids: Mapping[str, int] | Sequence[str], supported: Sequence[str],
                *, var: str = ENV_VAR) -> tuple[str | None, str | None]:
    """``(path, None)`` for the path calls use, or ``(None, why not)`` when ``env`` names a path
    that is not compiled in or that this CPU cannot run.

    Args:
      env: the variable's value (None or blank: the best supported path).
      ids: every compiled path's name (and number).
      supported: the names this CPU runs, best first.
      var: the variable's name, for the messages (the same rule picks the attention kernel's bf16
        GEMMs from ``JAXLA_CPU_BF16``).
    """
    if env is None or env.strip() == "":
        return (supported[0] if supported else None), None
    name = env.strip().lower()
    if name not in ids:
        return None, (f"{var}={env!r} is not a CPU kernel path; expected one of "
                      f"{sorted(ids)} (this CPU runs {list(supported)})")
    if name not in supported:
        return None, (f"{var}={env!r} asks for a path this CPU cannot run (it lacks the "
                      f"instructions); this CPU runs {list(supported)}")
    return name, None
