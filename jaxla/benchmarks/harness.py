"""The shared benchmark harness: compile apart from run, warm-up, medians, memory, numerics, FLOP/s.

Every suite module in ``jaxla.benchmarks`` (listed in ``jaxla.benchmarks.SUITES``) defines
``run(*, quick: bool) -> list[dict]`` returning flat rows (first key ``"name"``) and ends with
``harness.main("<suite>", run)``. ``main`` parses ``--quick`` and ``--json FILE`` (checked before the
suite runs, written atomically at the end), prints a readable table, and writes JSON with the
machine, the jax version and the command. Run a suite as ``jaxla bench <suite>`` or
``python -m jaxla.benchmarks.<suite>``; :func:`read_results` reads such a JSON file back.

Timing: ``measure`` lowers and compiles a jitted function once (reported as ``compile_s``), runs it
``warmup`` times, then ``iters`` times with ``block_until_ready`` and reports the median and spread.
Memory: XLA's memory analysis of the compiled executable (``temp_bytes``: scratch beyond arguments and
outputs), the device's peak on GPU/TPU, and the process peak RSS on CPU.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxla import _files

__all__ = [
    "BenchInputError",
    "ResultsFileError",
    "attention_flops",
    "check_close",
    "copy_bandwidth",
    "copy_bandwidths",
    "cpu_features",
    "format_table",
    "machine_info",
    "main",
    "matmul_ceiling",
    "matmul_ceilings",
    "matmul_flops",
    "measure",
    "output_path_problem",
    "read_results",
    "write_json_atomic",
]

# A results file is a few kB; anything far larger is not one, and reading it would only cost memory.
MAX_RESULTS_BYTES = 16 * 2**20


def _block(tree: Any) -> Any:
    return jax.block_until_ready(tree)


def _device_peak_bytes() -> int | None:
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return None
    try:
        stats = dev.memory_stats() or {}
    except Exception:  # some backends do not implement memory_stats
        return None
    return stats.get("peak_bytes_in_use")


def measure(fn: Callable, *args: Any, iters: int = 5, warmup: int = 1) -> dict[str, Any]:
    """Times a jitted function with compilation measured apart.

    Args:
      fn: a ``jax.jit``-wrapped function.
      *args: its arguments (arrays already on the device).
      iters: timed runs; the median is the headline number.
      warmup: untimed runs after compilation.

    Returns:
      dict with ``compile_s, median_s, min_s, max_s, iters, temp_bytes, peak_bytes, out``.
    """
    if not hasattr(fn, "lower"):
        fn = jax.jit(fn)
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    temp_bytes = None
    try:
        analysis = compiled.memory_analysis()
        if analysis is not None:
            temp_bytes = int(analysis.temp_size_in_bytes)
    except Exception:  # memory analysis is best-effort on some backends
        temp_bytes = None
    out = None
    for _ in range(max(warmup, 0)):
        out = _block(compiled(*args))
    times = []
    for _ in range(max(iters, 1)):
        t0 = time.perf_counter()
        out = _block(compiled(*args))
        times.append(time.perf_counter() - t0)
    return {
        "compile_s": compile_s,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "iters": len(times),
        "temp_bytes": temp_bytes,
        "peak_bytes": _device_peak_bytes(),
        "out": out,
    }


def check_close(actual: Any, expected: Any, *, rtol: float, atol: float) -> dict[str, Any]:
    """Compares two arrays in float64: max abs/rel error and whether ``|a-e| <= atol + rtol·|e|``."""
    a = np.asarray(jax.device_get(actual), dtype=np.float64)
    e = np.asarray(jax.device_get(expected), dtype=np.float64)
    if a.shape != e.shape:
        return {"max_abs_err": float("inf"), "max_rel_err": float("inf"), "ok": False}
    diff = np.abs(a - e)
    finite = bool(np.all(np.isfinite(a)))
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = float((diff / np.maximum(np.abs(e), 1e-30)).max()) if diff.size else 0.0
    ok = finite and bool(np.all(diff <= atol + rtol * np.abs(e)))
    return {"max_abs_err": max_abs, "max_rel_err": max_rel, "ok": ok}


def matmul_flops(m: int, n: int, k: int) -> float:
    """FLOPs of an (m, k) × (k, n) product: 2·m·n·k."""
    return 2.0 * m * n * k


def attention_flops(
    B: int, N: int, T: int, S: int, H: int, *, causal: bool, backward: bool = False
) -> float:
    """FlashAttention's convention: forward 4·B·N·T·S·H, halved when causal; backward 2.5× forward.

    With ``backward=True`` the count is for forward plus backward (3.5× forward).
    """
    fwd = 4.0 * B * N * T * S * H
    if causal:
        fwd /= 2.0
    return fwd * 3.5 if backward else fwd


class Ceilings(NamedTuple):
    """A measured rate two ways and the better of them (None where a way does not apply)."""

    xla: float
    numpy: float | None
    best: float


def matmul_ceilings(dtype: Any = jnp.float32, *, quick: bool = False) -> Ceilings:
    """FLOP/s of a large square matmul in ``dtype`` through XLA and (on CPU, f32/f64) NumPy, now.

    The ceiling a kernel's rate is compared with is the better of the two: on CPU, XLA's matmul
    (Eigen or oneDNN) and NumPy's BLAS (OpenBLAS or MKL) differ by up to 2× on the same machine, and
    either may be the faster one. NumPy has no bfloat16: for a bf16 ceiling on CPU its entry is
    NumPy's f32 BLAS on the same bf16 values (each product of two bf16 numbers is exact in f32, and
    the sum accumulates in f32: the same result a bf16 GEMM with f32 accumulation computes). That is
    how a CPU without bf16 units multiplies bf16 fastest; XLA's own bf16 matmul was measured at
    0.54× of it on such a machine (Intel Ice Lake, 2026-12-02), so a bf16 ceiling from XLA alone
    was a ceiling a kernel could exceed.
    """
    on_cpu = jax.devices()[0].platform == "cpu"
    n = (1024 if quick else 2048) if on_cpu else (4096 if quick else 8192)
    iters = 3 if quick else 7
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (n, n), dtype)
    b = jax.random.normal(key_b, (n, n), dtype)
    fn = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32).astype(dtype))
    xla = matmul_flops(n, n, n) / measure(fn, a, b, iters=iters)["median_s"]
    np_rate = None
    if on_cpu and jnp.dtype(dtype) in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64),
                                       jnp.dtype(jnp.bfloat16)):
        wide = np.float32 if jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16) else None
        na, nb = np.asarray(a, wide), np.asarray(b, wide)
        out = np.empty_like(na)
        np.matmul(na, nb, out=out)  # warm-up (BLAS thread start-up)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            np.matmul(na, nb, out=out)
            times.append(time.perf_counter() - t0)
        np_rate = matmul_flops(n, n, n) / statistics.median(times)
    return Ceilings(xla, np_rate, max(xla, np_rate or 0.0))


def matmul_ceiling(dtype: Any = jnp.float32, *, quick: bool = False) -> float:
    """FLOP/s of a large square matmul in ``dtype``, measured now: the best of XLA and NumPy."""
    return matmul_ceilings(dtype, quick=quick).best


def copy_bandwidths(*, quick: bool = False) -> Ceilings:
    """Bytes/s (read + write) of a large array copy through XLA and (on CPU) NumPy, measured now."""
    n = (1 << 22) if quick else (1 << 26)
    x = jnp.ones((n,), jnp.float32)
    xla = 2.0 * x.nbytes / measure(jax.jit(lambda v: v * 1.0 + 0.0), x, iters=5)["median_s"]
    np_rate = None
    if jax.devices()[0].platform == "cpu":
        src = np.ones((n,), np.float32)
        dst = np.empty_like(src)
        np.copyto(dst, src)  # first touch of dst's pages
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            np.copyto(dst, src)
            times.append(time.perf_counter() - t0)
        np_rate = 2.0 * src.nbytes / statistics.median(times)
    return Ceilings(xla, np_rate, max(xla, np_rate or 0.0))


def copy_bandwidth(*, quick: bool = False) -> float:
    """Bytes/s of a device-to-device copy (read + write), measured now: the best of XLA and NumPy."""
    return copy_bandwidths(quick=quick).best


# The vector instruction sets worth recording with a CPU result (names as /proc/cpuinfo spells them).
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512dq", "avx512bw", "avx512vl",
              "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16",
              "amx_int8", "asimd", "sve", "sve2")


def cpu_features() -> dict[str, Any]:
    """CPU model, vector instruction-set flags and the compiled attention kernel's code path.

    Linux reads /proc/cpuinfo; elsewhere the model is ``platform.processor()`` and the flags are
    unknown (None). ``cpu_kernel_path`` is what ``implementation="cpu"`` runs here (None when the
    kernel is unavailable), ``cpu_bf16_kernel`` the GEMMs its bf16 calls use (``"amx"`` or
    ``"avx512bf16"``; None without AVX512-BF16).
    """
    model, flags = platform.processor() or None, None
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read(1 << 20)
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model", "cpu model") and model in (None, "", platform.machine()):
            model = value.strip()
        elif key in ("flags", "Features") and flags is None:
            have = set(value.split())
            flags = [f for f in SIMD_FLAGS if f in have]
    try:
        from jaxla.attention import _cpu

        path = _cpu.kernel_path()
        bf16 = _cpu.bf16_kernel() if path == "avx512" else None
    except Exception:  # an unbuilt or broken extension must not stop a benchmark
        path = bf16 = None
    return {"cpu_model": model, "cpu_flags": None if flags is None else " ".join(flags),
            "cpu_kernel_path": path, "cpu_bf16_kernel": bf16}


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def run_peak_growth_bytes(fn: Callable, *args: Any) -> int | None:
    """Peak resident memory while ``fn(*args)`` runs, beyond what the process held just before.

    Counts everything the run allocates (XLA buffers, outputs, and scratch that custom kernels
    allocate themselves, which XLA's memory analysis does not see). Linux only (None elsewhere): the
    kernel's high-water mark is reset through /proc/self/clear_refs first. Run it in a fresh process
    so freed memory from earlier work cannot hide allocations.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kib("VmRSS")
    except (OSError, KeyError):
        return None
    _block(fn(*args))
    return max(0, _status_kib("VmHWM") - before) * 1024


def machine_info() -> dict[str, Any]:
    """Machine, software versions and the command, recorded with every result."""
    dev = jax.devices()[0]
    return {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", None) or _jaxlib_version(),
        "backend": jax.default_backend(),
        "device": getattr(dev, "device_kind", dev.platform),
        "device_count": jax.device_count(),
        **cpu_features(),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }


def _jaxlib_version() -> str | None:
    try:
        import jaxlib

        return jaxlib.__version__
    except Exception:
        return None


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if value == 0 or value != value:
            return f"{value:g}"
        mag = abs(value)
        if mag >= 1e4 or mag < 1e-3:
            return f"{value:.3e}"
        return f"{value:.4g}"
    if value is None:
        return "-"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table over the union of the rows' keys, in first-seen order."""
    if not rows:
        return "(no rows)"
    cols: list[str] = []
    for row in rows:
        cols.extend(k for k in row if k not in cols)
    cells = [[_fmt(row.get(c)) for c in cols] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join([line, sep, *body])


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items() if k != "out"}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and value != value:
        return None
    return value


def output_path_problem(path: str | os.PathLike, *, option: str = "--json") -> str | None:
    """Why ``path`` cannot receive an output file, or None if it can.

    Checked before a suite runs, so that a typo costs nothing: the parent directory must exist and
    take a new file, and ``path`` must not be a directory. Nothing is left behind.
    """
    text = os.fspath(path)
    if not text:
        return f"{option} needs a file name, got an empty string."
    if os.path.isdir(text):
        return f"{option} {text!r} is a directory; give a file name inside it."
    parent = os.path.dirname(os.path.abspath(text))
    if os.path.exists(parent) and not os.path.isdir(parent):
        return f"{option} {text!r}: {parent!r} is not a directory (nothing was run or written)."
    if not os.path.isdir(parent):
        return (f"{option} {text!r}: directory {parent!r} does not exist; create it first "
                "(nothing was run or written).")
    try:  # an unnamed temporary file: proves the directory takes files (root, read-only mounts)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        return (f"{option} {text!r}: cannot create a file in directory {parent!r} "
                f"({e.strerror or e}); nothing was run or written.")
    return None


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    """Writes JSON through a temp file in the same (existing) directory, then renames it into place."""
    _files.write_atomic_text(path, json.dumps(_jsonable(payload), indent=2) + "\n")


