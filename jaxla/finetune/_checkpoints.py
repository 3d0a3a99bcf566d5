"""The checkpoint manager: the one place that calls the run directory's checkpoint functions.

A phase of a run keeps its checkpoints in ``<out>/checkpoints/<phase>/`` (format and atomicity in
:mod:`jaxla.finetune._rundir`). :class:`Checkpoints` binds that folder to the run's config
fingerprint and retention, so the training loop only says *restore*, *save* and *latest*. The
metrics log and host copies of arrays come from here too, so the loop and the demos never import
``_rundir`` themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxla.finetune import _rundir

__all__ = ["Checkpoints", "fingerprint", "metrics_log", "nonfinite_advice", "to_host"]


def fingerprint(cfg: Any) -> str:
    """What a checkpoint must share with the config resuming it (resume-adjustable keys excluded)."""
    return _rundir.checkpoint_fingerprint(cfg)


def nonfinite_advice(cfg: Any, phase: str, out: Path) -> str:
    """The exact command that resumes a run stopped by a NaN/inf loss with a lower learning rate."""
    return _rundir.nonfinite_advice(cfg, phase, out)


def to_host(tree: Any) -> Any:
    """NumPy copies of every array in ``tree`` (shards of other hosts gathered)."""
    return _rundir.to_host(tree)


def metrics_log(out: Path) -> _rundir.MetricsLog:
    """The run's append-only ``metrics.jsonl``."""
    return _rundir.MetricsLog(out / "metrics.jsonl")


@dataclass(frozen=True)
class Checkpoints:
    """The checkpoints of one phase of one run."""

    directory: Path
    fingerprint: str
    keep: int

    @classmethod
    def for_phase(cls, out: Path, phase: str, *, fingerprint: str, keep: int) -> Checkpoints:
        return cls(out / "checkpoints" / phase, fingerprint, keep)

    def latest(self) -> Path | None:
        """The newest checkpoint file, or None."""
        return _rundir.latest_checkpoint(self.directory)

    def restore(self, template: Any) -> tuple[int, Any] | None:
        """``(step, state)`` from the newest checkpoint shaped like ``template``, or None if none.

        Raises:
          RunError: the checkpoint is unreadable, from another config, or of another structure.
        """
        latest = self.latest()
        if latest is None:
            return None
        return _rundir.load_checkpoint(latest, template, fingerprint=self.fingerprint)

    def save(self, step: int, state: Any) -> Path:
        """Writes ``state`` after ``step`` steps and prunes all but the newest ``keep``."""
        return _rundir.save_checkpoint(
            self.directory, step, state, fingerprint=self.fingerprint, keep=self.keep
        )
