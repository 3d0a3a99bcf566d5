"""``triton_compile`` suite: the Pallas kernels' Triton IR compiled offline for Hopper (sm_90a).

No GPU needed. Each kernel (forward, dQ, dK/dV) is lowered for CUDA from this host inside an abstract
H100 mesh (``jaxla.attention._pallas_lower``); the Triton module jax builds for it is captured and
compiled with the ``triton`` package from PyPI (``pip install triton``; it ships ``ptxas``) for
compute capability 9.0 with the kernel's own ``num_warps``/``num_stages``. Per kernel it reports:

- ``smem_KiB``: the shared memory Triton allocates (Hopper gives a block at most 227 KiB),
- ``regs``: registers per thread from the ``ptxas -v`` log of Triton's own ptxas run (255 at most),
  ``spill_B``: spill stores + loads in bytes,
- ``wgmma``: whether the PTX uses Hopper's warpgroup MMA (``wgmma.mma_async``) rather than only
  Ampere-style ``mma.sync``.

A row is ``ok`` when the kernel compiled within Hopper's shared memory and 255 registers. Run
``python -m jaxla.benchmarks.triton_compile`` (every dtype × head dim with the GPU default block
sizes, a few minutes on 2 cores) or ``--quick`` (one configuration). Without the ``triton`` package
it only checks that jax builds a Triton module for every kernel (rows say "lowered only"). The
Triton IR text jaxlib prints is read by the PyPI Triton's parser; a Triton release whose IR syntax
has moved on fails per kernel with the parser's message.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
import unittest.mock
import warnings

from jaxla.attention import _pallas
from jaxla.attention import _pallas_lower as lower
from jaxla.benchmarks import harness

HEAD_DIMS = (64, 128, 256)
DTYPES = ("bfloat16", "float16", "float32")
KERNELS = ("jaxla_flash_fwd", "jaxla_flash_dq", "jaxla_flash_dkdv")
QUICK = (("bfloat16", 64),)
# A causal GQA shape long enough that every kernel uses its full default tiles.
SHAPE = {"b": 1, "t": 2048, "s": 2048, "n": 8, "k": 2}
SM = 90  # Hopper; Triton targets sm_90a for capability 9.0
SMEM_LIMIT = 227 * 1024  # the most shared memory one block may use on H100/H200
_PTXAS_LINE = re.compile(
    r"(\d+) bytes spill stores, (\d+) bytes spill loads.*?Used (\d+) registers", re.S)


def _capture_triton_modules(case: lower.Case, sizes: _pallas.BlockSizes) -> list[tuple[str, str]]:
    """(kernel name, Triton IR text) for each kernel of ``case``'s forward + backward."""
    from jax._src.pallas.triton import lowering as triton_lowering

    captured: list[str] = []
    original = triton_lowering.lower_jaxpr_to_triton_module

    def record(*args, **kwargs):
        result = original(*args, **kwargs)
        captured.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    with unittest.mock.patch.object(triton_lowering, "lower_jaxpr_to_triton_module", record):
        text = lower.lower_case("gpu", case, block_sizes=sizes)
    names = re.findall(r'name = "(jaxla_flash_\w+)"', text)
    if len(names) != len(captured):
        raise RuntimeError(f"captured {len(captured)} Triton modules for kernels {names}")
    return list(zip(names, captured, strict=True))


def _ptxas_stats(log: str) -> tuple[int, int]:
    """(registers per thread, spill bytes stored + loaded) from Triton's own ``ptxas -v`` log."""
    match = _PTXAS_LINE.search(log)
    if match is None:
        raise RuntimeError(f"no register/spill line in the ptxas log: {log[-300:]!r}")
    stores, loads, regs = (int(x) for x in match.groups())
    return regs, stores + loads


