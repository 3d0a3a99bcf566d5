"""``attention`` suite: jaxla.dot_product_attention vs jax.nn.dot_product_attention (and PyTorch's
``scaled_dot_product_attention`` when torch is importable), on the same inputs in one run.

Rows: forward causal/non-causal over a T sweep, forward+backward, GQA, and the peak-memory row (causal
forward+backward at long T; jax.nn is only compiled there, for its XLA memory analysis). ``impl`` is
what ``implementation=None`` picked (``"cpu"``: the compiled kernels); ``chunked_ms`` times jaxla's
plain-JAX ``"chunked"`` path on the same inputs. Throughput uses the FlashAttention convention
(``harness.attention_flops``); ``temp_MB`` is XLA's scratch memory beyond the arguments and outputs,
which does not see scratch a compiled kernel allocates itself, so the memory row also measures the
process's peak resident memory during the run in a fresh process (``run_peak_MB``, beyond the inputs;
Linux). ``ok`` checks jaxla's output (or dQ) against jax.nn's.

The machine's ceilings are measured in the same run (first rows): the best of XLA's and NumPy's
2048³ f32 matmul (``harness.matmul_ceilings``; for bf16, XLA's bf16 matmul or NumPy's f32 one on the
bf16 values, the better) and the best of XLA's and NumPy's
large array copy; every row's ``frac_of_matmul_ceiling`` divides by the f32 one (above 1 means the
ceiling was measured low: a loaded machine), and bf16 rows also give
``frac_of_bf16_matmul_ceiling`` against the bf16 one (a bf16 kernel may exceed the f32 ceiling:
AMX, AVX512-BF16). The CPU model, its vector flags and the compiled kernel's code path are in the
JSON's ``machine``. On CPU the suite also times: the kernel's other code paths
(``path avx2 ...``: forced through ``_cpu.attend(path=...)``, the same kernel an AVX2-only machine
runs), bf16 inputs (``bf16 fwd ...``, ``speedup_vs_f32`` against the f32 row of the same T and mask),
and decoding (``decode ...``: one query position against a long cache, whose rate is the bytes of K
and V read per second, ``frac_of_copy_bw`` of the measured copy bandwidth).

    python -m jaxla.benchmarks.attention --quick
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxla
from jaxla.benchmarks import harness
from jaxla.benchmarks import specs_attention as specs

try:  # optional comparison; torch is not a dependency
    import torch
except ImportError:  # pragma: no cover - depends on the environment
    torch = None


def _inputs(b, t, n, k, h, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, n, h), np.float32)
    kk = rng.standard_normal((b, t, k, h), np.float32)
    v = rng.standard_normal((b, t, k, h), np.float32)
    do = rng.standard_normal((b, t, n, h), np.float32)
    return q, kk, v, do


def _path_attention(path):
    """jaxla's CPU kernel forced onto code path ``path`` (the same call implementation="cpu" makes)."""
    from jaxla.attention import _base, _cpu
    from jaxla.attention._args import canonical_args

    def attn(q, k, v, *, is_causal):
        args = canonical_args(q, k, v, is_causal=is_causal)
        return _base.run(functools.partial(_cpu.attend, path=path), args)[0]

    return attn


def _jax_fn(attn, causal, backward, **kw):
    if not backward:
        return jax.jit(lambda q, k, v, do: attn(q, k, v, is_causal=causal, **kw))

    def grads(q, k, v, do):
        _out, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, is_causal=causal, **kw), q, k, v)
        return vjp(do)

    return jax.jit(grads)


