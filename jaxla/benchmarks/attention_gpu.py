"""``attention_gpu`` suite: the Pallas flash-attention kernel on a GPU, checked and timed.

1. Numerics: the compiled kernel (bf16) against XLA's attention on the same inputs upcast to f32,
   forward and gradients, on odd lengths with GQA, causal, windows and key lengths.
2. Speed: the kernel against ``jax.nn.dot_product_attention(implementation="cudnn")`` and ``"xla"``:
   bf16, B·T = 16k tokens, N = 16, H = 128, T in {1024, 4096, 16384}, causal and not, forward and
   forward+backward. TFLOP/s use FlashAttention's convention (``harness.attention_flops``), and each
   is also given as a fraction of a bf16 matmul ceiling measured in the same run.

Run ``python -m jaxla.benchmarks.attention_gpu`` on the GPU (JSON goes to ``$OUT/attention_gpu.json`` when
``$OUT`` is set); ``--quick`` is a CPU smoke run in Pallas interpret mode with tiny shapes.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp

from jaxla.attention import pallas_attention
from jaxla.benchmarks import harness
from jaxla.benchmarks import specs_attention_gpu as specs


def _inputs(b, t, n, k, h, *, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (b, t, n, h), jnp.bfloat16)
    kk = jax.random.normal(keys[1], (b, t, k, h), jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, t, k, h), jnp.bfloat16)
    do = jax.random.normal(keys[3], (b, t, n, h), jnp.bfloat16)
    return q, kk, v, do


def _attend(impl, *, causal, window=None, kv_len=None, scale):
    """An attention function of (q, k, v) for one implementation."""
    if impl == "pallas":
        return lambda q, k, v: pallas_attention(
            q, k, v, scale=scale, is_causal=causal, local_window_size=window,
            key_value_seq_lengths=kv_len)
    return lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=causal, local_window_size=window,
        key_value_seq_lengths=kv_len, implementation=impl)


def _fwd_bwd(attend):
    """Forward plus backward for a fixed output cotangent: returns (dq, dk, dv)."""

    def f(q, k, v, do):
        _, vjp = jax.vjp(attend, q, k, v)
        return vjp(do)

    return f


def _checks(quick: bool) -> list[dict]:
    rows = []
    for name, b, t, n, k, h, causal, window, with_len in (
        specs.QUICK_CHECKS if quick else specs.CHECKS
    ):
        q, kk, v, do = _inputs(b, t, n, k, h, seed=1)
        kv_len = jnp.asarray([max(2, t - 7 * (i + 1)) for i in range(b)], jnp.int32) if (
            with_len) else None
        scale = h**-0.5
        got_f = _attend("pallas", causal=causal, window=window, kv_len=kv_len, scale=scale)
        ref_f = _attend("xla", causal=causal, window=window, kv_len=kv_len, scale=scale)
        up = [x.astype(jnp.float32) for x in (q, kk, v, do)]
        got = jax.jit(lambda *a, f=got_f: (f(*a[:3]), *_fwd_bwd(f)(*a)))(q, kk, v, do)
        ref = jax.jit(lambda *a, f=ref_f: (f(*a[:3]), *_fwd_bwd(f)(*a)))(*up)
        for part, g, r in zip(("out", "dq", "dk", "dv"), got, ref, strict=True):
            # bf16 inputs and outputs: tolerance relative to the largest reference entry.
            bound = 2e-2 * max(1.0, float(jnp.max(jnp.abs(r))))
            rows.append({"name": f"check {name} {part}", "T": t,
                         **harness.check_close(g.astype(jnp.float32), r, rtol=2e-2, atol=bound)})
    return rows


def _timings(quick: bool, ceiling: float) -> list[dict]:
    on_gpu = jax.default_backend() == "gpu"
    tokens = specs.QUICK_TOKENS if quick else specs.TOKENS
    n = specs.QUICK_HEADS if quick else specs.HEADS
    h = specs.QUICK_HEAD_DIM if quick else specs.HEAD_DIM
    iters = 2 if quick else 10
    rows = []
    for t in specs.QUICK_SEQ_LENS if quick else specs.SEQ_LENS:
        b = max(1, tokens // t)
        q, k, v, do = _inputs(b, t, n, n, h)
        for causal in (True,) if quick else (False, True):
            for backward in (False, True):
                mode = "fwd+bwd" if backward else "fwd"
                flops = harness.attention_flops(b, n, t, t, h, causal=causal, backward=backward)
                row = {"name": f"T={t} {'causal' if causal else 'full'} {mode}", "B": b}
                for impl in specs.IMPLEMENTATIONS:
                    if impl == "cudnn" and not on_gpu:
                        row["cudnn_tflops"] = None
                        continue
                    attend = _attend(impl, causal=causal, scale=h**-0.5)
                    fn = jax.jit(_fwd_bwd(attend)) if backward else jax.jit(attend)
                    args = (q, k, v, do) if backward else (q, k, v)
                    try:
                        res = harness.measure(fn, *args, iters=iters)
                    except Exception as e:  # e.g. XLA running out of memory at T = 16k
                        row[f"{impl}_error"] = f"{type(e).__name__}: {str(e)[:80]}"
                        continue
                    row[f"{impl}_ms"] = res["median_s"] * 1e3
                    row[f"{impl}_tflops"] = flops / res["median_s"] / 1e12
                    row[f"{impl}_compile_s"] = res["compile_s"]
                pallas = row.get("pallas_tflops")
                for impl in specs.IMPLEMENTATIONS:
                    if row.get(f"{impl}_tflops") is not None:
                        row[f"{impl}_frac_ceiling"] = row[f"{impl}_tflops"] * 1e12 / ceiling
                if pallas is not None and row.get("cudnn_tflops"):
                    row["pallas_vs_cudnn"] = pallas / row["cudnn_tflops"]
                rows.append(row)
    return rows


def run(*, quick: bool) -> list[dict]:
    ceiling = harness.matmul_ceiling(jnp.bfloat16, quick=quick)
    rows = _checks(quick)
    rows.append({"name": "bf16 matmul ceiling", "tflops": ceiling / 1e12})
    # Timing rows last: they are the summary table main() prints at the end.
    return rows + _timings(quick, ceiling)


def _argv() -> list[str]:
    argv = sys.argv[1:]
    out = os.environ.get("OUT")
    if out and "--json" not in argv:
        argv += ["--json", os.path.join(out, "attention_gpu.json")]
    return argv


if __name__ == "__main__":
    sys.exit(harness.main("attention_gpu", run, _argv()))
