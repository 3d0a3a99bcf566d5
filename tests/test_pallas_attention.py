"""Pallas flash attention in interpret mode on CPU against a float64 NumPy reference.

Interpret mode runs the same kernel bodies that Triton/Mosaic compile, so these tests cover the
kernels' numerics, masking, padding and block skipping; compiled lowering is covered by the
``gpu``-marked tests and ``benchmarks/attention_gpu.py`` on a GPU machine.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxla
from jaxla.attention import _pallas_common as c
from jaxla.attention._pallas import BlockSizes, _attention, pallas_attention, unsupported_reason

# Small tiles so that even short sequences span several blocks (skipping and padding get exercised).
SMALL = BlockSizes(16, 16, 16, 32, 32, 16)


# ---- float64 NumPy reference: forward, logsumexp and the analytic backward -------------------


def _visible(T, S, *, causal, window, q_seg, kv_seg, q_len, kv_len):
    """(B, T, S) boolean visibility, exactly as the contract states it."""
    i = np.arange(T)[:, None]
    j = np.arange(S)[None, :]
    vis = np.ones((T, S), bool)
    if causal:
        vis &= j <= i
    if window is not None:
        left, right = window
        if left is not None:
            vis &= j >= i - left
        if right is not None:
            vis &= j <= i + right
    vis = np.broadcast_to(vis, (len(q_len), T, S)).copy()
    vis &= (np.arange(T)[None, :, None] < q_len[:, None, None])
    vis &= (np.arange(S)[None, None, :] < kv_len[:, None, None])
    vis &= q_seg[:, :, None] == kv_seg[:, None, :]
    return vis


def reference(q, k, v, d_out, d_lse, *, scale, causal=False, window=None, q_seg=None, kv_seg=None,
              q_len=None, kv_len=None, softcap=None):
    """Returns out, lse and (dq, dk, dv) for the cotangents (d_out, d_lse), all float64."""
    q, k, v, d_out, d_lse = (np.asarray(x, np.float64) for x in (q, k, v, d_out, d_lse))
    B, T, N, _ = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    q_seg = np.zeros((B, T), int) if q_seg is None else np.asarray(q_seg)
    kv_seg = np.zeros((B, S), int) if kv_seg is None else np.asarray(kv_seg)
    q_len = np.full((B,), T) if q_len is None else np.asarray(q_len)
    kv_len = np.full((B,), S) if kv_len is None else np.asarray(kv_len)
    vis = _visible(T, S, causal=causal, window=window, q_seg=q_seg, kv_seg=kv_seg, q_len=q_len,
                   kv_len=kv_len)[:, None]  # (B, 1, T, S)
    kk, vv = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
    raw = np.einsum("btnh,bsnh->bnts", q, kk) * scale
    tanh = None
    logits = raw
    if softcap is not None:
        tanh = np.tanh(raw / softcap)
        logits = softcap * tanh
    logits = np.where(vis, logits, -np.inf)
    m = logits.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.where(vis, np.exp(logits - m), 0.0)
    z = e.sum(-1, keepdims=True)
    p = e / np.where(z == 0, 1.0, z)
    out = np.einsum("bnts,bsnh->btnh", p, vv)
    lse = np.where(z[..., 0] == 0, -np.inf, np.log(np.where(z == 0, 1.0, z))[..., 0] + m[..., 0])
    do = np.transpose(d_out, (0, 2, 1, 3))  # BNTHv
    dv = np.einsum("bnts,bnth->bsnh", p, do)
    dp = np.einsum("bnth,bsnh->bnts", do, vv)
    delta = (do * np.transpose(out, (0, 2, 1, 3))).sum(-1, keepdims=True)
    ds = p * (dp - delta + np.transpose(d_lse, (0, 2, 1))[..., None])
    if tanh is not None:
        ds = ds * (1.0 - tanh**2)
    dq = np.einsum("bnts,bsnh->btnh", ds, kk) * scale
    dk = np.einsum("bnts,btnh->bsnh", ds, q) * scale

    def group_sum(x):
        return x.reshape(B, S, K, G, x.shape[-1]).sum(3)

    return out, np.transpose(lse, (0, 2, 1)), (dq, group_sum(dk), group_sum(dv))


# ---- cases ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    T: int
    S: int
    N: int = 2
    K: int = 1
    H: int = 64
    Hv: int | None = None
    B: int = 1
    causal: bool = False
    window: tuple | None = None
    segments: bool = False
    lengths: bool | str = False  # True: both, "q" or "kv": only that one
    softcap: float | None = None
    layout: str = "btnh"

    def __str__(self):
        return "-".join(f"{f.name}{getattr(self, f.name)}" for f in dataclasses.fields(self)
                        if getattr(self, f.name) != f.default or f.name in ("T", "S"))


# A sampled grid: every feature and every odd length in {1, 7, 100, 130} appears, not every product.
CASES = [
    Case(T=7, S=7, causal=True),
    Case(T=130, S=100, N=4, K=2, segments=True, window=(20, 5), B=2),
    Case(T=100, S=130, N=2, K=2, lengths=True, softcap=5.0, B=2),
    Case(T=1, S=130, N=4, K=1, H=128, lengths="kv"),
    Case(T=130, S=7, causal=True, window=(3, None), Hv=128, H=64),
    Case(T=100, S=100, causal=True, segments=True, lengths=True, softcap=3.0, B=2,
         layout="bnth"),
]
SLOW_CASES = [
    Case(T=130, S=130, N=8, K=2, causal=True, window=(40, 0), segments=True, B=2),
    Case(T=7, S=1, N=3, K=3, H=128, lengths="q"),
    Case(T=100, S=100, N=4, K=2, lengths=True, softcap=2.0, layout="bnth", B=2),
]


def _inputs(case: Case, rng, dtype):
    Hv = case.Hv or case.H
    q = rng.standard_normal((case.B, case.T, case.N, case.H))
    k = rng.standard_normal((case.B, case.S, case.K, case.H))
    v = rng.standard_normal((case.B, case.S, case.K, Hv))
    d_out = rng.standard_normal((case.B, case.T, case.N, Hv))
    d_lse = rng.standard_normal((case.B, case.T, case.N))
    kw = {}
    if case.segments:  # a few contiguous segments, different per batch row
        kw["q_seg"] = np.sort(rng.integers(0, 3, (case.B, case.T)), axis=1).astype(np.int32)
        kw["kv_seg"] = np.sort(rng.integers(0, 3, (case.B, case.S)), axis=1).astype(np.int32)
    if case.lengths in (True, "q"):
        kw["q_len"] = rng.integers(0, case.T + 1, (case.B,)).astype(np.int32)
    if case.lengths in (True, "kv"):
        kw["kv_len"] = rng.integers(1, case.S + 1, (case.B,)).astype(np.int32)
    arrays = [np.asarray(x, dtype) for x in (q, k, v)]
    return arrays, d_out.astype(np.float32), d_lse.astype(np.float32), kw


def _run(case, arrays, d_out, d_lse, kw, *, block_sizes=SMALL):
    """Pallas out, lse and grads (one forward, one backward) through ``jax.vjp``."""
    scale = case.H**-0.5

    def f(q, k, v):
        return _attention(
            q, k, v, scale=scale, is_causal=case.causal, local_window_size=case.window,
            q_segment_ids=kw.get("q_seg"), kv_segment_ids=kw.get("kv_seg"),
            query_seq_lengths=kw.get("q_len"), key_value_seq_lengths=kw.get("kv_len"),
            logits_soft_cap=case.softcap, return_residual=True, block_sizes=block_sizes,
            interpret=True, layout=case.layout,
        )

    (out, lse), vjp = jax.vjp(jax.jit(f), *arrays)
    grads = vjp((jnp.asarray(d_out, out.dtype), jnp.asarray(d_lse)))
    return out, lse, grads


def _check_case(case, rng, dtype, tol):
    arrays, d_out, d_lse, kw = _inputs(case, rng, dtype)
    ref_out, ref_lse, ref_grads = reference(
        *arrays, d_out, d_lse, scale=case.H**-0.5, causal=case.causal, window=case.window,
        softcap=case.softcap, **kw,
    )
    out, lse, grads = _run(case, arrays, d_out, d_lse, kw)
    assert out.dtype == dtype and lse.dtype == jnp.float32
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    np.testing.assert_allclose(np.asarray(out, np.float64), ref_out, **tol)
    finite = np.isfinite(ref_lse)
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
    np.testing.assert_allclose(np.asarray(lse)[finite], ref_lse[finite], **tol)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        assert g.dtype == dtype and g.shape == r.shape, name
        assert np.all(np.isfinite(np.asarray(g, np.float64))), name
        scale = max(1.0, float(np.abs(r).max()))
        np.testing.assert_allclose(np.asarray(g, np.float64) / scale, r / scale, **tol,
                                   err_msg=name)


F32_TOL = {"rtol": 2e-4, "atol": 2e-5}
BF16_TOL = {"rtol": 3e-2, "atol": 3e-2}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference_f32(case, rng):
    _check_case(case, rng, np.float32, F32_TOL)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES, ids=str)
def test_matches_reference_f32_more(case, rng):
    _check_case(case, rng, np.float32, F32_TOL)


def test_matches_reference_bf16(rng):
    case = Case(T=100, S=130, N=4, K=2, causal=True, lengths=True)
    _check_case(case, rng, jnp.bfloat16, BF16_TOL)


def test_fully_masked_rows_give_zeros_and_zero_grads(rng):
    # Row 0: q length 0 (every query masked). Row 1: query segment 7 matches no key segment.
    case = Case(T=7, S=100, B=2)
    arrays, d_out, d_lse, _ = _inputs(case, rng, np.float32)
    q_seg = np.zeros((2, 7), np.int32)
    q_seg[1, 3:] = 7
    kw = {"q_len": np.array([0, 7], np.int32), "kv_len": np.array([100, 100], np.int32),
          "q_seg": q_seg, "kv_seg": np.zeros((2, 100), np.int32)}
    out, lse, (dq, dk, dv) = _run(case, arrays, d_out, d_lse, kw)
    out, lse, dq, dk = (np.asarray(x) for x in (out, lse, dq, dk))
    assert np.all(out[0] == 0) and np.all(out[1, 3:] == 0)
    assert np.all(np.isneginf(lse[0])) and np.all(np.isneginf(lse[1, 3:]))
    assert np.all(np.isfinite(lse[1, :3]))
    assert np.all(dq[0] == 0) and np.all(dq[1, 3:] == 0)
    assert np.all(dk[0] == 0) and np.all(np.asarray(dv)[0] == 0)
    assert np.all(np.isfinite(dk)) and np.all(np.isfinite(dq))


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
    vis = _visible(T, S, causal=causal, window=(left, right), q_seg=np.zeros((1, T)),
                   kv_seg=np.zeros((1, S)), q_len=np.array([T]), kv_len=np.array([S]))[0]
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

    q = jnp.asarray(rng.standard_normal((1, 7, 2, 16)))
    k = jnp.asarray(rng.standard_normal((1, 20, 1, 16)))
    v = jnp.asarray(rng.standard_normal((1, 20, 1, 16)))

    @jax.jit
    def f(q, k, v):
        return pallas_attention(q, k, v, scale=0.25, is_causal=True, local_window_size=(5, None),
                                logits_soft_cap=2.0, block_sizes=SMALL, interpret=True)

    check_grads(f, (q, k, v), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_default_block_sizes_and_fit():
    for platform in ("gpu", "tpu", "cpu"):
        for h in (64, 128, 256):
            sizes = BlockSizes.default(platform=platform, head_dim=h)
            assert all(x & (x - 1) == 0 for x in (sizes.block_q, sizes.block_k))
    with pytest.raises(ValueError, match="power of two"):
        BlockSizes(block_q=48)


def test_argument_errors():
    q = jnp.zeros((1, 8, 4, 64), jnp.float32)
    kv = jnp.zeros((1, 9, 2, 64), jnp.float32)
    call = {"scale": 0.125, "interpret": True}
    with pytest.raises(ValueError, match="query must have rank 4"):
        pallas_attention(q[0], kv, kv, **call)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        pallas_attention(jnp.zeros((1, 8, 3, 64)), kv, kv, **call)
    with pytest.raises(TypeError, match="share a dtype"):
        pallas_attention(q, kv.astype(jnp.bfloat16), kv, **call)
    with pytest.raises(ValueError, match="value has size"):
        pallas_attention(q, kv, kv[:, :5], **call)
    with pytest.raises(ValueError, match="given together"):
        pallas_attention(q, kv, kv, q_segment_ids=jnp.zeros((1, 8), jnp.int32), **call)
    with pytest.raises(ValueError, match="kv_segment_ids has size"):
        pallas_attention(q, kv, kv, q_segment_ids=jnp.zeros((1, 8), jnp.int32),
                         kv_segment_ids=jnp.zeros((1, 8), jnp.int32), **call)
    with pytest.raises(TypeError, match="query_seq_lengths must have an integer"):
        pallas_attention(q, kv, kv, query_seq_lengths=jnp.zeros((1,)), **call)
    with pytest.raises(ValueError, match="local_window_size"):
        pallas_attention(q, kv, kv, local_window_size=(-1, 2), **call)
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="platform cpu needs interpret mode"):
            pallas_attention(q, kv, kv, scale=0.125, interpret=False)


def test_unsupported_reason():
    q = jax.ShapeDtypeStruct((2, 16, 8, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 32, 2, 128), jnp.bfloat16)
    kw = {"has_bias": False, "has_mask": False}
    assert unsupported_reason(q, kv, kv, platform="gpu", **kw) is None
    assert unsupported_reason(q, kv, kv, platform="tpu", **kw) is None
    assert "interpret" in unsupported_reason(q, kv, kv, platform="cpu", **kw)
    assert "bias" in unsupported_reason(q, kv, kv, platform="gpu", has_bias=True, has_mask=False)
    assert "mask" in unsupported_reason(q, kv, kv, platform="gpu", has_bias=False, has_mask=True)
    q96 = jax.ShapeDtypeStruct((2, 16, 8, 96), jnp.bfloat16)
    assert "head dim 96" in unsupported_reason(q96, q96, q96, platform="gpu", **kw)
    mixed = jax.ShapeDtypeStruct((2, 32, 2, 128), jnp.float32)
    assert "differ" in unsupported_reason(q, mixed, kv, platform="gpu", **kw)
    odd = jax.ShapeDtypeStruct((2, 32, 3, 128), jnp.bfloat16)
    assert "multiple" in unsupported_reason(q, odd, odd, platform="gpu", **kw)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() == "cpu", reason="needs a GPU or TPU")
@pytest.mark.parametrize("causal", [False, True])
def test_compiled_matches_reference(causal, rng):
    case = Case(T=300, S=260, N=8, K=2, H=128, B=2, causal=causal, lengths=True)
    arrays, d_out, d_lse, kw = _inputs(case, rng, jnp.bfloat16)
    ref_out, ref_lse, ref_grads = reference(*arrays, d_out, d_lse, scale=case.H**-0.5,
                                            causal=causal, **kw)

    def f(q, k, v):
        return pallas_attention(q, k, v, scale=case.H**-0.5, is_causal=causal,
                                query_seq_lengths=kw["q_len"], key_value_seq_lengths=kw["kv_len"],
                                return_residual=True, interpret=False)

    (out, lse), vjp = jax.vjp(jax.jit(f), *arrays)
    grads = vjp((jnp.asarray(d_out, out.dtype), jnp.asarray(d_lse)))
    np.testing.assert_allclose(np.asarray(out, np.float64), ref_out, **BF16_TOL)
    finite = np.isfinite(ref_lse)
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
    np.testing.assert_allclose(np.asarray(lse)[finite], ref_lse[finite], **BF16_TOL)
    for g, r in zip(grads, ref_grads, strict=True):
        scale = max(1.0, float(np.abs(r).max()))
        np.testing.assert_allclose(np.asarray(g, np.float64) / scale, r / scale, **BF16_TOL)


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
    (256, jnp.float32, {"q_segment_ids": jnp.zeros((2, 300), jnp.int32),
                        "kv_segment_ids": jnp.zeros((2, 260), jnp.int32)}),
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
