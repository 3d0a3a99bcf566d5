"""Tests specific to the Pallas flash-attention kernels (interpret mode on CPU).

Interpret mode runs the same kernel bodies that Triton/Mosaic compile. Values, logsumexp, gradients,
empty rows, odd lengths, NaN/inf and bfloat16 against the float64 reference are checked for every
backend, this one included, in test_attention_conformance.py. Here: the TPU layout, block skipping,
block sizes, the reasons the kernels decline, Triton lowering from a CPU host, and the ``gpu``-marked
compiled tests (``jaxla/benchmarks/attention_gpu.py`` times them on a GPU machine).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxla
from jaxla.attention import EMPTY_ROW_LSE, _base, pallas_attention
from jaxla.attention import _pallas_common as c
from jaxla.attention._args import canonical_args
from jaxla.attention._pallas import BlockSizes, attend, unsupported_reason
from tests.attention_cases import np_attention, visibility

# Small tiles so that even short sequences span several blocks (skipping and padding get exercised).
SMALL = BlockSizes(16, 16, 16, 32, 32, 16)


def _visible(T, S, *, causal, window):
    """(T, S) visibility of the causal/window band alone, as the contract states it."""
    return visibility(1, T, S, causal=causal, window=window)[0]


def test_mosaic_layout_in_interpret_mode_matches_reference(rng):
    """The TPU kernels see (B, N, T, H) arrays; interpret mode runs them in that layout too."""
    b, t, s, n, kh, h = 2, 100, 100, 2, 1, 64
    q, k, v, d_out = (rng.standard_normal(sh) for sh in ((b, t, n, h), (b, s, kh, h), (b, s, kh, h),
                                                          (b, t, n, h)))
    d_lse = rng.standard_normal((b, t, n))
    seg = np.sort(rng.integers(0, 3, (b, t)), axis=1).astype(np.int32)
    q_len, kv_len = np.array([77, 100], np.int32), np.array([100, 64], np.int32)
    kw = dict(is_causal=True, segment_ids=seg, query_seq_lengths=q_len,
              key_value_seq_lengths=kv_len, logits_soft_cap=3.0)
    ref = np_attention(q, k, v, causal=True, q_seg=seg, kv_seg=seg, q_len=q_len, kv_len=kv_len,
                       softcap=3.0, d_out=d_out, d_lse=d_lse)

    def f(q, k, v):
        args = canonical_args(q, k, v, **kw)
        return _base.run(attend, args, pallas_block_sizes=SMALL, interpret=True, layout="bnth")

    f32 = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
    (out, lse), vjp = jax.vjp(jax.jit(f), *f32)
    grads = vjp((jnp.asarray(d_out, jnp.float32), jnp.asarray(d_lse, jnp.float32)))
    tol = {"rtol": 2e-4, "atol": 2e-5}
    np.testing.assert_allclose(np.asarray(out, np.float64), ref.out, **tol)
    np.testing.assert_allclose(np.asarray(lse, np.float64), ref.lse, **tol)
    assert np.any(np.asarray(lse) == EMPTY_ROW_LSE)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref[2:5], strict=True):
        scale = max(1.0, float(np.abs(r).max()))
        np.testing.assert_allclose(np.asarray(g, np.float64) / scale, r / scale, **tol,
                                   err_msg=name)


@pytest.mark.parametrize("causal,window,tpu_tiles", [(False, (20, 5), False), (True, (40, 0), False),
                                                     (True, None, True)])
def test_mosaic_kernels_window_and_value_head_dim_in_interpret_mode(rng, causal, window,
                                                                    tpu_tiles):
    """The TPU-structured kernels (arbitrary key/query grid axis, VMEM scratch) with a window that
    skips blocks on both sides, Hv != H, T != S and GQA, against the float64 reference; with
    ``tpu_tiles`` at Mosaic's own 128 tiles (stats tiled across 128-lane multiples, Hv = 256)."""
    b, t, s, n, kh, h, hv = 1, 70, 150, 4, 2, 64, 128
    sizes = SMALL
    if tpu_tiles:
        t, s, hv, sizes = 300, 260, 256, BlockSizes(128, 128, 128, 128, 128, 128)
    q, k, v = (rng.standard_normal(sh) for sh in ((b, t, n, h), (b, s, kh, h), (b, s, kh, hv)))
    d_out, d_lse = rng.standard_normal((b, t, n, hv)), rng.standard_normal((b, t, n))
    ref = np_attention(q, k, v, causal=causal, window=window, d_out=d_out, d_lse=d_lse)

    def f(q, k, v):
        args = canonical_args(q, k, v, is_causal=causal, local_window_size=window)
        return _base.run(attend, args, pallas_block_sizes=sizes, interpret=True, layout="bnth")

    (out, lse), vjp = jax.vjp(jax.jit(f), *(jnp.asarray(x, jnp.float32) for x in (q, k, v)))
    grads = vjp((jnp.asarray(d_out, jnp.float32), jnp.asarray(d_lse, jnp.float32)))
    tol = {"rtol": 2e-4, "atol": 2e-5}
    for name, g, r in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), ref[:5],
                          strict=True):
        scale = max(1.0, float(np.abs(r).max()))
        np.testing.assert_allclose(np.asarray(g, np.float64) / scale, r / scale, **tol,
                                   err_msg=name)


