"""``triton_compile`` suite: the Pallas kernels' Triton IR compiled offline for Hopper (sm_90a).

No GPU needed. Each kernel (forward, dQ, dK/dV) is lowered for CUDA from this host inside an abstract
H100 mesh (``jaxla.attention._pallas_lower``); the Triton module jax builds for it is captured and
compiled with the ``triton`` package from PyPI (``pip install triton``; it ships ``ptxas``) for
compute capability 9.0 with the kernel's own ``num_warps``/``num_stages``. Per kernel it reports:

- ``smem_KiB``: the shared memory Triton allocates (Hopper gives a block at most 227 KiB),
- ``regs``: registers per thread from ``ptxas -v`` (255 at most), ``spill_B``: spill stores+loads,
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

import os
import re
import subprocess
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


def _ptxas_stats(ptxas: str, ptx: str, workdir: str) -> tuple[int, int]:
    """(registers per thread, spill bytes stored + loaded) from ``ptxas -v`` for sm_90a."""
    path = os.path.join(workdir, "kernel.ptx")
    with open(path, "w") as f:
        f.write(ptx)
    proc = subprocess.run([ptxas, f"-arch=sm_{SM}a", "-v", path, "-o", os.devnull],
                          capture_output=True, text=True, timeout=120, check=False)
    match = _PTXAS_LINE.search(proc.stderr + proc.stdout)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"ptxas failed (rc {proc.returncode}): {proc.stderr[-300:]}")
    stores, loads, regs = (int(x) for x in match.groups())
    return regs, stores + loads


def _compile(triton, target, ir_text: str, *, num_warps: int, num_stages: int, workdir: str):
    path = os.path.join(workdir, "kernel.ttir")
    with open(path, "w") as f:
        f.write(ir_text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Triton's own FP-fusion default notice
        return triton.compile(path, target=target,
                              options={"num_warps": num_warps, "num_stages": num_stages})


def _rows_for(triton, target, ptxas: str, dtype: str, head_dim: int,
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
                kernel = _compile(triton, target, ir_text, num_warps=warps, num_stages=stages,
                                  workdir=workdir)
                ptx = kernel.asm["ptx"]
                regs, spills = _ptxas_stats(ptxas, ptx, workdir)
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
    from triton.backends.nvidia.compiler import get_ptxas

    return _rows_for(triton, GPUTarget("cuda", SM, 32), get_ptxas(SM).path, dtype, head_dim, sizes)


def run(*, quick: bool) -> list[dict]:
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError:
        triton = target = ptxas = None
    else:
        target = GPUTarget("cuda", SM, 32)
        ptxas = get_ptxas(SM).path  # the ptxas Triton itself runs for this arch (its PTX version)
    configs = QUICK if quick else [(d, h) for d in DTYPES for h in HEAD_DIMS]
    rows = []
    for dtype, head_dim in configs:
        try:
            rows += _rows_for(triton, target, ptxas, dtype, head_dim)
        except Exception as e:  # lowering or capture failed for the whole configuration
            rows.append({"name": f"{dtype} H={head_dim}", "ok": False,
                         "error": f"{type(e).__name__}: {e}"})
    return rows


if __name__ == "__main__":
    sys.exit(harness.main("triton_compile", run))