def _memory_probe(t):
    """Runs jaxla.benchmarks._attention_memory in a fresh process; its JSON, or None if it failed."""
    root = Path(__file__).resolve().parents[2]  # the child imports the jaxla this process imported
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(root), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-m", "jaxla.benchmarks._attention_memory", str(t)],
                          capture_output=True, text=True, check=False, cwd=root, env=env)
    if proc.returncode != 0:
        print(f"memory probe failed: {proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _torch_ms(q, k, v, do, causal, backward, iters):
    if torch is None or jax.default_backend() != "cpu":
        return None
    tq, tk, tv, tdo = (torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1, 3)))
                       for x in (q, k, v, do))
    gqa = tq.shape[1] != tk.shape[1]
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def once():
        if backward:
            a, b, c = (x.detach().requires_grad_() for x in (tq, tk, tv))
            out = sdpa(a, b, c, is_causal=causal, enable_gqa=gqa)
            out.backward(tdo)
        else:
            with torch.no_grad():
                sdpa(tq, tk, tv, is_causal=causal, enable_gqa=gqa)

    try:
        once()
    except TypeError:  # torch without enable_gqa
        return None
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def _row(name, b, t, n, k, h, *, causal, backward, iters, ceiling, compare=True, chunked=False,
         path=None, dtype=np.float32):
    q, kk, v, do = _inputs(b, t, n, k, h)
    args = [jnp.asarray(x, dtype) for x in (q, kk, v, do)]
    flops = harness.attention_flops(b, n, t, t, h, causal=causal, backward=backward)
    attn = jaxla.dot_product_attention if path is None else _path_attention(path)
    ours = harness.measure(_jax_fn(attn, causal, backward), *args,
                           iters=iters, warmup=1 if iters > 1 else 0)
    impl = jaxla.attention.select_implementation(*args[:3], is_causal=causal)
    row = {
        "name": name,
        "T": t,
        "causal": causal,
        "impl": impl,
        "path": path or (_kernel_path() if impl == "cpu" else None),
        "jaxla_ms": ours["median_s"] * 1e3,
        "jaxla_gflops": flops / ours["median_s"] / 1e9,
        "frac_of_matmul_ceiling": flops / ours["median_s"] / ceiling,
        "jaxla_temp_MB": None if ours["temp_bytes"] is None else ours["temp_bytes"] / 2**20,
    }
    if chunked and row["impl"] != "chunked":
        alt = harness.measure(_jax_fn(jaxla.dot_product_attention, causal, backward,
                                      implementation="chunked"),
                              *args, iters=iters, warmup=1 if iters > 1 else 0)
        row["chunked_ms"] = alt["median_s"] * 1e3
    ref_fn = _jax_fn(jax.nn.dot_product_attention, causal, backward)
    if compare:
        ref_args = [x.astype(jnp.float32) for x in args]  # bf16 rows: the f32 result of the same inputs
        ref = harness.measure(ref_fn, *ref_args, iters=iters, warmup=1 if iters > 1 else 0)
        ours_out = ours["out"][0] if backward else ours["out"]
        ref_out = ref["out"][0] if backward else ref["out"]
        tol = 1e-3 if dtype == np.float32 else 2e-2  # bf16: the output's own rounding (2^-8) and more
        check = harness.check_close(ours_out, ref_out, rtol=tol, atol=tol)
        row.update({
            "jax_nn_ms": ref["median_s"] * 1e3,
            "speedup_vs_jax_nn": ref["median_s"] / ours["median_s"],
            "jax_nn_temp_MB": None if ref["temp_bytes"] is None else ref["temp_bytes"] / 2**20,
            "max_abs_err": check["max_abs_err"],
            "ok": check["ok"],
        })
    elif path is None:  # too big to run jax.nn here: its compiled memory analysis only
        analysis = ref_fn.lower(*args).compile().memory_analysis()
        row["jax_nn_temp_MB"] = None if analysis is None else analysis.temp_size_in_bytes / 2**20
        probe = _memory_probe(t) if jax.default_backend() == "cpu" else None
        if probe is not None:
            row["run_peak_MB"] = probe["run_peak_MB"]
    torch_ms = (_torch_ms(q, kk, v, do, causal, backward, iters)
                if compare and path is None and dtype == np.float32 else None)
    if torch_ms is not None:
        row["torch_ms"] = torch_ms
        row["frac_of_torch"] = torch_ms / row["jaxla_ms"]
    return row


def _kernel_path():
    from jaxla.attention import _cpu

    return _cpu.kernel_path()


def _ceiling_rows(quick):
    """The machine's matmul and copy ceilings, measured now (first rows of the suite)."""
    f32 = harness.matmul_ceilings(jnp.float32, quick=quick)
    bf16 = harness.matmul_ceilings(jnp.bfloat16, quick=quick)
    copy = harness.copy_bandwidths(quick=quick)
    n = 1024 if quick else 2048
    rows = [
        {"name": f"ceiling matmul {n}^3 f32", "xla_gflops": f32.xla / 1e9,
         "numpy_gflops": None if f32.numpy is None else f32.numpy / 1e9, "ceiling_gflops": f32.best / 1e9},
        {"name": f"ceiling matmul {n}^3 bf16", "xla_gflops": bf16.xla / 1e9,
         "numpy_f32_gflops": None if bf16.numpy is None else bf16.numpy / 1e9,
         "ceiling_gflops": bf16.best / 1e9},
        {"name": "ceiling copy", "xla_GBps": copy.xla / 1e9,
         "numpy_GBps": None if copy.numpy is None else copy.numpy / 1e9, "ceiling_GBps": copy.best / 1e9},
    ]
    return rows, f32.best, bf16.best, copy.best


