"""Plots the attention suite's T sweep: time and memory vs T for jaxla, jax.nn and torch.

    python -m benchmarks.plot_attention benchmarks/results/cpu_attention.json benchmarks/attention_sweep.png

Needs matplotlib (the ``plot`` extra). Reads the JSON that ``python -m benchmarks.attention --json``
writes and draws one panel per (pass, causal) pair plus a memory panel.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

from jaxla import _files


def plot(json_path: str, png_path: str) -> None:
    from matplotlib.figure import Figure

    payload = json.loads(Path(json_path).read_text())
    rows = [r for r in payload["rows"] if r.get("jaxla_ms") is not None and r.get("T")]
    groups = {}
    for r in rows:
        kind = "fwd+bwd" if r["name"].startswith("fwd+bwd") else (
            "fwd" if r["name"].startswith("fwd") else None)
        if kind is None:
            continue
        groups.setdefault((kind, bool(r["causal"])), []).append(r)
    fig = Figure(figsize=(4 * (len(groups) + 1), 3.6), layout="constrained")
    axes = fig.subplots(1, len(groups) + 1)
    for ax, ((kind, causal), rs) in zip(axes, sorted(groups.items()), strict=False):
        rs = sorted(rs, key=lambda r: r["T"])
        ts = [r["T"] for r in rs]
        impl = rs[0].get("impl", "chunked")
        for col, label in (("jaxla_ms", f"jaxla ({impl})"), ("chunked_ms", "jaxla (chunked)"),
                           ("jax_nn_ms", "jax.nn (xla)"), ("torch_ms", "torch SDPA")):
            pts = [(t, r[col]) for t, r in zip(ts, rs, strict=True) if r.get(col) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=label)
        ax.set(xscale="log", yscale="log", xlabel="T = S", ylabel="ms (median)",
               title=f"{kind}, {'causal' if causal else 'non-causal'}")
        ax.legend(fontsize=8)
    mem = sorted((r for r in rows if r["name"].startswith("fwd+bwd") or r["name"].startswith("memory")),
                 key=lambda r: r["T"])
    ax = axes[-1]
    impl = mem[0].get("impl", "chunked") if mem else "chunked"
    pts = [(r["T"], r["jaxla_temp_MB"]) for r in mem if r.get("jaxla_temp_MB") is not None]
    if pts:
        ax.plot(*zip(*pts, strict=True), marker="o", label=f"jaxla ({impl}) XLA temp")
    pts = [(r["T"], r["run_peak_MB"]) for r in mem if r.get("run_peak_MB") is not None]
    if pts:
        ax.plot(*zip(*pts, strict=True), marker="s", linestyle="none",
                label=f"jaxla ({impl}) peak RSS beyond inputs")
    pts = [(r["T"], r["jax_nn_temp_MB"]) for r in mem if r.get("jax_nn_temp_MB") is not None]
    if pts:
        ax.plot(*zip(*pts, strict=True), marker="o", label="jax.nn (xla) XLA temp")
    ax.set(xscale="log", yscale="log", xlabel="T = S", ylabel="MB",
           title="causal fwd+bwd memory")
    ax.legend(fontsize=8)
    info = payload["machine"]
    fig.suptitle(f"attention, f32 B=1 N=8 H=64 — {info['device']} x{info['device_count']}, "
                 f"jax {info['jax']}, {info['date'][:10]}", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    _files.write_atomic(png_path, buf.getvalue())


if __name__ == "__main__":
    plot(sys.argv[1], sys.argv[2])
