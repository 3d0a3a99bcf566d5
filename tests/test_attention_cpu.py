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


# ---- Code paths (AVX-512, AVX2, portable): every path this CPU runs, against the float64 reference.

ALL_PATHS = ("avx512", "avx2", "portable")


def _path_or_skip(path):
    if REASON is not None:
        pytest.skip(f"CPU kernel unavailable: {REASON}")
    if path not in _cpu.supported_paths():
        pytest.skip(f"this CPU cannot run the {path} path (it runs {_cpu.supported_paths()})")


def _run_path(path, q, k, v, d_out, tiles, **kw):
    """(out, lse, (dq, dk, dv)) of the kernel on `path` through the backend protocol; one compile."""
    from jaxla.attention import _base
    from jaxla.attention._args import canonical_args

    def f(q, k, v, d_out):
        def fwd(q, k, v):
            args = canonical_args(q, k, v, **kw)
            return _base.run(functools.partial(_cpu.attend, path=path, block_sizes=tiles), args)

        (out, lse), vjp = jax.vjp(fwd, q, k, v)
        return out, lse, vjp((d_out, jnp.zeros_like(lse)))

    return jax.jit(f)(q, k, v, d_out)


# Shapes chosen to reach every tile edge of every path: head dims 8/24/40 (partial 32-wide panels
# on AVX-512), GQA, lengths that leave partial row and key tiles, and each visibility feature.
PATH_CASES = [
    dict(shape=(2, 37, 4, 2, 16, 24), kw=dict(is_causal=True)),
    dict(shape=(1, 50, 2, 1, 40, 8), kw=dict(local_window_size=(9, 3))),
    dict(shape=(2, 29, 2, 2, 8, 40), kw=dict(lengths=True, segments=True)),
    # Tiles of many register blocks (40 positions × 3 heads = 10 blocks of 12 rows, some straddling
    # positions; 96 keys = several panels) on the band's edges, where each register block works
    # on its own key range: causal + window, lengths that end inside a tile, T a multiple of no tile.
    dict(shape=(2, 101, 6, 2, 16, 24), kw=dict(is_causal=True, local_window_size=(33, 0),
                                              lengths=True),
         tiles=(jaxla.ChunkedBlockSizes(block_q=40, block_k=96),)),
    # Head dims that are multiples of 16 (32 for K, 48 for V): AVX-512 packs whole 32-key panels of
    # both as 16 x 16 transposed blocks (the forward's prepacked K, the backward's K and V panels),
    # and the 77 keys leave a partial panel to the key-by-key tail.
    dict(shape=(1, 77, 4, 2, 32, 48), kw=dict(is_causal=True),
         tiles=(jaxla.ChunkedBlockSizes(block_q=16, block_k=64), None)),
    # Eight (batch row, kv head) pairs: on up to two threads each backward work item is a whole
    # head writing its dQ in place (one key-block group); the cases above have fewer heads than
    # four per thread, so their heads' key blocks are split into groups summed at the end.
    dict(shape=(2, 45, 8, 4, 16, 16), kw=dict(is_causal=True, lengths=True),
         tiles=(jaxla.ChunkedBlockSizes(block_q=8, block_k=16),)),
]


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("case", range(len(PATH_CASES)))
def test_every_path_matches_the_float64_reference(path, case, rng):
    from tests.attention_cases import np_attention

    _path_or_skip(path)
    b, t, n, kh, h, hv = PATH_CASES[case]["shape"]
    opts = dict(PATH_CASES[case]["kw"])
    q, k, v = rng.normal(size=(b, t, n, h)), rng.normal(size=(b, t, kh, h)), rng.normal(size=(b, t, kh, hv))
    d_out = rng.normal(size=(b, t, n, hv))
    kw, ref = {}, {}
    if opts.pop("is_causal", False):
        kw["is_causal"] = ref["causal"] = True
    if "local_window_size" in opts:
        kw["local_window_size"] = ref["window"] = opts.pop("local_window_size")
    if opts.pop("lengths", False):
        lens = np.array([t, t // 2], np.int32)
        kw["query_seq_lengths"] = kw["key_value_seq_lengths"] = lens
        ref["q_len"] = ref["kv_len"] = lens
    if opts.pop("segments", False):
        seg = np.sort(rng.integers(0, 3, size=(b, t)), axis=1).astype(np.int32)
        kw["segment_ids"] = seg
        ref["q_seg"] = ref["kv_seg"] = seg
    f32 = [jnp.asarray(x, jnp.float32) for x in (q, k, v, d_out)]
    # Several block_k values: 16 is rounded up to a 32-key panel on AVX-512.
    tile_sizes = PATH_CASES[case].get("tiles", (SMALL, jaxla.ChunkedBlockSizes(block_q=7, block_k=48)))
    for tiles in tile_sizes:
        out, lse, grads = _run_path(path, *f32, tiles, **kw)
        want = np_attention(q, k, v, d_out=d_out, **ref)
        np.testing.assert_allclose(out, want.out, atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(lse, want.lse, atol=2e-5, rtol=1e-5)
        for got, exp in zip(grads, (want.dq, want.dk, want.dv), strict=True):
            np.testing.assert_allclose(got, exp, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("shape", [(1, 70, 2, 1, 16, 16), (2, 70, 8, 4, 16, 16)])
def test_backward_is_bitwise_reproducible(path, shape, rng):
    """Each key block adds its part of dQ in a fixed order whichever thread runs it: one head
    split into key-block groups (summed at the end) and whole heads alike give the same bits on
    every call."""
    _path_or_skip(path)
    b, t, n, kh, h, hv = shape
    x = [jnp.asarray(rng.normal(size=s), jnp.float32)
         for s in ((b, t, n, h), (b, t, kh, h), (b, t, kh, hv), (b, t, n, hv))]
    first = _run_path(path, *x, SMALL, is_causal=True)[2]
    for _ in range(3):
        again = _run_path(path, *x, SMALL, is_causal=True)[2]
        for got, want in zip(again, first, strict=True):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("path", ALL_PATHS)
def test_every_path_propagates_nan(path, rng):
    _path_or_skip(path)
    q, k, v = (rng.normal(size=(1, 20, 2, 8)).astype(np.float32) for _ in range(3))
    k[0, 5, 1, 3] = np.nan  # key 5 of kv head 1: every later query of head 1 sees it (causal)
    out, lse, _ = _run_path(path, *(jnp.asarray(x) for x in (q, k, v, q)), SMALL, is_causal=True)
    out, lse = np.asarray(out), np.asarray(lse)
    assert np.isnan(out[0, 5:, 1]).all() and np.isnan(lse[0, 5:, 1]).all()
    assert np.isfinite(out[0, :5, 1]).all() and np.isfinite(out[0, :, 0]).all()


def test_path_choice_and_the_environment_variable():
    if _cpu.supported_paths() == ():
        pytest.skip(f"CPU kernel unavailable: {REASON}")
    best = _cpu.supported_paths()[0]
    assert _cpu._choose_path(None) == (best, None)
    assert _cpu._choose_path("") == (best, None)
    assert _cpu._choose_path(" Portable ") == ("portable", None)
    path, why = _cpu._choose_path("sse9")
    assert path is None and "JAXLA_CPU_KERNEL='sse9' is not a CPU kernel path" in why
    if platform.machine() == "x86_64":
        assert set(_cpu._PATH_IDS) == set(ALL_PATHS)
        for name in ALL_PATHS:
            path, why = _cpu._choose_path(name)
            if name in _cpu.supported_paths():
                assert (path, why) == (name, None)
            else:
                assert path is None and "cannot run" in why
    with pytest.raises(ValueError, match="not a CPU kernel path this CPU runs"):
        q = jnp.zeros((1, 4, 1, 8))
        from jaxla.attention._args import canonical_args
        _cpu.attend(canonical_args(q, q, q), path="sse9")


def _check_variable_in_fresh_processes(var: str, getter: str, value: str):
    """A fresh process with ``var=value`` reports ``value`` from ``_cpu.<getter>()`` and keeps the
    kernel on; with ``var=nonsense`` it reports None, says why, and warns that the kernel is off."""
    import os
    import subprocess
    import sys

    code = ("from jaxla.attention import _cpu; import sys; "
            f"sys.stdout.write(repr((_cpu.{getter}(), _cpu.available())))")
    results = []
    for setting in (value, "nonsense"):
        env = dict(os.environ, **{var: setting})
        results.append(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                      text=True, check=True))
    assert results[0].stdout == repr((value, None))
    assert results[1].stdout.startswith(f"(None, \"{var}='nonsense' is not a CPU kernel path")
    assert "RuntimeWarning: the compiled CPU attention kernel is off" in results[1].stderr


@needs_kernel
def test_environment_variable_forces_the_path_in_a_fresh_process():
    _check_variable_in_fresh_processes("JAXLA_CPU_KERNEL", "kernel_path", "portable")


def test_detected_paths_agree_with_the_cpu_flags_the_benchmarks_record():
    from jaxla.benchmarks import harness

    info = harness.cpu_features()
    assert info["cpu_kernel_path"] == _cpu.kernel_path()
    assert info["cpu_bf16_kernel"] == (_cpu.bf16_kernel() if _cpu.kernel_path() == "avx512" else None)
    if platform.system() != "Linux" or platform.machine() != "x86_64" or REASON is not None:
        pytest.skip("needs the kernel on Linux x86-64 (/proc/cpuinfo flags)")
    flags = set(info["cpu_flags"].split())
    assert ("avx2" in _cpu.supported_paths()) == ({"avx2", "fma"} <= flags)
    assert ("avx512" in _cpu.supported_paths()) == ({"avx512f", "avx512bw", "avx512dq",
                                                     "avx512vl"} <= flags)
    assert _cpu.supported_paths()[-1] == "portable"
    if _cpu.amx_bf16():  # (the converse also needs the OS to grant the tile state)
        assert {"amx_tile", "amx_bf16", "avx512_bf16"} <= flags


needs_bf16_dot = pytest.mark.skipif(not _cpu.bf16_dot(), reason="this CPU lacks AVX512-BF16")
# The bf16 GEMM kernels: AMX tiles, AVX512-BF16 dot products. Each bf16 test runs both where the CPU
# has them, as the default kernel (what jaxla.dot_product_attention calls use) or through attend.
BF16_KERNELS = ("amx", "avx512bf16")


@pytest.fixture(params=BF16_KERNELS)
def bf16_kernel(request, monkeypatch):
    """Each bf16 kernel this CPU runs, made the default for the test (skipped where it lacks it)."""
    if request.param not in _cpu.bf16_kernels():
        pytest.skip(f"this CPU cannot run the {request.param} bf16 kernel "
                    f"(it runs {list(_cpu.bf16_kernels())})")
    monkeypatch.setattr(_cpu, "_BF16_KERNEL", request.param)
    return request.param


@needs_bf16_dot
@pytest.mark.parametrize("kw, ref, seg", [
    (dict(is_causal=True), dict(causal=True), False),
    (dict(local_window_size=(20, 7)), dict(window=(20, 7)), True),
])
def test_bf16_dot_path_matches_the_reference(kw, ref, seg, rng, bf16_kernel):
    from jaxla.attention._args import canonical_args
    from tests.attention_cases import np_attention

    b, t, n, kh, h, hv = 2, 45, 4, 2, 32, 64
    q, k, v = (jnp.asarray(rng.normal(size=sh), jnp.bfloat16)
               for sh in ((b, t, n, h), (b, t, kh, h), (b, t, kh, hv)))
    lens = np.array([t, 33], np.int32)  # 33: an odd last key tile
    kw = dict(kw, key_value_seq_lengths=lens)
    ref = dict(ref, kv_len=lens)
    if seg:
        ids = np.sort(rng.integers(0, 3, size=(b, t)), axis=1).astype(np.int32)
        kw["segment_ids"], ref["q_seg"], ref["kv_seg"] = ids, ids, ids
    assert _cpu._bf16_forward(canonical_args(q, k, v, **kw), "avx512")
    assert not _cpu._bf16_forward(canonical_args(q, k, v, **kw), "avx2")
    # A value past every visible key must not reach the output, even paired with a visible one.
    want = np_attention(*(np.asarray(x.astype(jnp.float32), np.float64) for x in (q, k, v)), **ref)
    v = v.at[1, 33].set(jnp.inf)  # (the NumPy reference would give 0 · inf = NaN itself)
    for tiles in (SMALL, jaxla.ChunkedBlockSizes(block_q=5, block_k=48), None):
        out, lse = jax.jit(lambda q, k, v, tiles=tiles: jaxla.dot_product_attention(
            q, k, v, implementation="cpu", block_sizes=tiles, return_residual=True, **kw))(q, k, v)
        assert out.dtype == jnp.bfloat16
        out = np.asarray(out.astype(jnp.float32))
        assert np.isfinite(out).all()
        # The bf16 output's rounding (2^-9) plus P's (2^-9 of each weight).
        np.testing.assert_allclose(out, want.out, atol=1.5e-2, rtol=1e-2)
        np.testing.assert_allclose(lse, want.lse, atol=1e-5, rtol=1e-5)
    g = jax.jit(jax.grad(lambda q: jnp.sum(jaxla.dot_product_attention(
        q, k, v.at[1, 33].set(0), implementation="cpu", **kw).astype(jnp.float32))))(q)
    assert g.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(g.astype(jnp.float32))))


@needs_bf16_dot
def test_bf16_dot_path_propagates_nan(rng, bf16_kernel):
    q, k, v = (jnp.asarray(rng.normal(size=(1, 40, 2, 32)), jnp.bfloat16) for _ in range(3))
    q = q.at[0, 7, 1, 0].set(jnp.nan)
    v = v.at[0, 30, 0, 5].set(jnp.nan)
    out = np.asarray(jaxla.dot_product_attention(q, k, v, is_causal=True, implementation="cpu",
                                                 block_sizes=SMALL).astype(jnp.float32))
    assert np.isnan(out[0, 7, 1]).all() and np.isfinite(np.delete(out[0, :, 1], 7, axis=0)).all()
    assert np.isnan(out[0, 30:, 0, 5]).all() and np.isfinite(out[0, :30, 0]).all()


@pytest.mark.parametrize("path", ALL_PATHS)
def test_every_path_decodes_against_the_reference(path, rng):
    """T = 1..3 query positions against a longer cache: the unpacked decoding loop (<= 4 rows per
    work item) and the packed one (more rows), odd head dims, per-batch cache lengths."""
    from jaxla.attention import _base
    from jaxla.attention._args import canonical_args
    from tests.attention_cases import np_attention

    _path_or_skip(path)
    for t, n, kh, h, hv in ((1, 4, 4, 40, 24), (3, 4, 1, 16, 8), (2, 6, 3, 8, 40)):
        b, s = 2, 150
        q, k = rng.normal(size=(b, t, n, h)), rng.normal(size=(b, s, kh, h))
        v = rng.normal(size=(b, s, kh, hv))
        lens = np.array([s, 77], np.int32)
        v[1, 100:] = np.inf  # past the second row's cache length: must not reach its output
        args = canonical_args(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)),
                              key_value_seq_lengths=lens)
        for tiles in (jaxla.ChunkedBlockSizes(block_q=8, block_k=48), None):
            out, lse = _base.run(functools.partial(_cpu.attend, path=path, block_sizes=tiles), args)
            v_ref = np.where(np.isinf(v), 0.0, v)
            want = np_attention(q, k, v_ref, kv_len=lens)
            np.testing.assert_allclose(out, want.out, atol=2e-5, rtol=1e-4)
            np.testing.assert_allclose(lse, want.lse, atol=2e-5, rtol=1e-5)


