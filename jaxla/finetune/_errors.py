"""The three errors of the fine-tune package, one module so every part raises the same classes.

The CLI maps them to exit statuses: :class:`ConfigError` and :class:`RunError` exit 2 (one paragraph,
nothing written), :class:`NonFiniteLossError` exits 3 (the last good checkpoint is kept).
"""

from __future__ import annotations

__all__ = ["ConfigError", "NonFiniteLossError", "RunError"]


class ConfigError(ValueError):
    """A config file or override is missing, malformed or invalid (the CLI exits with status 2)."""


class RunError(Exception):
    """A problem with the run directory or a checkpoint that the user must fix (CLI exit status 2)."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the run stopped and kept its last good checkpoint."""
