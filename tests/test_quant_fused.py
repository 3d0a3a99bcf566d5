"""The fused dequantize-and-multiply CPU kernel (jaxla.quant._fused) against float64 NumPy.

Tolerance: the kernel and ``x @ dequantize(q)`` differ only in the order of their f32 sums (and by
at most half an ulp per weight where one fuses q4_1/int4's offset multiply-add), so both must lie
within ``4·eps32·(|x| @ |W|)`` of the float64 product of x and the decoded weights.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxla
from jaxla import _cpu_dispatch, lora, quant
from jaxla.quant import _fused

pytestmark = pytest.mark.skipif(_fused.available() is not None or jax.default_backend() != "cpu",
                                reason=f"fused kernel unavailable: {_fused.available()}")

EPS = float(np.finfo(np.float32).eps)
# (format, quantize kwargs, d_in): d_in 50 is not a multiple of any SIMD width (int8 allows it).
CASES = [("q8_0", {}, 96), ("q4_0", {}, 96), ("q4_1", {}, 96), ("int8", {}, 50),
         ("int4", {"block_size": 32}, 96), ("nf4", {"block_size": 32}, 96),
         ("nf4", {"block_size": 32, "double_quant": True}, 64)]


_dequantize = jax.jit(quant.dequantize)  # one compile per format, not one per jnp op


def _reference(x, q):
    w = np.asarray(_dequantize(q), np.float64)
    if q.axis == -1:
        w = w.T
    x = np.asarray(x, np.float64)
    return x @ w, np.abs(x) @ np.abs(w)


def _check(y, x, q):
    ref, scale = _reference(x, q)
    err = np.abs(np.asarray(y, np.float64) - ref)
    assert np.all(err <= 4 * EPS * scale + 1e-30), (q, float(np.max(err / (EPS * scale + 1e-30))))


def test_every_format_and_path_matches_float64(rng):
    cases = []
    for fmt, kw, d_in in CASES:
        w = rng.standard_normal((d_in, 37)).astype(np.float32)
        q = (quant.quantize(w, format=fmt) if fmt.startswith("q") else  # GGUF: on the host
             jax.jit(lambda w, fmt=fmt, kw=kw: quant.quantize(w, format=fmt, **kw))(w))
        # One row, a partial register tile (every path), full and partial tiles (AVX-512: 8 + 5).
        cases.append(([rng.standard_normal((m, d_in)).astype(np.float32) for m in (1, 7, 13)], q))
    paths = _fused.supported_paths()

    def products(cases):  # every format, path and row count in one compiled program
        return [[[_fused.rows_product(x, q, path=path) for x in xs] for path in paths]
                for xs, q in cases]

    for (xs, q), per_path in zip(cases, jax.jit(products)(cases), strict=True):
        for ys in per_path:
            for x, y in zip(xs, ys, strict=True):
                _check(y, x, q)
    # The tied head's table (blocks along each row, logits = h · Eᵀ) is the same product.
    table = quant.quantize(rng.standard_normal((41, 64)).astype(np.float32), format="q8_0", axis=-1)
    h = rng.standard_normal((2, 3, 64)).astype(np.float32)
    logits = _fused.rows_product(jnp.asarray(h), table)
    assert logits.shape == (2, 3, 41)
    _check(np.asarray(logits).reshape(6, 41), h.reshape(6, 64), table)


def test_linear_lora_use_the_kernel_and_grads_reach_x_only(rng):
    w = rng.standard_normal((64, 24)).astype(np.float32)
    q = quant.quantize(w, format="q4_1")
    x = jnp.asarray(rng.standard_normal((3, 64)).astype(np.float32))
    jaxpr = str(jax.make_jaxpr(lambda x: jaxla.linear({"w": q}, x))(x))
    assert "jaxla_quant_matmul" in jaxpr
    adapter = lora.Adapter(a=jnp.asarray(rng.standard_normal((4, 64)), jnp.float32),
                           b=jnp.asarray(rng.standard_normal((24, 4)), jnp.float32), alpha=8.0)
    assert "jaxla_quant_matmul" in str(jax.make_jaxpr(
        lambda x: lora.linear({"w": q}, adapter, x))(x))
    _check(jaxla.linear({"w": q}, x), x, q)

    check_grads(lambda x: jaxla.linear({"w": q}, x), (x,), order=1, modes=["rev"], eps=1e-2,
                atol=1e-2, rtol=1e-2)
    nq = quant.quantize(w, format="nf4", block_size=32)
    y, vjp = jax.vjp(lambda x, q: jaxla.linear({"w": q}, x), x, nq)
    dx, dq = vjp(jnp.ones_like(y))
    np.testing.assert_allclose(dx, np.ones((3, 24)) @ np.asarray(quant.dequantize(nq)).T,
                               rtol=1e-5, atol=1e-5)
    assert not np.any(np.asarray(dq.scales)) and dq.codes.dtype == jax.dtypes.float0


def test_vmap_scan_and_nan(rng):
    stack = rng.standard_normal((3, 64, 32)).astype(np.float32)
    q = quant.quantize(stack, format="q4_0", stack_axes=1)
    x = rng.standard_normal((2, 5, 64)).astype(np.float32)
    x[1, 2, 7] = np.nan
    layer0 = jax.tree.map(lambda v: v[0], q)

    def scan(q, x):  # the models' layout: a stacked QArray sliced per layer by lax.scan
        def body(h, layer):
            y = jaxla.linear({"w": layer}, h)
            return h, y
        return jax.lax.scan(body, x, q)[1]

    per_layer = jax.jit(scan)(q, jnp.asarray(x))
    assert "jaxla_quant_matmul" in str(jax.make_jaxpr(scan)(q, jnp.asarray(x)))
    vmapped_x = jax.vmap(lambda x: jaxla.linear({"w": layer0}, x))(jnp.asarray(x))
    vmapped_q = jax.vmap(lambda layer: jaxla.linear({"w": layer}, jnp.asarray(x)))(q)
    vmapped_both = jax.vmap(lambda layer, x: jaxla.linear({"w": layer}, x))(
        q, jnp.broadcast_to(jnp.asarray(x), (3, *x.shape)))
    for got in (per_layer, vmapped_q, vmapped_both):
        assert got.shape == (3, 2, 5, 32)
        for i in range(3):
            layer = jax.tree.map(lambda v, i=i: v[i], q)
            ok = ~np.isnan(x).any(axis=-1)
            _check(np.asarray(got[i])[ok], x[ok], layer)
    np.testing.assert_array_equal(vmapped_x, per_layer[0])
    # A NaN in x makes its row's outputs NaN (and no other row's).
    assert np.all(np.isnan(np.asarray(per_layer)[:, 1, 2])), "NaN laundered"
    assert np.isfinite(np.asarray(per_layer)[:, 0]).all()


def test_jnp_fallback_without_extension_and_errors(monkeypatch, rng):
    q = quant.quantize(rng.standard_normal((64, 16)).astype(np.float32), format="q8_0")
    x = jnp.asarray(rng.standard_normal((2, 64)).astype(np.float32))
    fused = jaxla.linear({"w": q}, x)
    monkeypatch.setattr(_fused, "_ext", None)
    assert "not built" in _fused.fused_reason(q, 2)
    jaxpr = str(jax.make_jaxpr(lambda x: jaxla.linear({"w": q}, x))(x))
    assert "jaxla_quant_matmul" not in jaxpr
    np.testing.assert_allclose(jaxla.linear({"w": q}, x), fused, rtol=1e-5, atol=1e-5)
    monkeypatch.undo()
    assert "rows of x" in _fused.fused_reason(q, _fused.MAX_FUSED_ROWS + 1)
    with pytest.raises(ValueError, match="C = 64"):
        _fused.rows_product(jnp.ones((2, 63)), q)
    with pytest.raises(ValueError, match="sse9"):
        _fused.rows_product(x, q, path="sse9")
    assert _cpu_dispatch.choose_path("sse9", {"portable": 0}, ["portable"])[0] is None


def test_env_variable_selects_the_path():
    code = "from jaxla.quant import _fused; print(_fused.kernel_path(), _fused.available())"
    env = dict(os.environ, JAXLA_CPU_KERNEL="portable")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert out == ["portable", "None"]


def test_layer_product_reads_a_stacked_layer_in_place(rng):
    """layer_product(x, stack, i) equals rows_product(x, stack[i]) bitwise inside lax.scan (the
    kernel reads layer i where it lies), with gradients to x only; the stack is never sliced."""
    stacks = {"q4_1": quant.quantize(rng.standard_normal((3, 64, 32)).astype(np.float32),
                                     format="q4_1", stack_axes=1),
              "int4": quant.quantize(rng.standard_normal((3, 64, 32)).astype(np.float32),
                                     format="int4", block_size=32, stack_axes=1)}
    x = jnp.asarray(rng.standard_normal((2, 64)).astype(np.float32))

    def both(stacks, x):
        def body(h, i):
            ys = [(_fused.layer_product(h, q, i), _fused.rows_product(h, _fused._take_layer(q, i)))
                  for q in stacks.values()]
            return h, ys
        return jax.lax.scan(body, x, jnp.arange(3, dtype=jnp.int32))[1]

    for in_place, sliced in jax.jit(both)(stacks, x):
        np.testing.assert_array_equal(in_place, sliced)
    hlo = jax.jit(lambda q, x: jax.lax.scan(
        lambda h, i: (h, _fused.layer_product(h, q, i)), x, jnp.arange(3, dtype=jnp.int32))[1]
    ).lower(stacks["q4_1"], x).compile().as_text()
    assert "jaxla_quant_matmul_layer" in hlo and "u8[1,32,2,20]" not in hlo  # no slice of codes
    q = stacks["q4_1"]
    dx = jax.grad(lambda x: jnp.sum(_fused.layer_product(x, q, jnp.int32(1)) ** 2))(x)
    want = jax.grad(lambda x: jnp.sum(_fused.rows_product(x, _fused._take_layer(q, 1)) ** 2))(x)
    np.testing.assert_allclose(dx, want, rtol=1e-6, atol=1e-6)
    assert "stacking axes ()" in _fused.layer_reason(_fused._take_layer(q, 0), 1)
    nested = quant.quantize(rng.standard_normal((2, 2, 64, 32)).astype(np.float32), format="q4_0",
                            stack_axes=2)
    with pytest.raises(ValueError, match="one axis"):
        _fused.layer_product(x, nested, 0)
    with pytest.raises(ValueError, match="integer scalar"):
        _fused.layer_product(x, q, jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match=r"\(\.\.\., C\) with C = 64"):
        _fused.layer_product(x[:, :32], q, 0)