class BenchInputError(ValueError):
    """Bad input to a benchmark command (a path, a missing optional package); says what and why."""


class ResultsFileError(BenchInputError):
    """A results JSON file that cannot be read or is not what a suite writes; names the file."""


_CELL_TYPES = (str, int, float, bool, type(None))


def read_results(path: str | os.PathLike) -> dict[str, Any]:
    """Reads and validates a results file that :func:`main` wrote (``--json``).

    The file is treated as untrusted: it must be at most ``MAX_RESULTS_BYTES``, a JSON object whose
    ``rows`` is a list of objects with string keys and scalar values (``name`` first), and whose
    ``machine`` (if present) is an object. ``suite`` defaults to the file name.

    Raises:
      ResultsFileError: the file is missing, too large, not JSON, or not shaped like a results file.
    """
    text_path = os.fspath(path)
    try:
        size = os.path.getsize(text_path)
        if size > MAX_RESULTS_BYTES:
            raise ResultsFileError(f"results file {text_path!r} is {size} bytes, more than a results "
                                   f"file can be ({MAX_RESULTS_BYTES} bytes).")
        with open(text_path, "rb") as f:
            raw = f.read(MAX_RESULTS_BYTES + 1)
    except FileNotFoundError:
        raise ResultsFileError(f"results file {text_path!r} does not exist.") from None
    except IsADirectoryError:
        raise ResultsFileError(f"results file {text_path!r} is a directory.") from None
    except OSError as e:
        raise ResultsFileError(f"results file {text_path!r} cannot be read: {e.strerror or e}.") from None
    try:
        payload = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise ResultsFileError(f"results file {text_path!r} is not valid JSON: {reason}.") from None
    where = f"results file {text_path!r}"
    if not isinstance(payload, dict):
        raise ResultsFileError(f"{where} holds a JSON {type(payload).__name__}, expected an object "
                               "with 'suite', 'machine' and 'rows' as 'jaxla bench SUITE --json' writes.")
    rows = payload.get("rows")
    if not isinstance(rows, list):
        raise ResultsFileError(f"{where} has no list 'rows' (got {type(rows).__name__}).")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("name"), str):
            raise ResultsFileError(f"{where}: rows[{i}] is not an object with a string 'name'.")
        for key, value in row.items():
            if not isinstance(value, _CELL_TYPES):
                raise ResultsFileError(f"{where}: rows[{i}][{key!r}] is a {type(value).__name__}, "
                                       "expected a number, string, boolean or null.")
    machine = payload.get("machine", {})
    if not isinstance(machine, dict):
        raise ResultsFileError(f"{where}: 'machine' is a {type(machine).__name__}, expected an object.")
    suite = payload.get("suite")
    return {**payload, "suite": suite if isinstance(suite, str) else Path(text_path).stem,
            "machine": machine, "rows": rows}


