"""``linear`` suite: jaxla.linear (jitted) vs NumPy's ``x @ w + b`` on the same inputs, f32 and bf16.

NumPy has no bfloat16 matmul, so bf16 rows compare jaxla's bf16 (f32-accumulated) result with the
float64 reference and time NumPy in float32 as the anchor.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxla
from jaxla.benchmarks import harness, specs_linear


def _numpy_time(x: np.ndarray, w: np.ndarray, b: np.ndarray, iters: int) -> float:
    times = []
    for _ in range(iters + 1):
        t0 = time.perf_counter()
        _ = x @ w + b
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def run(*, quick: bool) -> list[dict]:
    on_gpu = jax.default_backend() != "cpu"
    shapes = specs_linear.QUICK_SHAPES if quick else (
        specs_linear.GPU_SHAPES if on_gpu else specs_linear.BENCH_SHAPES)
    iters = 3 if quick else 7
    rows = []
    for dtype in (jnp.float32, jnp.bfloat16):
        ceiling = harness.matmul_ceiling(dtype, quick=quick)
        for m, d_in, d_out in shapes:
            rng = np.random.default_rng(0)
            x64 = rng.standard_normal((m, d_in))
            w64 = rng.standard_normal((d_in, d_out)) / np.sqrt(d_in)
            b64 = rng.standard_normal(d_out)
            params = {"w": jnp.asarray(w64, dtype), "b": jnp.asarray(b64, dtype)}
            x = jnp.asarray(x64, dtype)
            fn = jax.jit(jaxla.linear)
            res = harness.measure(fn, params, x, iters=iters)
            # Reference from the exact inputs jaxla saw (after rounding to dtype), in float64.
            xr = np.asarray(x.astype(jnp.float32), np.float64)
            wr = np.asarray(params["w"].astype(jnp.float32), np.float64)
            br = np.asarray(params["b"].astype(jnp.float32), np.float64)
            ref = xr @ wr + br
            tol = 2e-2 if dtype == jnp.bfloat16 else 1e-4
            check = harness.check_close(res["out"].astype(jnp.float32), ref, rtol=tol, atol=tol)
            flops = harness.matmul_flops(m, d_out, d_in)
            np_s = None
            if not on_gpu:
                np_s = _numpy_time(x64.astype(np.float32), w64.astype(np.float32),
                                   b64.astype(np.float32), iters)
            rows.append({
                "name": f"linear {m}x{d_in}->{d_out} {jnp.dtype(dtype).name}",
                "jaxla_ms": res["median_s"] * 1e3,
                "numpy_f32_ms": None if np_s is None else np_s * 1e3,
                "speedup_vs_numpy": None if np_s is None else np_s / res["median_s"],
                "gflops": flops / res["median_s"] / 1e9,
                "frac_of_matmul_ceiling": flops / res["median_s"] / ceiling,
                "compile_s": res["compile_s"],
                "max_abs_err": check["max_abs_err"],
                "ok": check["ok"],
            })
    return rows


if __name__ == "__main__":
    raise SystemExit(harness.main("linear", run))
