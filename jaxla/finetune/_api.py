"""One fine-tune run end to end: resolve the run directory, run the demo, write its summary."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from jaxla import _files
from jaxla.finetune import _config, _mesh, _rundir, _runner

__all__ = ["format_summary", "run_finetune"]


def _demo(name: str):
    """The demo's module (imported lazily: each pulls in its own model code)."""
    if name == "lowrank":
        from jaxla.finetune import _lowrank

        return _lowrank
    from jaxla.finetune import _tiny_lm

    return _tiny_lm


def check_lora_targets(init_adapters: Callable[[], Any], targets) -> None:
    """Traces ``init_adapters`` (shapes only) and turns a LoRA target error into a ConfigError."""
    try:
        jax.eval_shape(init_adapters)
    except (ValueError, TypeError) as e:
        raise _config.ConfigError(
            f"config key lora.targets = {list(targets)!r} does not fit the model: {e}"
        ) from None


def run_finetune(
    config: _config.Config,
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
      ConfigError: LoRA targets that match no matrix of the model.
      RunError: unusable run directory, nothing to resume, a checkpoint from another config, or a mesh
        needing more devices than exist (raised before anything is written).
      NonFiniteLossError: the loss became NaN/inf (the last good checkpoint is kept).
    """
    if out is None:
        if resume:
            out = _rundir.latest_run_dir(config, runs_root)
            if out is None:
                raise _rundir.RunError(
                    f"--resume: no earlier run named {config.run.name!r} under {str(runs_root)!r} to "
                    "resume; pass --out with the run directory."
                )
        else:
            out = _rundir.default_out_dir(config, runs_root)
    out = Path(out)
    # Everything that can fail on the user's input fails here, before anything is created.
    _mesh.make_mesh(config.mesh)
    demo = _demo(config.run.demo)
    demo.check(config)
    _rundir.prepare_run_dir(out, config, resume=resume)
    ctx = _runner.RunContext(
        out=out, config=config, resume=resume, progress=progress, stop_after=stop_after, echo=echo
    )
    with _runner.handle_interrupts(ctx):
        summary = demo.run(ctx)
    summary["out"] = str(out)
    if not summary["interrupted"]:
        payload = {"title": summary["title"], "metrics": summary["metrics"]}
        _files.write_atomic_text(out / "summary.json", json.dumps(payload, indent=2) + "\n")
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a two-column text table."""
    rows = summary["rows"]
    width = max(len(label) for label, _ in rows)
    rule = "-" * min(100, width + 2 + max(len(str(v)) for _, v in rows))
    lines = [summary["title"], rule]
    lines += [f"{label:<{width}}  {value}" for label, value in rows]
    lines.append(rule)
    return "\n".join(lines)