@pytest.mark.parametrize("seed", range(12))
def test_block_ranges_cover_every_visible_key(seed):
    """Skipped blocks hold no visible (query, key) pair; visited ranges stay inside the arrays."""
    r = np.random.default_rng(seed)
    T, S = int(r.integers(1, 200)), int(r.integers(1, 200))
    bq, bk = 16, 32
    causal = bool(r.integers(2))
    left = None if r.integers(2) else int(r.integers(0, 50))
    right = None if r.integers(2) else int(r.integers(0, 50))
    if causal:
        right = 0 if right is None else min(right, 0)
    plan = c.Plan(scale=1.0, causal=causal, window_left=left, window_right=right, softcap=None,
                  t_len=T, s_len=S, t_pad=c.round_up(T, bq), s_pad=c.round_up(S, bk), groups=1,
                  has_segments=False, layout="btnh", backend="interpret", block_q=bq, block_k=bk,
                  block_q_dq=bq, block_k_dq=bk, block_q_dkv=bq, block_k_dkv=bk, num_warps=4,
                  num_stages=2, num_warps_bwd=4, num_stages_bwd=2, highest_precision=True)
    vis = _visible(T, S, causal=causal, window=(left, right))
    # Padded rows/cols: the kernels treat padded keys as hidden and padded queries as free.
    vis = np.pad(vis, ((0, plan.t_pad - T), (0, plan.s_pad - S)))
    vis[T:, :S] = True
    n_unmasked = 0
    for qb in range(plan.t_pad // bq):
        q0 = jnp.int32(qb * bq)
        lo, hi = c.kv_block_range(plan, q0, bq, bk)
        ulo, uhi = (int(x) for x in c.kv_unmasked_range(plan, q0, bq, bk, lo, hi))
        lo, hi = int(lo), int(hi)
        assert 0 <= lo <= ulo <= uhi <= hi and (lo == hi or hi <= plan.s_pad // bk)
        for kb in range(plan.s_pad // bk):
            tile = vis[qb * bq:(qb + 1) * bq, kb * bk:(kb + 1) * bk]
            if not lo <= kb < hi:
                assert not tile[: max(0, T - qb * bq)].any()
            if ulo <= kb < uhi:
                assert tile.all()
                n_unmasked += 1
    for kb in range(plan.s_pad // bk):
        k0 = jnp.int32(kb * bk)
        lo, hi = c.q_block_range(plan, k0, bq, bk)
        ulo, uhi = (int(x) for x in c.q_unmasked_range(plan, k0, bq, bk, lo, hi))
        lo, hi = int(lo), int(hi)
        assert 0 <= lo <= ulo <= uhi <= hi and (lo == hi or hi <= plan.t_pad // bq)
        for qb in range(plan.t_pad // bq):
            tile = vis[qb * bq:(qb + 1) * bq, kb * bk:(kb + 1) * bk]
            if not lo <= qb < hi:
                assert not tile[: max(0, T - qb * bq)].any()
            if ulo <= qb < uhi:
                assert tile.all()
    if left is None and right is None and T >= bq and S >= 2 * bk:
        assert n_unmasked > 0  # the unmasked fast path is actually taken
    if causal and T > 2 * bq and S > 2 * bk:  # causal skipping actually skips something
        assert int(c.kv_block_range(plan, jnp.int32(0), bq, bk)[1]) < plan.s_pad // bk


@pytest.mark.slow
def test_check_grads_float64(x64, rng):
    from jax.test_util import check_grads

    q = jnp.asarray(rng.standard_normal((1, 7, 2, 64)))
    k = jnp.asarray(rng.standard_normal((1, 20, 1, 64)))
    v = jnp.asarray(rng.standard_normal((1, 20, 1, 64)))

    @jax.jit
    def f(q, k, v):
        return pallas_attention(q, k, v, scale=0.25, is_causal=True, local_window_size=(5, 20),
                                logits_soft_cap=2.0, block_sizes=SMALL, interpret=True)

    check_grads(f, (q, k, v), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_default_block_sizes_and_fit():
    for platform in ("gpu", "tpu", "cpu"):
        for h in (64, 128, 256):
            for dtype in (None, jnp.bfloat16, jnp.float32):
                sizes = BlockSizes.default(platform=platform, head_dim=h, dtype=dtype)
                assert all(x & (x - 1) == 0 for x in (sizes.block_q, sizes.block_k))
    # float32 tiles on GPU hold half the keys of 16-bit ones (the same shared-memory bytes).
    assert BlockSizes.default(platform="gpu", head_dim=128, dtype=jnp.float32).block_k == 64
    assert BlockSizes.default(platform="gpu", head_dim=128, dtype=jnp.bfloat16).block_k == 128
    with pytest.raises(ValueError, match="power of two"):
        BlockSizes(block_q=48)


def test_argument_errors():
    """Shared checks come from the canonical arguments; these are the Pallas-specific ones."""
    q = jnp.zeros((1, 8, 4, 64), jnp.float32)
    kv = jnp.zeros((1, 9, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match="multiple of the kv heads"):
        pallas_attention(jnp.zeros((1, 8, 3, 64)), kv, kv, interpret=True)
    with pytest.raises(ValueError, match="local_window_size"):
        pallas_attention(q, kv, kv, local_window_size=(-1, 2), interpret=True)
    with pytest.raises(ValueError, match=r"pallas_attention cannot run.*head dim 8 not in"):
        pallas_attention(q[..., :8], kv[..., :8], kv[..., :8], interpret=True)
    with pytest.raises(TypeError, match="block_sizes must be a PallasBlockSizes"):
        pallas_attention(q, kv, kv, block_sizes=jaxla.ChunkedBlockSizes(), interpret=True)
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="platform cpu has no compiled Pallas kernel"):
            pallas_attention(q, kv, kv, interpret=False)


def test_unsupported_reason():
    def args(q_shape, kv_shape, dtype=jnp.bfloat16, hv=None, **kw):
        kv = jnp.zeros(kv_shape, dtype)
        v = kv if hv is None else jnp.zeros((*kv_shape[:-1], hv), dtype)
        return canonical_args(jnp.zeros(q_shape, dtype), kv, v, **kw)

    a = args((2, 16, 8, 128), (2, 32, 2, 128))
    assert unsupported_reason(a, platform="gpu") is None
    assert unsupported_reason(a, platform="tpu") is None
    assert unsupported_reason(a, platform="cpu", interpret=True) is None
    assert "interpret" in unsupported_reason(a, platform="cpu")
    with_bias = args((2, 16, 8, 128), (2, 32, 2, 128), bias=jnp.zeros((1, 1, 16, 32)))
    assert "bias" in unsupported_reason(with_bias, platform="gpu")
    with_mask = args((2, 16, 8, 128), (2, 32, 2, 128), mask=jnp.ones((1, 1, 16, 32), bool))
    assert "mask" in unsupported_reason(with_mask, platform="gpu")
    assert "head dim 96" in unsupported_reason(args((2, 16, 8, 96), (2, 16, 8, 96)), platform="gpu")
    assert "value head dim 32" in unsupported_reason(args((2, 16, 8, 64), (2, 16, 8, 64), hv=32),
                                                     platform="gpu")
    with jax.enable_x64(True):
        f64 = args((2, 16, 8, 64), (2, 16, 8, 64), dtype=jnp.float64)
        assert "float64" in unsupported_reason(f64, platform="gpu")
        assert unsupported_reason(f64, platform="cpu", interpret=True) is None


# (name, dtype, B, T, S, N, K, H, Hv, pallas_attention features): compiled on the GPU/TPU machine.
# T and S are not block multiples; lengths and segments are built in _compiled_features.
COMPILED = [
    ("causal gqa lengths", "bfloat16", 2, 300, 260, 8, 2, 128, 128, {"is_causal": True,
                                                                     "lengths": True}),
    ("full gqa lengths", "bfloat16", 2, 300, 260, 8, 2, 128, 128, {"lengths": True}),
    ("window", "bfloat16", 1, 333, 333, 4, 4, 128, 128, {"local_window_size": (64, 32)}),
    ("softcap causal", "bfloat16", 1, 290, 290, 4, 2, 128, 128, {"is_causal": True,
                                                                  "logits_soft_cap": 5.0}),
    ("segments mqa", "bfloat16", 2, 200, 200, 4, 1, 128, 128, {"segments": True}),
    ("head dim 64", "bfloat16", 1, 250, 250, 4, 2, 64, 64, {"is_causal": True}),
    ("head dim 256 hv 128", "bfloat16", 1, 200, 180, 2, 1, 256, 128, {"is_causal": True}),
    ("f16 window causal", "float16", 1, 300, 300, 4, 2, 64, 64, {"is_causal": True,
                                                                 "local_window_size": (50, 0)}),
]


def _compiled_features(features, b, t, s):
    kw = {k: v for k, v in features.items() if k not in ("lengths", "segments")}
    ref_kw = {"causal": kw.get("is_causal", False), "window": kw.get("local_window_size"),
              "softcap": kw.get("logits_soft_cap")}
    if features.get("lengths"):
        q_len = np.array([t, max(1, t // 2)][:b], np.int32)
        kv_len = np.array([s, max(1, s // 3)][:b], np.int32)
        kw.update(query_seq_lengths=q_len, key_value_seq_lengths=kv_len)
        ref_kw.update(q_len=q_len, kv_len=kv_len)
    if features.get("segments"):
        seg = np.sort(np.random.default_rng(0).integers(0, 3, (b, t)), axis=1).astype(np.int32)
        kw["segment_ids"] = seg
        ref_kw.update(q_seg=seg, kv_seg=seg)
    return kw, ref_kw


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() == "cpu", reason="needs a GPU or TPU")
@pytest.mark.parametrize("name,dtype,b,t,s,n,kh,h,hv,features", COMPILED,
                         ids=[c[0] for c in COMPILED])
def test_compiled_matches_reference(name, dtype, b, t, s, n, kh, h, hv, features, rng):
    if jax.default_backend() == "tpu" and dtype == "float16":
        pytest.skip("TPUs decline float16")
    dtype = jnp.dtype(dtype)
    q, k, v = (jnp.asarray(rng.standard_normal(sh), dtype)
               for sh in ((b, t, n, h), (b, s, kh, h), (b, s, kh, hv)))
    d_out, d_lse = rng.standard_normal((b, t, n, hv)), rng.standard_normal((b, t, n))
    kw, ref_kw = _compiled_features(features, b, t, s)
    ref = np_attention(*(np.asarray(x.astype(jnp.float32)) for x in (q, k, v)), d_out=d_out,
                       d_lse=d_lse, **ref_kw)

    def f(q, k, v):
        return pallas_attention(q, k, v, return_residual=True, interpret=False, **kw)

    (out, lse), vjp = jax.vjp(jax.jit(f), q, k, v)
    grads = vjp((jnp.asarray(d_out, out.dtype), jnp.asarray(d_lse, jnp.float32)))
    tol = {"rtol": 3e-2, "atol": 3e-2}
    np.testing.assert_allclose(np.asarray(out, np.float64), ref.out, **tol, err_msg=name)
    np.testing.assert_allclose(np.asarray(lse, np.float64), ref.lse, **tol, err_msg=name)
    for part, g, r in zip(("dq", "dk", "dv"), grads, ref[2:5], strict=True):
        scale = max(1.0, float(np.abs(r).max()))
        np.testing.assert_allclose(np.asarray(g, np.float64) / scale, r / scale, **tol,
                                   err_msg=f"{name} {part}")


def test_causal_blocks_longest_first_match_reference(rng):
    """The reversed launch order (Triton's default for causal) gives the same numbers."""
    b, t, n, h = 1, 80, 2, 64
    q, k, v = (rng.standard_normal((b, t, n, h)) for _ in range(3))
    d_out, d_lse = rng.standard_normal((b, t, n, h)), rng.standard_normal((b, t, n))
    ref = np_attention(q, k, v, causal=True, d_out=d_out, d_lse=d_lse)

    def f(q, k, v):
        args = canonical_args(q, k, v, is_causal=True)
        return _base.run(attend, args, pallas_block_sizes=SMALL, interpret=True,
                         reverse_q_blocks=True)

    (out, lse), vjp = jax.vjp(jax.jit(f), *(jnp.asarray(x, jnp.float32) for x in (q, k, v)))
    grads = vjp((jnp.asarray(d_out, jnp.float32), jnp.asarray(d_lse, jnp.float32)))
    tol = {"rtol": 2e-4, "atol": 2e-5}
    for name, g, r in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), ref[:5], strict=True):
        scale = max(1.0, float(np.abs(r).max()))
        np.testing.assert_allclose(np.asarray(g, np.float64) / scale, r / scale, **tol,
                                   err_msg=name)


def test_float32_on_gpu_prefers_xla_and_half_precision_prefers_pallas():
    from jaxla.attention import _api

    f32 = canonical_args(*(jnp.zeros((1, 512, 2, 128), jnp.float32),) * 3)
    bf16 = canonical_args(*(jnp.zeros((1, 512, 2, 128), jnp.bfloat16),) * 3)
    assert "pallas" not in _api._preferred(f32, "gpu")
    assert _api._preferred(bf16, "gpu")[0] == "pallas"
    assert _api._preferred(f32, "tpu")[0] == "pallas"  # TPUs have no TF32 shortcut to prefer


@pytest.mark.slow
def test_gpu_benchmark_quick_smoke():
    from jaxla.benchmarks import attention_gpu

    # jax.nn's own XLA backward relies on implicit bf16/f32 promotion, which conftest's strict
    # mode rejects; the benchmark runs as a script under the default promotion.
    with jax.numpy_dtype_promotion("standard"):
        rows = attention_gpu.run(quick=True)
    checks = [r for r in rows if r["name"].startswith("check")]
    timings = [r for r in rows if r["name"].startswith("T=")]
    assert checks and all(r["ok"] for r in checks)
    assert timings and all(r["pallas_tflops"] > 0 and r["xla_tflops"] > 0 for r in timings)


@pytest.mark.parametrize("head_dim,dtype,features", [
    (128, jnp.bfloat16, {"is_causal": True, "key_value_seq_lengths": jnp.array([100, 200])}),
    (64, jnp.float16, {"local_window_size": (64, 32), "logits_soft_cap": 3.0}),
    (256, jnp.float32, {"segment_ids": (jnp.zeros((2, 300), jnp.int32),
                                         jnp.zeros((2, 260), jnp.int32))}),
])
def test_triton_lowering_without_a_gpu(monkeypatch, head_dim, dtype, features):
    """Lowers forward and backward for CUDA from this CPU host: every kernel becomes Triton IR."""
    pytest.importorskip("jax._src.lib.triton")
    import jaxla.attention._pallas as pallas_module

    monkeypatch.setattr(pallas_module, "_platform", lambda: "gpu")
    q = jax.ShapeDtypeStruct((2, 300, 8, head_dim), dtype)
    kv = jax.ShapeDtypeStruct((2, 260, 2, head_dim), dtype)

    def loss(q, k, v):
        out, lse = pallas_attention(q, k, v, scale=0.1, return_residual=True, **features)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3  # forward, dQ, dK/dV


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU has no compiled kernel")
def test_public_api_explains_pallas_on_cpu():
    q = jnp.ones((1, 8, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match=r'implementation="pallas".*GPU and TPU only.*chunked'):
        jaxla.dot_product_attention(q, q, q, implementation="pallas")


# ---- benchmarks/gpu_check.sh: structure checked here, since a GPU run is rare and costly ------

_GPU_CHECK = "benchmarks/gpu_check.sh"


def _gpu_check(tmp_path, **env):
    import os
    import subprocess

    full_env = {**os.environ, "OUT": str(tmp_path), **env}
    return subprocess.run(["bash", _GPU_CHECK], capture_output=True, text=True, env=full_env,
                          timeout=300, check=False)


def test_gpu_check_script_parses_and_every_step_resolves(tmp_path):
    import pathlib
    import shlex
    import subprocess

    from jaxla import benchmarks

    assert subprocess.run(["bash", "-n", _GPU_CHECK], check=False).returncode == 0
    listed = _gpu_check(tmp_path, LIST_STEPS="1")
    assert listed.returncode == 0, listed.stderr
    steps = [line.split("|", 2) for line in listed.stdout.splitlines()]
    names = [name for name, _, _ in steps]
    assert names == ["header", "tests", "attention_gpu", "linear", "lora", "attention", "summary"]
    # Every limit together stays inside the 6-minute budget, with margin for the kill grace.
    assert sum(int(limit) for _, limit, _ in steps) <= 345
    known = {e.name for e in (*benchmarks.SUITES, *benchmarks.TOOLS)}
    for name, _, command in steps:
        words = shlex.split(command) if name not in ("header", "summary") else command.split()
        if "bench" in words:
            assert words[words.index("bench") + 1] in known, command
        if "pytest" in words:
            assert "gpu" == words[words.index("-m", words.index("pytest")) + 1]
            paths = [w for w in words if w.startswith("tests/")]
            assert paths and all(pathlib.Path(p).is_file() for p in paths), command
            assert "tests" not in words  # never the whole folder: one import error zeroes it
        if name == "attention":  # jax.nn and jaxla compared at the same (full f32) precision
            assert "JAX_DEFAULT_MATMUL_PRECISION=highest" in words


def test_gpu_check_dry_run_records_every_step_even_a_failing_one(tmp_path):
    """A dry run of the cheap steps on CPU; a step that fails still gets its line and log."""
    done = _gpu_check(tmp_path, DRY_RUN="1", ONLY="header tests summary", PYTHON="python3")
    assert done.returncode == 0, done.stderr
    steps = (tmp_path / "steps.txt").read_text()
    for name in ("header", "tests", "summary"):
        assert name in steps
    assert "rc=0" in steps.splitlines()[1]  # the GPU tests are collected (and skip on CPU)
    assert "=== steps" in done.stdout
    failing = _gpu_check(tmp_path, DRY_RUN="1", ONLY="tests summary", PYTHON="false")
    assert failing.returncode == 0
    lines = (tmp_path / "steps.txt").read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["tests", "summary"]
    assert all("rc=1" in line for line in lines)


def test_gpu_check_budget_skips_steps_it_has_no_time_for(tmp_path):
    done = _gpu_check(tmp_path, ONLY="header linear", BUDGET="8", PYTHON="false")
    lines = (tmp_path / "steps.txt").read_text().splitlines()
    assert done.returncode == 0 and len(lines) == 2
    assert all("skipped" in line for line in lines), lines
