"""One fine-tune run end to end: check everything, resolve the run directory, run the demo."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jaxla import _files
from jaxla.finetune import _loader, _memory, _mesh, _registry, _rundir, _runner
from jaxla.finetune._errors import RunError

__all__ = ["format_summary", "run_finetune"]


def run_finetune(
    config: _loader.Config,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    runs_root: str | Path = "runs",
    progress: bool | None = None,
    stop_after: int | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Runs the demo ``config.run.demo`` and returns its summary.

    Args:
      config: a validated :class:`Config`.
      out: run directory; by default a new ``<runs_root>/<run.name>-<timestamp>``, or with ``resume``
        the newest such directory.
      resume: continue from the latest checkpoint in ``out`` (same config required).
      runs_root: where default run directories go.
      progress: tqdm progress bar (True), plain log lines (False), or by whether stderr is a TTY.
      stop_after: stop like Ctrl-C after this many steps of this call (checkpoint written; resume
        later); for tests and benchmarks.
      echo: where log lines go.

    Returns:
      ``{"title", "rows": [(label, text)], "metrics": {...}, "interrupted": bool, "out": str}``;
      ``summary.json`` in the run directory holds the same (when the run finished).

    Raises:
      ConfigError: LoRA targets that match no matrix of the model, or a config whose estimated
        memory exceeds what the machine has available (raised before anything is written).
      RunError: unusable run directory, nothing to resume, a checkpoint from another config, or a mesh
        needing more devices than exist (raised before anything is written).
      NonFiniteLossError: the loss became NaN/inf (the last good checkpoint is kept).
    """
    demo = _registry.get(config.run.demo)
    # Everything that can fail on the user's input fails here, before anything is created.
    _memory.check_fits(demo.memory(config), available=_memory.available_bytes())
    mesh = _mesh.make_mesh(config.mesh)
    demo.preflight(config)
    out = _resolve_out(config, out, resume=resume, runs_root=runs_root)
    _rundir.prepare_run_dir(out, config, resume=resume)
    ctx = _runner.RunContext(out=out, config=config, mesh=mesh, resume=resume, progress=progress,
                             stop_after=stop_after, echo=echo)
    with _runner.handle_interrupts(ctx):
        summary = demo.run(ctx)
    summary["out"] = str(out)
    if not summary["interrupted"]:
        payload = {"title": summary["title"], "metrics": summary["metrics"]}
        _files.write_atomic_text(out / "summary.json", json.dumps(payload, indent=2) + "\n")
    return summary


def _resolve_out(config, out, *, resume: bool, runs_root) -> Path:
    """``out``, or the default run directory under ``runs_root`` (the newest one with ``resume``)."""
    if out is not None:
        if str(out) == "":
            raise RunError("--out is empty: expected the path of a run directory.")
        return Path(out)
    if not resume:
        return _rundir.default_out_dir(config, runs_root)
    latest = _rundir.latest_run_dir(config, runs_root)
    if latest is None:
        raise RunError(
            f"--resume: no earlier run named {config.run.name!r} under {str(runs_root)!r} to "
            "resume; pass --out with the run directory."
        )
    return latest


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a two-column text table."""
    rows = summary["rows"]
    width = max(len(label) for label, _ in rows)
    rule = "-" * min(100, width + 2 + max(len(str(v)) for _, v in rows))
    lines = [summary["title"], rule]
    lines += [f"{label:<{width}}  {value}" for label, value in rows]
    lines.append(rule)
    return "\n".join(lines)