def _decode_row(b, s, n, k, h, *, iters, copy_bw):
    """One query position against an S-long cache: memory-bound, so its rate is K/V bytes per second."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((b, 1, n, h), np.float32))
    kk, v = (jnp.asarray(rng.standard_normal((b, s, k, h), np.float32)) for _ in range(2))
    lens = jnp.full((b,), s, jnp.int32)

    def attn(fn):  # a decoding step: the whole cache is valid
        return jax.jit(lambda q, k, v: fn(q, k, v, key_value_seq_lengths=lens))

    ours = harness.measure(attn(jaxla.dot_product_attention), q, kk, v, iters=iters, warmup=1)
    ref = harness.measure(attn(jax.nn.dot_product_attention), q, kk, v, iters=iters, warmup=1)
    bytes_read = kk.nbytes + v.nbytes + q.nbytes
    check = harness.check_close(ours["out"], ref["out"], rtol=1e-3, atol=1e-3)
    impl = jaxla.attention.select_implementation(q, kk, v)
    return {
        "name": f"decode B={b} S={s} N={n} K={k}",
        "T": 1,
        "impl": impl,
        "path": _kernel_path() if impl == "cpu" else None,
        "jaxla_ms": ours["median_s"] * 1e3,
        "jaxla_GBps": bytes_read / ours["median_s"] / 1e9,
        "frac_of_copy_bw": bytes_read / ours["median_s"] / copy_bw,
        "jax_nn_ms": ref["median_s"] * 1e3,
        "speedup_vs_jax_nn": ref["median_s"] / ours["median_s"],
        "max_abs_err": check["max_abs_err"],
        "ok": check["ok"],
    }


def run(*, quick: bool) -> list[dict]:
    on_cpu = jax.default_backend() == "cpu"
    hd = specs.HEADLINE
    b, n, k, h = hd["B"], hd["N"], hd["K"], hd["H"]
    if quick:
        fwd_t, bwd_t, gqa, mem_t = (specs.QUICK_FORWARD_T, specs.QUICK_FWD_BWD_T, specs.QUICK_GQA,
                                    specs.QUICK_MEMORY_T)
    elif on_cpu:
        fwd_t, bwd_t, gqa, mem_t = specs.FORWARD_T, specs.FWD_BWD_T, specs.GQA, specs.MEMORY_T
    else:
        fwd_t, bwd_t, gqa, mem_t = (specs.GPU_FORWARD_T, specs.GPU_FWD_BWD_T, specs.GQA,
                                    specs.MEMORY_T)
    iters = 2 if quick else 3
    # The achievable rates on this machine now, measured in the same run.
    rows, ceiling, ceiling16, copy_bw = _ceiling_rows(quick)
    for t in fwd_t:
        for causal in (False, True):
            rows.append(_row(f"fwd T={t}", b, t, n, k, h, causal=causal, backward=False,
                             iters=iters, ceiling=ceiling, chunked=on_cpu))
    for t in bwd_t:
        for causal in (False, True):
            # Two timed runs (after a warm-up) keep the suite within its 2-minute budget on 2 cores.
            rows.append(_row(f"fwd+bwd T={t}", b, t, n, k, h, causal=causal, backward=True,
                             iters=min(iters, 2), ceiling=ceiling, chunked=on_cpu and not quick))
    if on_cpu and _kernel_path() is not None:
        from jaxla.attention import _cpu

        by_key = {(r["name"], r.get("causal")): r for r in rows}
        cmp_t = fwd_t[-2:]
        # The kernel's other code paths on the same inputs (what an AVX2-only machine runs), and bf16.
        for path in _cpu.supported_paths():
            if path in (_kernel_path(), "portable"):
                continue
            for t in cmp_t:
                for causal in (False, True):
                    rows.append(_row(f"path {path} fwd T={t}", b, t, n, k, h, causal=causal,
                                     backward=False, iters=iters, ceiling=ceiling, compare=False,
                                     path=path))
            rows.append(_row(f"path {path} fwd+bwd T={bwd_t[0]}", b, bwd_t[0], n, k, h, causal=True,
                             backward=True, iters=min(iters, 2), ceiling=ceiling, compare=False,
                             path=path))
        for t in cmp_t:
            for causal in (False, True):
                row = _row(f"bf16 fwd T={t}", b, t, n, k, h, causal=causal, backward=False,
                           iters=iters, ceiling=ceiling, dtype=jnp.bfloat16)
                row["frac_of_bf16_matmul_ceiling"] = (row["jaxla_gflops"] * 1e9 / ceiling16
                                                      if ceiling16 else None)
                f32_row = by_key.get((f"fwd T={t}", causal))
                if f32_row is not None:
                    row["speedup_vs_f32"] = f32_row["jaxla_ms"] / row["jaxla_ms"]
                rows.append(row)
        dec = specs.QUICK_DECODE if quick else specs.DECODE
        for d in dec:
            rows.append(_decode_row(d["B"], d["S"], d["N"], d["K"], d["H"], iters=iters,
                                    copy_bw=copy_bw))
    g = gqa
    rows.append(_row(f"gqa N={g['N']} K={g['K']} T={g['T']}", g["B"], g["T"], g["N"], g["K"],
                     g["H"], causal=True, backward=False, iters=iters, ceiling=ceiling))
    rows.append(_row(f"memory fwd+bwd T={mem_t}", b, mem_t, n, k, h, causal=True, backward=True,
                     iters=1, ceiling=ceiling, compare=False))
    return rows


if __name__ == "__main__":
    raise SystemExit(harness.main("attention", run))