def _compile(triton, target, ir_text: str, *, num_warps: int, num_stages: int, workdir: str):
    """(compiled kernel, ptxas log) of the Triton IR; always compiled (no cache hit), so the log
    is that of the ptxas run (Triton's flags, e.g. --regAllocOptLevel=2) that built this cubin."""
    from triton import knobs

    path = os.path.join(workdir, "kernel.ttir")
    with open(path, "w") as f:
        f.write(ir_text)
    saved = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    log = io.StringIO()
    try:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True
        with warnings.catch_warnings(), contextlib.redirect_stdout(log):
            warnings.simplefilter("ignore")  # Triton's own FP-fusion default notice
            kernel = triton.compile(path, target=target,
                                    options={"num_warps": num_warps, "num_stages": num_stages})
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
    return kernel, log.getvalue()


def _rows_for(triton, target, dtype: str, head_dim: int,
              sizes: _pallas.BlockSizes | None = None) -> list[dict]:
    sizes = sizes or _pallas.BlockSizes.default(platform="gpu", head_dim=head_dim, dtype=dtype)
    case = lower.Case(f"{dtype} h{head_dim}", dtype=dtype, h=head_dim, causal=True, **SHAPE)
    tiles = {"jaxla_flash_fwd": (sizes.block_q, sizes.block_k, sizes.num_warps, sizes.num_stages),
             "jaxla_flash_dq": (sizes.block_q_dq, sizes.block_k_dq, sizes.num_warps_bwd,
                                sizes.num_stages_bwd),
             "jaxla_flash_dkdv": (sizes.block_q_dkv, sizes.block_k_dkv, sizes.num_warps_bwd,
                                  sizes.num_stages_bwd)}
    rows = []
    for name, ir_text in _capture_triton_modules(case, sizes):
        bq, bk, warps, stages = tiles[name]
        row = {"name": f"{name.removeprefix('jaxla_flash_')} {dtype} H={head_dim}",
               "block": f"{bq}x{bk}", "warps": warps, "stages": stages}
        if triton is None:  # the lowering is still checked: jax built a Triton module for it
            row.update(ok=bool(ir_text.strip()), note="lowered only: pip install triton to compile")
            rows.append(row)
            continue
        with tempfile.TemporaryDirectory() as workdir:
            try:
                kernel, log = _compile(triton, target, ir_text, num_warps=warps,
                                       num_stages=stages, workdir=workdir)
                ptx = kernel.asm["ptx"]
                regs, spills = _ptxas_stats(log)
            except Exception as e:  # one kernel's failure is its row, not the run's
                row.update(ok=False, error=f"{type(e).__name__}: {str(e).strip()[-200:]}")
                rows.append(row)
                continue
        smem = kernel.metadata.shared
        row.update(smem_KiB=round(smem / 1024, 1), regs=regs, spill_B=spills,
                   wgmma="wgmma.mma_async" in ptx, mma_sync=ptx.count("mma.sync"),
                   ok=smem <= SMEM_LIMIT and regs <= 255)
        rows.append(row)
    return rows


def compile_rows(dtype: str, head_dim: int, sizes: _pallas.BlockSizes | None = None) -> list[dict]:
    """Rows for one configuration (None: the GPU default block sizes), e.g. to try new tiles."""
    import triton
    from triton.backends.compiler import GPUTarget

    return _rows_for(triton, GPUTarget("cuda", SM, 32), dtype, head_dim, sizes)


def run(*, quick: bool) -> list[dict]:
    try:
        import triton
        from triton.backends.compiler import GPUTarget
    except ImportError:
        triton = target = None
    else:
        target = GPUTarget("cuda", SM, 32)
    configs = QUICK if quick else [(d, h) for d in DTYPES for h in HEAD_DIMS]
    rows = []
    for dtype, head_dim in configs:
        try:
            rows += _rows_for(triton, target, dtype, head_dim)
        except Exception as e:  # lowering or capture failed for the whole configuration
            rows.append({"name": f"{dtype} H={head_dim}", "ok": False,
                         "error": f"{type(e).__name__}: {e}"})
    return rows


if __name__ == "__main__":
    sys.exit(harness.main("triton_compile", run))