@needs_bf16_dot
def test_bf16_backward_matches_the_reference(rng, bf16_kernel):
    """bf16 inputs run the backward GEMMs in bf16 too (P and dS rounded to bf16): gradients within
    bf16 tolerance of the float64 ones. Heads (N, K) = (3, 1): q rows read in place and tiles of an
    odd number of rows (pairs of rows with a missing partner); (2, 2): in place at a stride; (4, 2):
    copied. Odd key counts from the lengths; 40-position tiles span several register blocks on the
    band's edge. Causal + window with lengths, causal with segments, a window."""
    from jaxla.attention import _base
    from jaxla.attention._args import canonical_args
    from tests.attention_cases import np_attention

    b, t, h, hv = 2, 53, 32, 64
    lens = np.array([t, 38], np.int32)
    seg = np.sort(rng.integers(0, 3, size=(b, t)), axis=1).astype(np.int32)
    cases = [((3, 1), dict(is_causal=True, local_window_size=(20, 0), key_value_seq_lengths=lens),
              dict(causal=True, window=(20, 0), kv_len=lens), jaxla.ChunkedBlockSizes(5, 48)),
             ((2, 2), dict(is_causal=True, segment_ids=seg), dict(causal=True, q_seg=seg, kv_seg=seg),
              jaxla.ChunkedBlockSizes(40, 96)),
             ((4, 2), dict(local_window_size=(9, 30)), dict(window=(9, 30)),
              jaxla.ChunkedBlockSizes(7, 32))]
    for (n, kh), kw, ref, tiles in cases:
        q, k, v, d_out = (jnp.asarray(rng.normal(size=sh), jnp.bfloat16)
                          for sh in ((b, t, n, h), (b, t, kh, h), (b, t, kh, hv), (b, t, n, hv)))

        def grads(q, k, v, d_out, kw=kw, tiles=tiles):
            def fwd(q, k, v):
                args = canonical_args(q, k, v, **kw)
                return _base.run(functools.partial(_cpu.attend, path="avx512", block_sizes=tiles),
                                 args)[0]
            return jax.vjp(fwd, q, k, v)[1](d_out)

        f = jax.jit(grads)
        call = [line for line in f.lower(q, k, v, d_out).as_text().splitlines()
                if "@jaxla_attention_bwd" in line]
        assert len(call) == 1 and "x32xbf16>" in call[0], call  # the kernel got bf16 operands
        assert f"amx = {str(bf16_kernel == 'amx').lower()}" in call[0], call
        f64 = [np.asarray(x.astype(jnp.float32), np.float64) for x in (q, k, v, d_out)]
        want = np_attention(*f64[:3], d_out=f64[3], **ref)
        for got, exp in zip(f(q, k, v, d_out), (want.dq, want.dk, want.dv), strict=True):
            assert got.dtype == jnp.bfloat16
            got = np.asarray(got.astype(jnp.float32))
            scale = np.abs(exp).max()
            np.testing.assert_allclose(got, exp, rtol=2e-2, atol=5e-3 * scale)
            assert np.sqrt(np.mean((got - exp) ** 2)) < 4e-3 * np.sqrt(np.mean(exp ** 2))


