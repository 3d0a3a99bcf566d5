"""The CPU kernel's code paths, dtypes and tiles side by side, interleaved in one process.

On a shared or noisy machine, timings taken one configuration after another drift with the load;
here every round runs each variant (and the XLA and NumPy matmul that set the ceiling) once, and the
best of the rounds is reported, so the ratios between variants are taken under the same load.

    python -m jaxla.benchmarks._attention_paths fwd 2048 5 avx512 avx512:bf16 avx2
    python -m jaxla.benchmarks._attention_paths fwd 2048 5 avx512 avx512:amx avx512:avx512bf16
    python -m jaxla.benchmarks._attention_paths fwd+bwd 2048 3 avx512@96x256 avx512@96x512

A variant is ``[BUILD.so:]PATH[:bf16|:amx|:avx512bf16][@ROWSxKEYS]``: another build of the extension
to run instead of this checkout's (e.g. a copy of the previous ``_cpu_ext*.so``, so old and new
kernels are compared under the same load), a code path from ``supported_paths()``, bf16 inputs
instead of f32 (``:bf16`` with the build's default bf16 GEMMs, ``:amx`` on AMX tiles,
``:avx512bf16`` with AVX512-BF16 dot products), and the kernel's tiles (query rows × keys; default:
the path's own).

    python -m jaxla.benchmarks._attention_paths fwd 2048 5 /tmp/old/_cpu_ext.so:avx512 avx512
Shapes: B = 1, N = K = 8, H = 64 (the suite's headline case), causal and not. Prints one line per
variant and mask: best time, GFLOP/s (FlashAttention convention), the fraction of the ceiling (for
bf16 variants the bf16 ceiling: the better of XLA's bf16 matmul, measured only when a bf16 variant
is listed, and the f32 ceiling, which the same product reaches on the upcast values), and
the least CPU time of the process (all threads) over the rounds: the work done, which time slicing
by other processes on a loaded machine leaves nearly alone (thread-pool spinning included). The
causal line ends with its rate over the non-causal one of the same variant (per useful FLOP: the
FlashAttention convention counts causal FLOPs as half).
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import os
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import jaxla
from jaxla.benchmarks import harness
from jaxla.benchmarks import specs_attention as specs

_OPENBLAS_SPIN_S = 0.3  # longer than OpenBLAS's spin after a call (2^28 cycles by default)

USAGE = ("usage: python -m jaxla.benchmarks._attention_paths fwd|fwd+bwd T ROUNDS "
         "[BUILD.so:]PATH[:bf16|:amx|:avx512bf16][@ROWSxKEYS] ...")
_BF16_SUFFIXES = ("bf16", "amx", "avx512bf16")  # bf16 inputs: the default kernel, or this one


class Variant(NamedTuple):
    path: str
    bf16: bool
    tiles: tuple[int, int] | None
    build: str | None = None  # another build's .so file, or None for this checkout's
    bf16_kernel: str | None = None  # "amx" or "avx512bf16"; None: the build's default

    @property
    def label(self) -> str:
        tiles = "" if self.tiles is None else f"@{self.tiles[0]}x{self.tiles[1]}"
        build = "" if self.build is None else os.path.basename(os.path.dirname(self.build)) + ":"
        dtype = "" if not self.bf16 else f":{self.bf16_kernel or 'bf16'}"
        return f"{build}{self.path}{dtype}{tiles}"


_BUILDS: dict[str, object] = {}  # .so file -> the copy of jaxla.attention._cpu bound to it


def _backend(build: str | None):
    """jaxla.attention._cpu, or for ``build`` a copy of it bound to that .so (FFI targets renamed)."""
    from jaxla.attention import _cpu

    if build is None:
        return _cpu
    if build in _BUILDS:
        return _BUILDS[build]
    if not os.path.isfile(build):
        raise ValueError(f"build {build!r} is not a file")
    tag = f"jaxla_bench_build{len(_BUILDS)}"
    # The extension's init function is PyInit__cpu_ext, so its module name must end in _cpu_ext.
    loader = importlib.machinery.ExtensionFileLoader(f"{tag}._cpu_ext", build)
    ext = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(ext)
    spec = importlib.util.spec_from_file_location(f"{tag}._cpu", _cpu.__file__)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # (dataclasses look their module up there)
    spec.loader.exec_module(mod)
    ids, supported = ext.paths()
    names = {"jaxla_attention_fwd": f"{tag}_fwd", "jaxla_attention_bwd": f"{tag}_bwd"}
    for name, capsule in ext.registrations().items():
        jax.ffi.register_ffi_target(names[name], capsule, platform="cpu")
    mod._cpu_ext, mod._PATH_IDS, mod._SUPPORTED = ext, ids, tuple(supported)
    mod._BF16_BACKWARD = bool(getattr(ext, "BF16_BACKWARD", 0))
    mod._BF16_SUPPORTED = mod._supported_bf16_kernels(ext)
    mod._BF16_KERNEL = mod._BF16_SUPPORTED[0] if mod._BF16_SUPPORTED else None
    mod._FWD, mod._BWD = names["jaxla_attention_fwd"], names["jaxla_attention_bwd"]
    mod._PATH, mod._PATH_ERROR, mod._registered = mod._SUPPORTED[0], None, True
    _BUILDS[build] = mod
    return mod


def parse_variant(text: str) -> Variant:
    build = None
    if ".so:" in text:
        build, _, text = text.rpartition(".so:")
        build += ".so"
    cpu = _backend(build)
    spec, _, tiles = text.partition("@")
    path, _, dtype = spec.partition(":")
    if path not in cpu.supported_paths():
        raise ValueError(f"variant {text!r}: path {path!r} is not one this CPU runs "
                         f"({list(cpu.supported_paths())})")
    if dtype not in ("", *_BF16_SUFFIXES):
        raise ValueError(f"variant {text!r}: the dtype suffix must be one of "
                         f"{[':' + x for x in _BF16_SUFFIXES]}, got {dtype!r}")
    kernel = None if dtype in ("", "bf16") else dtype
    if kernel is not None and kernel not in cpu.bf16_kernels():
        raise ValueError(f"variant {text!r}: bf16 kernel {kernel!r} is not one this build runs here "
                         f"({list(cpu.bf16_kernels())})")
    block = None
    if tiles:
        try:
            rows, keys = (int(x) for x in tiles.split("x"))
        except ValueError:
            raise ValueError(f"variant {text!r}: tiles must be ROWSxKEYS, e.g. 96x512") from None
        if not (1 <= rows <= 4096 and 16 <= keys <= 8192):
            raise ValueError(f"variant {text!r}: tiles {rows}x{keys} out of range (1-4096 x 16-8192)")
        block = (rows, keys)
    return Variant(path, dtype != "", block, build, kernel)


def _compiled(variant: Variant, t: int, causal: bool, backward: bool):
    from jaxla.attention import _base
    from jaxla.attention._args import canonical_args

    hd = specs.HEADLINE
    rng = np.random.default_rng(0)
    dtype = jnp.bfloat16 if variant.bf16 else jnp.float32
    q, k, v, do = (jnp.asarray(rng.standard_normal((hd["B"], t, n, hd["H"]), np.float32), dtype)
                   for n in (hd["N"], hd["K"], hd["K"], hd["N"]))
    tiles = None if variant.tiles is None else jaxla.ChunkedBlockSizes(*variant.tiles)
    kw = {} if variant.bf16_kernel is None else dict(bf16_kernel=variant.bf16_kernel)
    attend = functools.partial(_backend(variant.build).attend, path=variant.path, block_sizes=tiles,
                               **kw)

    def fwd(q, k, v):
        return _base.run(attend, canonical_args(q, k, v, is_causal=causal))[0]

    def f(q, k, v, do):
        if not backward:
            return fwd(q, k, v)
        _out, vjp = jax.vjp(fwd, q, k, v)
        return vjp(do)

    return functools.partial(jax.jit(f).lower(q, k, v, do).compile(), q, k, v, do)


def causal_ratios(noncausal_s, causal_s, flop_ratio: float) -> np.ndarray:
    """Per-round causal rate over non-causal rate (per useful FLOP) from paired round times.

    ``flop_ratio`` is causal FLOPs / non-causal FLOPs (about 1/2); round i's ratio is
    ``flop_ratio * noncausal_s[i] / causal_s[i]``.
    """
    nc, c = np.asarray(noncausal_s, np.float64), np.asarray(causal_s, np.float64)
    if nc.shape != c.shape or nc.ndim != 1 or nc.size == 0:
        raise ValueError(f"causal_ratios: need two equal-length 1-D time lists, got {nc.shape} "
                         f"and {c.shape}")
    return flop_ratio * nc / c


def compare(mode: str, t: int, rounds: int, variants: list[Variant]) -> list[str]:
    if mode not in ("fwd", "fwd+bwd"):
        raise ValueError(f"mode must be 'fwd' or 'fwd+bwd', got {mode!r}")
    n = 2048
    a = jnp.asarray(np.random.default_rng(1).standard_normal((n, n), np.float32))
    mm = jax.jit(lambda x, y: x @ y).lower(a, a).compile()
    na = np.asarray(a)
    fns = {"xla": lambda: mm(a, a), "numpy": lambda: na @ na}
    if any(var.bf16 for var in variants):
        # bf16 kernels are held to the machine's bf16 matmul (XLA's, f32 accumulation: oneDNN's AMX
        # or AVX512-BF16 GEMMs where the CPU has them), not to the f32 one they may well exceed.
        b16 = a.astype(jnp.bfloat16)
        mm16 = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32)
                       ).lower(b16, b16).compile()
        fns["xla_bf16"] = lambda: mm16(b16, b16)
    for var in variants:
        for causal in (False, True):
            fns[(var, causal)] = _compiled(var, t, causal, mode == "fwd+bwd")
    best = dict.fromkeys(fns, float("inf"))
    cpu = dict.fromkeys(fns, float("inf"))  # the process's CPU time (all threads) of the same calls
    times = {key: [] for key in fns}  # every round's time, for the per-round causal ratios
    for _ in range(rounds):
        for key, fn in fns.items():
            jax.block_until_ready(fn())  # warm: caches and thread pool
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn())
            times[key].append(time.perf_counter() - t0)
            best[key] = min(best[key], times[key][-1])
            cpu[key] = min(cpu[key], time.process_time() - c0)
            if key == "numpy":
                # OpenBLAS's threads spin for a while (~0.1 s) after each call before they sleep:
                # without this pause they took a core from the next variant (the first one listed
                # ran up to 1.25x slower than an identical build listed after it).
                time.sleep(_OPENBLAS_SPIN_S)
    mm_flops = harness.matmul_flops(n, n, n)
    ceiling = max(mm_flops / best["xla"], mm_flops / best["numpy"])
    hd = specs.HEADLINE
    # A bf16 product is also the f32 one on the upcast values (exact products, f32 sums): where
    # the CPU has no bf16 units that is the faster way, and the bf16 ceiling is the better of both.
    xla16 = mm_flops / best["xla_bf16"] if "xla_bf16" in best else None
    ceiling16 = max(xla16, ceiling) if xla16 else None
    lines = [f"ceiling {ceiling / 1e9:.0f} GFLOP/s (XLA {mm_flops / best['xla'] / 1e9:.0f}, "
             f"NumPy {mm_flops / best['numpy'] / 1e9:.0f})"
             + (f", bf16 ceiling {ceiling16 / 1e9:.0f} GFLOP/s (XLA bf16 {xla16 / 1e9:.0f}, "
                "f32 on the bf16 values: the f32 ceiling)" if ceiling16 else "")
             + f"; {rounds} rounds, best of each"]
    for var in variants:
        own = ceiling16 if var.bf16 else ceiling
        rate, flops_of = {}, {}
        for causal in (False, True):
            s = best[(var, causal)]
            flops = flops_of[causal] = harness.attention_flops(
                hd["B"], hd["N"], t, t, hd["H"], causal=causal, backward=mode == "fwd+bwd")
            rate[causal] = flops / s
            line = (f"{var.label:22s} {mode} T={t} causal={causal!s:5s} {s * 1e3:8.1f} ms "
                    f"{flops / s / 1e9:6.0f} GFLOP/s {flops / s / own:5.2f} of "
                    f"{'bf16 ' if var.bf16 else ''}ceiling (CPU {cpu[(var, causal)] * 1e3:8.1f} ms)")
            if causal:  # issue 20: causal at least as efficient per useful FLOP as non-causal
                line += f" {rate[True] / rate[False]:.2f}x non-causal per FLOP"
                if rounds >= 3:
                    # The same ratio round by round (the two masks run back to back in each
                    # round): its median and range show how much of a best-of ratio is load noise.
                    r = causal_ratios(times[(var, False)], times[(var, True)],
                                      flops / flops_of[False])
                    line += f" (rounds: median {np.median(r):.2f}, {r.min():.2f}-{r.max():.2f})"
            lines.append(line)
    return lines


def main(argv: list[str]) -> int:
    if len(argv) < 4:
        print(USAGE, file=sys.stderr)
        return 2
    try:
        t, rounds = int(argv[1]), int(argv[2])
        if not (16 <= t <= 65536 and 1 <= rounds <= 100):
            raise ValueError(f"T must be in 16-65536 and ROUNDS in 1-100, got {t} and {rounds}")
        variants = [parse_variant(x) for x in argv[3:]]
        lines = compare(argv[0], t, rounds, variants)
    except ValueError as e:
        print(f"error: {e}\n{USAGE}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
