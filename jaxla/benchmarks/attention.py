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

    python -m jaxla.benchmarks.attention --quick
"""

from __future__ import annotations

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


def _row(name, b, t, n, k, h, *, causal, backward, iters, ceiling, compare=True, chunked=False):
    q, kk, v, do = _inputs(b, t, n, k, h)
    args = [jnp.asarray(x) for x in (q, kk, v, do)]
    flops = harness.attention_flops(b, n, t, t, h, causal=causal, backward=backward)
    ours = harness.measure(_jax_fn(jaxla.dot_product_attention, causal, backward), *args,
                           iters=iters, warmup=1 if iters > 1 else 0)
    row = {
        "name": name,
        "T": t,
        "causal": causal,
        "impl": jaxla.attention.select_implementation(*args[:3], is_causal=causal),
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
        ref = harness.measure(ref_fn, *args, iters=iters, warmup=1 if iters > 1 else 0)
        ours_out = ours["out"][0] if backward else ours["out"]
        ref_out = ref["out"][0] if backward else ref["out"]
        check = harness.check_close(ours_out, ref_out, rtol=1e-3, atol=1e-3)
        row.update({
            "jax_nn_ms": ref["median_s"] * 1e3,
            "speedup_vs_jax_nn": ref["median_s"] / ours["median_s"],
            "jax_nn_temp_MB": None if ref["temp_bytes"] is None else ref["temp_bytes"] / 2**20,
            "max_abs_err": check["max_abs_err"],
            "ok": check["ok"],
        })
    else:  # too big to run jax.nn here: its compiled memory analysis only
        analysis = ref_fn.lower(*args).compile().memory_analysis()
        row["jax_nn_temp_MB"] = None if analysis is None else analysis.temp_size_in_bytes / 2**20
        probe = _memory_probe(t) if jax.default_backend() == "cpu" else None
        if probe is not None:
            row["run_peak_MB"] = probe["run_peak_MB"]
    torch_ms = _torch_ms(q, kk, v, do, causal, backward, iters) if compare else None
    if torch_ms is not None:
        row["torch_ms"] = torch_ms
        row["frac_of_torch"] = torch_ms / row["jaxla_ms"]
    return row


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
    # The achievable rate on this machine now: a large f32 matmul, measured in the same run.
    ceiling = harness.matmul_ceiling(jnp.float32, quick=quick)
    rows = []
    for t in fwd_t:
        for causal in (False, True):
            rows.append(_row(f"fwd T={t}", b, t, n, k, h, causal=causal, backward=False,
                             iters=iters, ceiling=ceiling, chunked=on_cpu))
    for t in bwd_t:
        for causal in (False, True):
            # Two timed runs (after a warm-up) keep the suite within its 2-minute budget on 2 cores.
            rows.append(_row(f"fwd+bwd T={t}", b, t, n, k, h, causal=causal, backward=True,
                             iters=min(iters, 2), ceiling=ceiling, chunked=on_cpu and not quick))
    g = gqa
    rows.append(_row(f"gqa N={g['N']} K={g['K']} T={g['T']}", g["B"], g["T"], g["N"], g["K"],
                     g["H"], causal=True, backward=False, iters=iters, ceiling=ceiling))
    rows.append(_row(f"memory fwd+bwd T={mem_t}", b, mem_t, n, k, h, causal=True, backward=True,
                     iters=1, ceiling=ceiling, compare=False))
    return rows


if __name__ == "__main__":
    raise SystemExit(harness.main("attention", run))
