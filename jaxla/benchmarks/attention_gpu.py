"""``attention_gpu`` suite: the Pallas flash-attention kernel on a GPU, checked and timed.

1. Numerics: the compiled kernel (bf16, one f16 case) against jaxla's plain-XLA attention on the
   same inputs upcast to f32 at highest matmul precision (no TF32), forward and gradients, on odd
   lengths with GQA/MQA, causal, windows, key lengths, soft cap, segments and head dims 64-256.
   A check that fails to compile is one row with its error; the run goes on.
2. Speed: the kernel against ``jax.nn.dot_product_attention(implementation="cudnn")`` and ``"xla"``:
   bf16, B·T = 16k tokens, N = 16, H = 128, T in {1024, 4096, 16384}, causal and not, forward and
   forward+backward (XLA's forward+backward only up to ``specs.XLA_BACKWARD_MAX_T``). TFLOP/s use
   FlashAttention's convention (``harness.attention_flops``), and each is also given as a fraction
   of a bf16 matmul ceiling measured in the same run. A cell that fails records its error.

With ``--json FILE`` the file is rewritten after every row (``"partial": true`` until the end), so a
timeout keeps every finished row.

Run ``python -m jaxla.benchmarks.attention_gpu`` on the GPU (JSON goes to ``$OUT/attention_gpu.json`` when
``$OUT`` is set); ``--quick`` is a CPU smoke run in Pallas interpret mode with tiny shapes.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Iterator

import jax
import jax.numpy as jnp

from jaxla.attention import dot_product_attention, pallas_attention
from jaxla.benchmarks import harness
from jaxla.benchmarks import specs_attention_gpu as specs


def _inputs(b, t, n, k, h, *, seed=0, dtype=jnp.bfloat16):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (b, t, n, h), dtype)
    kk = jax.random.normal(keys[1], (b, t, k, h), dtype)
    v = jax.random.normal(keys[2], (b, t, k, h), dtype)
    do = jax.random.normal(keys[3], (b, t, n, h), dtype)
    return q, kk, v, do


def _attend(impl, *, causal, scale, window=None, kv_len=None, softcap=None, segment_ids=None):
    """An attention function of (q, k, v) for one implementation.

    "pallas" is the compiled kernel; "reference" is jaxla's plain-XLA backend (it takes every
    feature the kernel takes); anything else is a ``jax.nn.dot_product_attention`` implementation.
    """
    kw = dict(scale=scale, is_causal=causal, local_window_size=window,
              key_value_seq_lengths=kv_len)
    if impl == "pallas":
        return lambda q, k, v: pallas_attention(q, k, v, logits_soft_cap=softcap,
                                                segment_ids=segment_ids, **kw)
    if impl == "reference":
        return lambda q, k, v: dot_product_attention(q, k, v, logits_soft_cap=softcap,
                                                     segment_ids=segment_ids,
                                                     implementation="xla", **kw)
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=impl, **kw)


def _fwd_bwd(attend):
    """Forward plus backward for a fixed output cotangent: returns (dq, dk, dv)."""

    def f(q, k, v, do):
        _, vjp = jax.vjp(attend, q, k, v)
        return vjp(do)

    return f


def _check_rows(check: specs.Check) -> list[dict]:
    """Rows for one check: out, dq, dk, dv of the kernel against the f32 highest-precision reference."""
    dtype = jnp.dtype(check.dtype)
    q, kk, v, do = _inputs(check.b, check.t, check.n, check.k, check.h, seed=1, dtype=dtype)
    kv_len = jnp.asarray([max(2, check.t - 7 * (i + 1)) for i in range(check.b)], jnp.int32) if (
        check.lengths) else None
    seg = jnp.broadcast_to(jnp.arange(check.t, dtype=jnp.int32) // 97, (check.b, check.t)) if (
        check.segments) else None
    kw = dict(causal=check.causal, window=check.window, kv_len=kv_len, scale=check.h**-0.5,
              softcap=check.softcap, segment_ids=seg)
    got_f, ref_f = _attend("pallas", **kw), _attend("reference", **kw)
    up = [x.astype(jnp.float32) for x in (q, kk, v, do)]
    got = jax.jit(lambda *a, f=got_f: (f(*a[:3]), *_fwd_bwd(f)(*a)))(q, kk, v, do)
    with jax.default_matmul_precision("highest"):  # f32 reference, never TF32
        ref = jax.jit(lambda *a, f=ref_f: (f(*a[:3]), *_fwd_bwd(f)(*a)))(*up)
    rows = []
    for part, g, r in zip(("out", "dq", "dk", "dv"), got, ref, strict=True):
        # Half-precision inputs and outputs: tolerance relative to the largest reference entry.
        bound = 2e-2 * max(1.0, float(jnp.max(jnp.abs(r))))
        rows.append({"name": f"check {check.name} {part}", "T": check.t,
                     **harness.check_close(g.astype(jnp.float32), r, rtol=2e-2, atol=bound)})
    return rows


def _checks(quick: bool) -> Iterator[dict]:
    for check in specs.QUICK_CHECKS if quick else specs.CHECKS:
        try:
            yield from _check_rows(check)
        except Exception as e:  # a failed compile is this check's row, not the end of the run
            yield {"name": f"check {check.name}", "T": check.t, "ok": False,
                   "error": f"{type(e).__name__}: {str(e)[:200]}"}


def _timings(quick: bool, ceiling: float) -> Iterator[dict]:
    on_gpu = jax.default_backend() == "gpu"
    tokens = specs.QUICK_TOKENS if quick else specs.TOKENS
    n = specs.QUICK_HEADS if quick else specs.HEADS
    h = specs.QUICK_HEAD_DIM if quick else specs.HEAD_DIM
    iters = 2 if quick else 10
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
                    if impl == "xla" and backward and t > specs.XLA_BACKWARD_MAX_T:
                        row["xla_error"] = f"skipped above T={specs.XLA_BACKWARD_MAX_T} (logits)"
                        continue
                    attend = _attend(impl, causal=causal, scale=h**-0.5)
                    fn = jax.jit(_fwd_bwd(attend)) if backward else jax.jit(attend)
                    args = (q, k, v, do) if backward else (q, k, v)
                    try:
                        res = harness.measure(fn, *args, iters=iters)
                    except Exception as e:  # a failed compile or out of memory: this cell only
                        row[f"{impl}_error"] = f"{type(e).__name__}: {str(e)[:120]}"
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
                yield row


def rows(*, quick: bool) -> Iterator[dict]:
    """The suite's rows one at a time: checks, the matmul ceiling, then timings."""
    yield from _checks(quick)
    try:
        ceiling = harness.matmul_ceiling(jnp.bfloat16, quick=quick)
    except Exception as e:  # the ceiling only scales the timings: they still run
        yield {"name": "bf16 matmul ceiling", "error": f"{type(e).__name__}: {str(e)[:120]}"}
        ceiling = float("nan")
    else:
        yield {"name": "bf16 matmul ceiling", "tflops": ceiling / 1e12}
    # Timing rows last: they are the summary table main() prints at the end.
    yield from _timings(quick, ceiling)


def run(*, quick: bool, partial_json: str | None = None) -> list[dict]:
    """All rows; with ``partial_json`` the rows so far are rewritten there after every row.

    A timeout or a crash mid-run then still leaves every finished row on disk (marked
    ``"partial": true``); ``main`` overwrites the file with the complete payload at the end.
    """
    done: list[dict] = []
    for row in rows(quick=quick):
        done.append(row)
        if partial_json is not None:
            harness.write_json_atomic(partial_json, {
                "suite": "attention_gpu", "quick": quick, "partial": True,
                "machine": harness.machine_info(), "rows": done})
    return done


def _argv() -> list[str]:
    argv = sys.argv[1:]
    out = os.environ.get("OUT")
    if out and "--json" not in argv:
        argv += ["--json", os.path.join(out, "attention_gpu.json")]
    return argv


def main(argv: list[str]) -> int:
    path = argv[argv.index("--json") + 1] if "--json" in argv[:-1] else None
    if path is not None and harness.output_path_problem(path):
        path = None  # harness.main reports the problem and exits before running anything
    return harness.main("attention_gpu", functools.partial(run, partial_json=path), argv)


if __name__ == "__main__":
    sys.exit(main(_argv()))