@needs_bf16_dot
def test_bf16_kernels_on_default_tiles_with_empty_rows(rng, bf16_kernel):
    """The default tiles (several 32-row blocks a tile; AMX C blocks are 32 x 32), T and S a multiple
    of neither, GQA (g = 2, H 64 = two AMX contraction chunks, Hv 32 = one), a fully masked batch
    row (kv length 0) and padding query rows: values, logsumexp and gradients against float64, and
    zeros, not NaN, where a row sees no key."""
    from jaxla.attention._args import canonical_args
    from tests.attention_cases import np_attention

    b, t, n, kh, h, hv = 3, 151, 4, 2, 64, 32
    q, k, v, d_out = (jnp.asarray(rng.normal(size=sh), jnp.bfloat16)
                      for sh in ((b, t, n, h), (b, t, kh, h), (b, t, kh, hv), (b, t, n, hv)))
    q_len, kv_len = np.array([t, 100, t], np.int32), np.array([t, 77, 0], np.int32)
    kw = dict(is_causal=True, local_window_size=(120, 0), query_seq_lengths=q_len,
              key_value_seq_lengths=kv_len)
    ref = dict(causal=True, window=(120, 0), q_len=q_len, kv_len=kv_len)
    assert _cpu._bf16_forward(canonical_args(q, k, v, **kw), "avx512")
    out, lse, grads = _run_path("avx512", q, k, v, d_out, None, **kw)
    f64 = [np.asarray(x.astype(jnp.float32), np.float64) for x in (q, k, v, d_out)]
    want = np_attention(*f64[:3], d_out=f64[3], **ref)
    out = np.asarray(out.astype(jnp.float32))
    assert np.isfinite(out).all()
    assert not out[2].any() and not out[1, 100:].any()  # rows that see no key: exactly 0
    np.testing.assert_allclose(out, want.out, atol=1.5e-2, rtol=1e-2)
    seen = np.isfinite(want.lse)
    np.testing.assert_allclose(np.asarray(lse)[seen], want.lse[seen], atol=1e-5, rtol=1e-5)
    assert np.isposinf(np.asarray(lse)[~seen]).all()
    for got, exp in zip(grads, (want.dq, want.dk, want.dv), strict=True):
        got = np.asarray(got.astype(jnp.float32))
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, exp, rtol=2e-2, atol=5e-3 * np.abs(exp).max())
    assert not np.asarray(grads[0][2]).any() and not np.asarray(grads[1][1, 77:]).any()