def run_suite(suite: str, run: Callable[..., list[dict]], *, quick: bool) -> dict[str, Any]:
    """Runs one suite and returns its JSON payload (machine info, rows, wall time)."""
    t0 = time.perf_counter()
    rows = run(quick=quick)
    return {
        "suite": suite,
        "quick": quick,
        "machine": machine_info(),
        "wall_s": time.perf_counter() - t0,
        "peak_rss_bytes": peak_rss_bytes(),
        "rows": [_jsonable(r) for r in rows],
    }


def main(suite: str, run: Callable[..., list[dict]], argv: Sequence[str] | None = None) -> int:
    """Command-line entry point shared by every suite; returns the exit status.

    0: every numerics check passed; 1: a check failed (named on stderr); 2: the ``--json`` file cannot
    be written (checked before the suite runs, and again when writing at the end).
    """
    parser = argparse.ArgumentParser(prog=f"python -m jaxla.benchmarks.{suite}",
                                     description=f"jaxla {suite} benchmark suite")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, a few seconds")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    args = parser.parse_args(argv)
    if args.json is not None and (problem := output_path_problem(args.json)):
        parser.error(problem)
    payload = run_suite(suite, run, quick=args.quick)
    info = payload["machine"]
    print(f"# {suite}  ({info['date']}, {info['device']} x{info['device_count']}, "
          f"jax {info['jax']}, {payload['wall_s']:.1f} s)")
    print(format_table(payload["rows"]))
    code = 0
    if args.json is not None:
        try:
            write_json_atomic(args.json, payload)
        except OSError as e:
            print(f"error: could not write {args.json!r}: {e.strerror or e} (no partial file was left).",
                  file=sys.stderr)
            code = 2
        else:
            print(f"wrote {args.json}")
    failed = [r.get("name") for r in payload["rows"] if r.get("ok") is False]
    if failed:
        print(f"numerics check FAILED for: {', '.join(map(str, failed))}", file=sys.stderr)
        return code or 1
    return code
