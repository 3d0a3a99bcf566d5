"""Handing freed host memory back to the OS (glibc's ``malloc_trim``), shared by the loaders and loops.

glibc keeps pages that were freed in the middle of its heaps resident; a process that briefly needed
a lot (a checkpoint parsed into host copies, XLA's compile of a training step, a step's first run)
stays that large until something trims. Measured on SmolLM2-135M (benchmarks/RESULTS.md, 2026-12-02):
35 / 137 MiB kept after a quantized / f32 GGUF load, and a lean training step's steady state 178 MiB
(QLoRA) and 146 MiB (f32) lower when trimmed after the compile and after step 1.
"""

from __future__ import annotations

import ctypes


def release_freed_memory() -> None:
    """``malloc_trim(0)``: freed heap pages back to the OS. Nothing where the C library has none."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