def test_bf16_kernel_choice_and_the_environment_variable():
    supported = _cpu.bf16_kernels()
    assert set(supported) <= set(BF16_KERNELS) and _cpu.amx_bf16() == ("amx" in supported)
    assert bool(supported) == (_cpu._cpu_ext is not None and _cpu.bf16_dot())
    assert _cpu.bf16_kernel() in (supported[0] if supported else None, *supported)
    choose = functools.partial(_cpu._cpu_dispatch.choose_path, ids=BF16_KERNELS, var="JAXLA_CPU_BF16")
    assert choose(None, supported=("amx", "avx512bf16")) == ("amx", None)
    assert choose(" AVX512BF16 ", supported=("amx", "avx512bf16")) == ("avx512bf16", None)
    kernel, why = choose("amx", supported=("avx512bf16",))
    assert kernel is None and "JAXLA_CPU_BF16='amx' asks for a path this CPU cannot run" in why
    kernel, why = choose("tiles", supported=())
    assert kernel is None and "JAXLA_CPU_BF16='tiles' is not a CPU kernel path" in why
    if REASON is None:
        q = jnp.zeros((1, 4, 1, 32), jnp.bfloat16)
        from jaxla.attention._args import canonical_args
        with pytest.raises(ValueError, match="not a bf16 kernel this CPU runs"):
            _cpu.attend(canonical_args(q, q, q), path="avx512", bf16_kernel="tiles")


