"""Tests specific to the compiled CPU attention kernels (implementation="cpu", _cpu_ext.cc).

Values, logsumexp, gradients, empty rows, odd lengths, NaN/inf and bfloat16 against the float64
reference are checked for every backend, this one included, in test_attention_conformance.py. Here:
the build, dispatch, jax.nn parity, and composition with jit/vmap/grad/checkpoint and sharding.
"""

from __future__ import annotations

import functools
import platform
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxla
from jaxla.attention import _cpu, select_implementation

REASON = _cpu.available()
needs_kernel = pytest.mark.skipif(REASON is not None, reason=f"CPU kernel unavailable: {REASON}")
# Tiles of a few positions, so short sequences already span several blocks and partial tiles.
SMALL = jaxla.ChunkedBlockSizes(block_q=3, block_k=16)


def test_kernel_is_built_where_it_can_be():
    """On Linux x86-64 with a C++ compiler and AVX2, `pip install` must have built the kernel."""
    flags = ""
    if platform.system() == "Linux":
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    buildable = (platform.machine() == "x86_64" and shutil.which("c++") is not None
                 and " avx2" in flags and " fma" in flags)
    if not buildable:
        pytest.skip("not a platform where the build is required")
    assert REASON is None, REASON


@needs_kernel
def test_check_grads_float32(rng):
    q, k, v = (jnp.asarray(rng.normal(size=(1, 9, 2, 8)), jnp.float32) for _ in range(3))
    f = jax.jit(lambda q, k, v: jaxla.dot_product_attention(
        q, k, v, is_causal=True, implementation="cpu", block_sizes=SMALL))
    check_grads(f, (q, k, v), order=1, modes=("rev",), atol=2e-2, rtol=2e-2)


@needs_kernel
def test_matches_jax_nn(rng):
    q, k, v = (jnp.asarray(rng.normal(size=sh), jnp.float32)
               for sh in ((2, 70, 8, 16), (2, 70, 2, 16), (2, 70, 2, 16)))
    lens = jnp.array([70, 31], jnp.int32)
    for kw in (dict(is_causal=True), dict(local_window_size=(5, 2)),
               dict(query_seq_lengths=lens, key_value_seq_lengths=lens)):
        ours = jaxla.dot_product_attention(q, k, v, implementation="cpu", **kw)
        theirs = jax.nn.dot_product_attention(q, k, v, **kw)
        if "query_seq_lengths" in kw:  # jax.nn fills padded query rows with mean(V); jaxla gives 0
            ours, theirs = ours[1, :31], theirs[1, :31]
        np.testing.assert_allclose(ours, theirs, atol=2e-5)


@needs_kernel
def test_composes_with_jit_vmap_grad_checkpoint(rng):
    q, k, v = (jnp.asarray(rng.normal(size=(3, 2, 20, 2, 8)), jnp.float32) for _ in range(3))

    def batched(impl):
        def loss(q, k, v):
            out = jaxla.dot_product_attention(q, k, v, is_causal=True, implementation=impl,
                                              block_sizes=SMALL if impl == "cpu" else None)
            return jnp.sum(jnp.sin(out))

        return jax.jit(jax.vmap(jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2))))

    for a, b in zip(batched("cpu")(q, k, v), batched("xla")(q, k, v), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5)


@needs_kernel
def test_vmap_over_lengths_and_segments(rng):
    q, k, v = (jnp.asarray(rng.normal(size=(3, 2, 12, 2, 8)), jnp.float32) for _ in range(3))
    lens = jnp.asarray(rng.integers(0, 13, size=(3, 2)), jnp.int32)
    seg = jnp.asarray(np.sort(rng.integers(0, 3, size=(3, 2, 12)), axis=-1), jnp.int32)

    def f(impl):
        return jax.jit(jax.vmap(lambda q, k, v, n, s: jaxla.dot_product_attention(
            q, k, v, key_value_seq_lengths=n, segment_ids=s, implementation=impl)))

    np.testing.assert_allclose(f("cpu")(q, k, v, lens, seg), f("xla")(q, k, v, lens, seg), atol=2e-5)


@needs_kernel
def test_sharded_inputs_on_a_mesh(rng):
    devices = np.array(jax.devices()[:2])
    mesh = jax.sharding.Mesh(devices, ("data",))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    q, k, v = (jax.device_put(jnp.asarray(rng.normal(size=(4, 16, 2, 8)), jnp.float32), spec)
               for _ in range(3))
    f = jax.jit(functools.partial(jaxla.dot_product_attention, is_causal=True, implementation="cpu"))
    want = jaxla.dot_product_attention(*(np.asarray(x) for x in (q, k, v)), is_causal=True,
                                       implementation="xla")
    np.testing.assert_allclose(f(q, k, v), want, atol=2e-5)


@needs_kernel
def test_dispatch_prefers_the_kernel_and_falls_back(rng):
    q = jnp.asarray(rng.normal(size=(1, 40, 2, 8)), jnp.float32)
    bias, mask = jnp.zeros((1, 1, 40, 40)), jnp.ones((1, 1, 40, 40), bool)
    assert select_implementation(q, q, q) == "cpu"
    assert select_implementation(q, q, q, bias) == "xla"
    odd = jnp.zeros((1, 300, 2, 4), jnp.float32)
    assert select_implementation(odd, odd, odd) == "chunked"
    for args, kw, match in (((q, q, q, bias), {}, "bias"), ((q, q, q, None, mask), {}, "mask"),
                            ((q, q, q), dict(logits_soft_cap=5.0), "logits_soft_cap"),
                            ((odd, odd, odd), {}, "multiples of 8")):
        for fn in (select_implementation, jaxla.dot_product_attention):
            with pytest.raises(ValueError, match=f'implementation="cpu" cannot run.*{match}'):
                fn(*args, implementation="cpu", **kw)


@needs_kernel
def test_float64_goes_to_chunked_and_is_a_clear_error_for_cpu(rng, x64):
    q = jnp.asarray(rng.normal(size=(1, 200, 2, 8)), jnp.float64)
    assert select_implementation(q, q, q) == "chunked"
    with pytest.raises(ValueError, match="float64"):
        jaxla.dot_product_attention(q, q, q, implementation="cpu")
