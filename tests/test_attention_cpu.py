"""Tests of the compiled CPU attention kernels (implementation="cpu", jaxla/attention/_cpu_ext.cc)."""

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
from jaxla.attention import _api, _cpu
from jaxla.attention._reference import EMPTY_ROW_LSE
from tests.test_attention import _draw_case, np_attention

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


def _draw(rng):
    """A random case from test_attention's generator, restricted to what the kernel runs."""
    (q, k, v, _bias, _mask), kw, ref = _draw_case(rng, max_len=45)
    kw.pop("logits_soft_cap", None)
    ref.pop("softcap", None)
    if v.shape[-1] % 8:
        v = rng.normal(size=(*v.shape[:-1], 16))
    do = rng.normal(size=(*q.shape[:-1], v.shape[-1]))
    return (q, k, v, do), kw, ref


def _loss_and_grads(impl, kw, q, k, v, do, block_sizes=None):
    def loss(q, k, v):
        out, lse = jaxla.dot_product_attention(q, k, v, implementation=impl, return_residual=True,
                                               block_sizes=block_sizes, **kw)
        # The residual enters the loss too, so its cotangent path is checked (empty rows excluded).
        return jnp.sum(out * do) + 0.25 * jnp.sum(jnp.where(lse > -1e30, lse, 0)), (out, lse)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)


@needs_kernel
@pytest.mark.parametrize("seed", range(6))
def test_matches_float64_reference_forward_and_gradients(seed, x64):
    rng = np.random.default_rng(100 + seed)
    (q, k, v, do), kw, ref = _draw(rng)
    want, want_lse = np_attention(q, k, v, **ref)
    f32 = [jnp.asarray(x, jnp.float32) for x in (q, k, v, do)]
    f64 = [jnp.asarray(x, jnp.float64) for x in (q, k, v, do)]
    for sizes in (SMALL, None):
        (_, (out, lse)), grads = _loss_and_grads("cpu", kw, *f32, block_sizes=sizes)
        assert out.dtype == jnp.float32 and lse.dtype == jnp.float32
        np.testing.assert_allclose(out, want, atol=2e-5, rtol=1e-5, err_msg=f"{kw} {sizes}")
        np.testing.assert_allclose(lse, want_lse, atol=2e-5, rtol=1e-5, err_msg=f"{kw} {sizes}")
        # Gradients against the float64 "xla" implementation (itself checked by check_grads).
        _, want_grads = _loss_and_grads("xla", kw, *f64)
        for name, g, w in zip("qkv", grads, want_grads, strict=True):
            np.testing.assert_allclose(g, w, atol=5e-5, rtol=1e-4, err_msg=f"d{name} {kw} {sizes}")


@needs_kernel
@pytest.mark.parametrize("t,s", [(1, 1), (100, 257), (257, 100)])
def test_odd_lengths_causal_window_gqa(t, s, rng):
    q, k, v = (jnp.asarray(rng.normal(size=sh), jnp.float32)
               for sh in ((2, t, 6, 16), (2, s, 2, 16), (2, s, 2, 8)))
    kw = dict(is_causal=True, local_window_size=(40, 0))
    want, want_lse = np_attention(q, k, v, causal=True, window=(40, 0))
    out, lse = jax.jit(lambda q, k, v: jaxla.dot_product_attention(
        q, k, v, implementation="cpu", return_residual=True, **kw))(q, k, v)
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(lse, want_lse, atol=2e-5, rtol=1e-5)


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
def test_bfloat16_inputs(rng):
    q, k, v = (jnp.asarray(rng.normal(size=sh), jnp.bfloat16)
               for sh in ((2, 40, 4, 16), (2, 40, 2, 16), (2, 40, 2, 16)))
    want, _ = np_attention(*(np.asarray(x.astype(jnp.float32)) for x in (q, k, v)), causal=True)
    out = jaxla.dot_product_attention(q, k, v, is_causal=True, implementation="cpu")
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), want, atol=2e-2, rtol=2e-2)
    g = jax.grad(lambda q: jnp.sum(jaxla.dot_product_attention(
        q, k, v, is_causal=True, implementation="cpu").astype(jnp.float32)))(q)
    assert g.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(g.astype(jnp.float32))))


@needs_kernel
def test_huge_logits_and_empty_rows_never_nan(rng):
    q = jnp.asarray(rng.normal(size=(2, 20, 2, 8)) * 1e4 / np.sqrt(8), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 20, 2, 8)), jnp.float32) for _ in range(2))
    want, want_lse = np_attention(q, k, v, causal=True)
    out, lse = jaxla.dot_product_attention(q, k, v, is_causal=True, implementation="cpu",
                                           return_residual=True)
    np.testing.assert_allclose(out, want, atol=1e-4)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5)
    # Row (1, 7) is in a segment with no keys, rows (1, 8:) are past the query length.
    seg_q = np.zeros((2, 20), np.int32)
    seg_q[1, 7] = 5
    kw = dict(query_seq_lengths=jnp.array([20, 8], jnp.int32), implementation="cpu",
              segment_ids=(seg_q, np.zeros((2, 20), np.int32)), block_sizes=SMALL)
    qs = q / 1e3

    @jax.jit
    def f(q, k, v):
        return jaxla.dot_product_attention(q, k, v, return_residual=True, **kw)

    out, lse = f(qs, k, v)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a)[0] ** 2), argnums=(0, 1, 2)))(qs, k, v)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    for b, t in [(1, 7), (1, 8), (1, 19)]:
        assert np.all(np.asarray(out[b, t]) == 0) and np.all(np.asarray(lse[b, t]) == EMPTY_ROW_LSE)
        assert np.all(np.asarray(grads[0][b, t]) == 0)


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

    def args(**over):
        a = dict(query=q, key=q, value=q, bias=None, mask=None, softcap=None, window=None,
                 is_causal=False)
        a.update(over)
        return a

    assert _api._choose(None, args(), None)[0] == "cpu"
    assert _api._choose(None, args(bias=jnp.zeros((1, 1, 40, 40))), None)[0] == "xla"
    odd = jnp.zeros((1, 300, 2, 4), jnp.float32)
    assert _api._choose(None, args(query=odd, key=odd, value=odd), None)[0] == "chunked"
    for over, match in ((dict(bias=jnp.zeros((1, 1, 40, 40))), "bias"),
                        (dict(mask=jnp.ones((1, 1, 40, 40), bool)), "mask"),
                        (dict(softcap=5.0), "logits_soft_cap"),
                        (dict(query=odd, key=odd, value=odd), "multiples of 8")):
        with pytest.raises(ValueError, match=f'implementation="cpu" cannot run.*{match}'):
            _api._choose("cpu", args(**over), None)


@needs_kernel
def test_float64_goes_to_chunked_and_is_a_clear_error_for_cpu(rng, x64):
    q = jnp.asarray(rng.normal(size=(1, 200, 2, 8)), jnp.float64)
    a = dict(query=q, key=q, value=q, bias=None, mask=None, softcap=None, window=None)
    assert _api._choose(None, a, None)[0] == "chunked"
    with pytest.raises(ValueError, match="float64"):
        jaxla.dot_product_attention(q, q, q, implementation="cpu")
