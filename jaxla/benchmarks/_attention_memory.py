"""Peak memory of causal attention forward+backward at long T, measured in a fresh process.

The attention suite runs this as a child process (``python -m jaxla.benchmarks._attention_memory T``) so that
memory freed by earlier rows cannot hide allocations. It prints one JSON object: XLA's scratch
(``temp_MB``) and the process's peak resident memory while the compiled program runs, beyond the inputs
and the compiled program (``run_peak_MB``; includes the outputs and any kernel-allocated scratch).
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jaxla
from jaxla.benchmarks import harness
from jaxla.benchmarks import specs_attention as specs


def probe(t: int, implementation: str | None = None) -> dict:
    hd = specs.HEADLINE
    b, n, k, h = hd["B"], hd["N"], hd["K"], hd["H"]
    rng = np.random.default_rng(0)
    q, kk, v, do = (jnp.asarray(rng.standard_normal(sh, np.float32))
                    for sh in ((b, t, n, h), (b, t, k, h), (b, t, k, h), (b, t, n, h)))

    def grads(q, k, v, do):
        _out, vjp = jax.vjp(lambda q, k, v: jaxla.dot_product_attention(
            q, k, v, is_causal=True, implementation=implementation), q, k, v)
        return vjp(do)

    compiled = jax.jit(grads).lower(q, kk, v, do).compile()
    analysis = compiled.memory_analysis()
    peak = harness.run_peak_growth_bytes(compiled, q, kk, v, do)
    return {
        "T": t,
        "temp_MB": None if analysis is None else analysis.temp_size_in_bytes / 2**20,
        "run_peak_MB": None if peak is None else peak / 2**20,
        "inputs_MB": sum(x.nbytes for x in (q, kk, v, do)) / 2**20,
    }


if __name__ == "__main__":
    impl = sys.argv[2] if len(sys.argv) > 2 else None
    print(json.dumps(probe(int(sys.argv[1]), impl)))