@needs_bf16_dot
def test_bf16_environment_variable_forces_the_kernel_in_a_fresh_process():
    _check_variable_in_fresh_processes("JAXLA_CPU_BF16", "bf16_kernel", "avx512bf16")


@needs_kernel
def test_attention_paths_compares_another_build(tmp_path):
    """The interleaved benchmark loads a second copy of the extension (e.g. the previous build) as
    a variant beside this one; its FFI targets are registered under their own names."""
    from jaxla.benchmarks import _attention_paths as ap

    copy = tmp_path / "prev" / "_cpu_ext.so"
    copy.parent.mkdir()
    shutil.copy(_cpu._cpu_ext.__file__, copy)
    other = ap.parse_variant(f"{copy}:portable@8x32")
    assert (other.build, other.path, other.tiles, other.label) == (str(copy), "portable", (8, 32),
                                                                    "prev:portable@8x32")
    assert ap._backend(other.build) is not _cpu and ap._backend(other.build)._FWD != _cpu._FWD
    lines = ap.compare("fwd", 16, 1, [other, ap.parse_variant("portable")])
    assert len(lines) == 5 and all("CPU" in line for line in lines[1:]), lines
    # Each variant's causal line (the second of its two) compares its rate with the non-causal one.
    assert [("x non-causal per FLOP" in line) for line in lines[1:]] == [False, True] * 2, lines
    assert "bf16 ceiling" not in lines[0], lines
    if "avx512" in _cpu.supported_paths() and _cpu.bf16_dot():
        # A bf16 variant is held to the bf16 matmul ceiling, measured in the same rounds.
        lines = ap.compare("fwd", 32, 1, [ap.parse_variant("avx512:bf16"), ap.parse_variant("portable")])
        assert "bf16 ceiling" in lines[0], lines
        assert ["of bf16 ceiling" in line for line in lines[1:]] == [True, True, False, False], lines
    with pytest.raises(ValueError, match="is not a file"):
        ap.parse_variant(f"{tmp_path}/missing.so:portable")


def test_attention_paths_per_round_causal_ratios():
    """The per-round ratio pairs each round's causal time with the same round's non-causal one."""
    from jaxla.benchmarks import _attention_paths as ap

    r = ap.causal_ratios([2.0, 4.0, 3.0], [1.0, 1.0, 2.0], 0.5)
    np.testing.assert_allclose(r, [1.0, 2.0, 0.75])
    with pytest.raises(ValueError, match=r"equal-length 1-D time lists, got \(2,\) and \(3,\)"):
        ap.causal_ratios([1.0, 2.0], [1.0, 2.0, 3.0], 0.5)
    if REASON is None:
        lines = ap.compare("fwd", 16, 3, [ap.parse_variant("portable")])
        assert "(rounds: median " in lines[2] and "(rounds:" not in lines[1], lines
