"""jaxla's benchmark suites, runnable from an installed package.

Run one with ``jaxla bench SUITE [--quick] [--json FILE]`` or ``python -m jaxla.benchmarks.SUITE``.
Every suite module defines ``run(*, quick: bool) -> list[dict]`` and calls :func:`harness.main`
(shared timing, numerics checks, table and JSON). Shape specs (``specs_*``) are plain data shared with
the tests. Besides the suites, two tools read the JSON the suites write: ``summarize`` (one table from
several result files) and ``plot_attention`` (the attention suite's T sweep as a PNG).

Adding a suite: one module here with ``run`` and a ``__main__`` block, one entry in :data:`SUITES`.
A tool module defines ``USAGE``, ``run_tool(paths) -> str`` (the text to print; bad input raises
``harness.BenchInputError``) and ``main``, and has one entry in :data:`TOOLS`. A test checks that the
lists and the modules agree.

This package imports nothing heavy: the command line reads :data:`SUITES` and :data:`TOOLS` to list
and validate names, and imports a suite's module only to run it.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["SUITES", "TOOLS", "Entry", "find"]


class Entry(NamedTuple):
    """A suite or tool: its module name in this package and a one-line description."""

    name: str
    summary: str


SUITES: tuple[Entry, ...] = (
    Entry("linear", "jaxla.linear vs NumPy matmul, f32 and bf16"),
    Entry("attention", "dot_product_attention vs jax.nn (and torch SDPA), time and memory"),
    Entry("attention_gpu", "the Pallas flash-attention kernel vs cuDNN and XLA (GPU; --quick: CPU)"),
    Entry("triton_compile", "the Pallas kernels compiled offline for sm_90a: smem, regs, spills, wgmma"),
    Entry("lora", "LoRA forward and training step vs plain, full fine-tune and Flax NNX"),
    Entry("spectral", "randomized SVD, Lanczos, Hessian top eigenvalue, PCA vs dense/scikit-learn"),
    Entry("finetune", "the configured fine-tune demos: compile, steps/s, fresh-process wall time"),
    Entry("models", "SmolLM2-135M prefill/decode tokens/s f32 and bf16, compile vs depth, peak RSS"),
    Entry("quant", "quantized bases: resident bytes per format, Q4_1 vs f32 decode, QLoRA step"),
    Entry("qwix_compare", "qwix's QLoRA vs jaxla's on SmolLM2-135M (NF4, int4): step time, losses, "
                          "peak RSS; needs flax and qwix"),
    Entry("sharding", "8 devices: per-device cost of partitioned kernels and sharded models, ring "
                      "attention memory vs T and step time"),
)

TOOLS: tuple[Entry, ...] = (
    Entry("summarize", "one table from result JSON files or folders (default ./benchmarks/results)"),
    Entry("plot_attention", "plot the attention suite's T sweep from its JSON: JSON PNG"),
)


def find(name: str) -> Entry | None:
    """The suite or tool called ``name``, or None."""
    return next((e for e in (*SUITES, *TOOLS) if e.name == name), None)
