"""``plot_attention`` tool: the attention suite's T sweep as time and memory against T.

    jaxla bench plot_attention benchmarks/results/cpu_attention.json benchmarks/attention_sweep.png
    python -m jaxla.benchmarks.plot_attention RESULTS.json OUT.png      # the same

Needs matplotlib (the ``plot`` extra). Reads the JSON that ``jaxla bench attention --json FILE``
writes and draws one panel per (pass, causal) pair plus a memory panel (jaxla, jax.nn and torch where
the file has them). The PNG's folder and the JSON are checked before matplotlib is imported, and
the PNG is written atomically.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from jaxla import _files
from jaxla.benchmarks.harness import BenchInputError, output_path_problem, read_results

__all__ = ["USAGE", "main", "plot", "run_tool", "sweep_rows"]

USAGE = "jaxla bench plot_attention JSON PNG"

_PASSES = (("fwd+bwd", "fwd+bwd"), ("fwd", "fwd"))  # name prefix -> pass; the longer prefix first


def _positive(value) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            and value > 0)


def sweep_rows(payload: dict) -> list[dict]:
    """The rows that can be plotted: a positive ``T`` and ``jaxla_ms``, a fwd/fwd+bwd/memory name."""
    return [r for r in payload["rows"]
            if _positive(r.get("T")) and _positive(r.get("jaxla_ms"))
            and r["name"].startswith(("fwd", "memory"))]


def _series(rows, column):
    return [(r["T"], r[column]) for r in rows if _positive(r.get(column))]


def plot(json_path: str | Path, png_path: str | Path) -> None:
    """Draws the sweep in ``json_path`` into ``png_path``.

    Raises:
      BenchInputError: matplotlib is missing, the PNG's folder cannot take the file, or the JSON is not
        an attention suite result with sweep rows (``ResultsFileError``, a subclass, names the file).
    """
    problem = output_path_problem(png_path, option="PNG")
    if problem:
        raise BenchInputError(f"plot_attention: {problem}")
    payload = read_results(json_path)
    rows = sweep_rows(payload)
    groups: dict[tuple[str, bool], list[dict]] = {}
    for r in rows:
        kind = next((k for prefix, k in _PASSES if r["name"].startswith(prefix)), None)
        if kind is not None:
            groups.setdefault((kind, bool(r.get("causal"))), []).append(r)
    if not groups:
        raise BenchInputError(
            f"plot_attention: {str(json_path)!r} (suite {payload['suite']!r}) has no fwd/fwd+bwd rows "
            "with positive T and jaxla_ms; give the JSON that 'jaxla bench attention --json FILE' writes.")
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise BenchInputError("plot_attention needs matplotlib: pip install 'jaxla[plot]' "
                              "(or pip install matplotlib); nothing was written.") from None
    fig = Figure(figsize=(4 * (len(groups) + 1), 3.6), layout="constrained")
    axes = fig.subplots(1, len(groups) + 1)
    for ax, ((kind, causal), rs) in zip(axes, sorted(groups.items()), strict=False):
        rs = sorted(rs, key=lambda r: r["T"])
        impl = rs[0].get("impl") or "chunked"
        for col, label in (("jaxla_ms", f"jaxla ({impl})"), ("chunked_ms", "jaxla (chunked)"),
                           ("jax_nn_ms", "jax.nn (xla)"), ("torch_ms", "torch SDPA")):
            pts = _series(rs, col)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=label)
        ax.set(xscale="log", yscale="log", xlabel="T = S", ylabel="ms (median)",
               title=f"{kind}, {'causal' if causal else 'non-causal'}")
        ax.legend(fontsize=8)
    mem = sorted((r for r in rows if r["name"].startswith(("fwd+bwd", "memory"))),
                 key=lambda r: r["T"])
    ax = axes[-1]
    impl = (mem[0].get("impl") or "chunked") if mem else "chunked"
    for col, marker, style, label in (
        ("jaxla_temp_MB", "o", "-", f"jaxla ({impl}) XLA temp"),
        ("run_peak_MB", "s", "none", f"jaxla ({impl}) peak RSS beyond inputs"),
        ("jax_nn_temp_MB", "o", "-", "jax.nn (xla) XLA temp"),
    ):
        pts = _series(mem, col)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=marker, linestyle=style, label=label)
    ax.set(xscale="log", yscale="log", xlabel="T = S", ylabel="MB", title="causal fwd+bwd memory")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    info = payload["machine"]
    fig.suptitle(f"attention, f32 B=1 N=8 H=64 — {info.get('device')} x{info.get('device_count')}, "
                 f"jax {info.get('jax')}, {str(info.get('date'))[:10]}", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    _files.write_atomic(png_path, buf.getvalue())


def run_tool(paths: Sequence[str]) -> str:
    """``jaxla bench plot_attention JSON PNG``: draws the plot; the text to print."""
    if len(paths) != 2:
        raise BenchInputError(f"plot_attention takes two paths, the attention suite's JSON and the PNG "
                              f"to write ({USAGE}); got {len(paths)}.")
    plot(*paths)
    return f"wrote {paths[1]}"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m jaxla.benchmarks.plot_attention JSON PNG``: 0, or 2 with one line for bad input."""
    parser = argparse.ArgumentParser(prog="python -m jaxla.benchmarks.plot_attention",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("json_path", metavar="JSON", help="attention suite results file")
    parser.add_argument("png_path", metavar="PNG", help="where to write the plot")
    args = parser.parse_args(argv)
    try:
        plot(args.json_path, args.png_path)
    except BenchInputError as e:
        parser.error(str(e))
    print(f"wrote {args.png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
