"""Eager calls of public functions compile one program per signature (jaxla._eager.compiled)."""

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxla
from jaxla import _eager


class _Compiles(logging.Handler):
    """The names of the programs XLA compiles while installed (from jax's compile log)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.names = []

    def emit(self, record):
        m = re.search(r"Finished XLA compilation of (\S+)", record.getMessage())
        if m:
            self.names.append(m.group(1))


def _compiled_names(fn):
    handler = _Compiles()
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles(True):
            jax.block_until_ready(fn())
    finally:
        logger.removeHandler(handler)
    return handler.names


def test_an_eager_decode_step_compiles_one_program(rng):
    """Op by op, an eager decode step compiled ~60 one-operation programs (~3 s on 2 cores)."""
    # Shapes no other test uses, so that nothing is cached yet.
    d, heads = 40, 5
    mha = jaxla.init_mha(jax.random.key(0), d, heads)
    cache = jaxla.init_kv_cache(3, 11, heads, d // heads)
    x = jnp.asarray(rng.standard_normal((3, 1, d)), jnp.float32)
    names = _compiled_names(lambda: jaxla.multi_head_attention_decode(
        mha, x, cache, num_heads=heads, rope_theta=500.0))
    assert names == ["jit(multi_head_attention_decode)"], names
    # The same signature again compiles nothing; another option value is another program.
    assert _compiled_names(lambda: jaxla.multi_head_attention_decode(
        mha, x, cache, num_heads=heads, rope_theta=500.0)) == []
    assert _compiled_names(lambda: jaxla.multi_head_attention_decode(
        mha, x, cache, num_heads=heads, rope_theta=600.0)) == ["jit(multi_head_attention_decode)"]


@pytest.mark.parametrize("name", ["cosine_similarity", "top_k_similar", "mlp", "layer_norm",
                                  "apply_rope", "multi_head_attention"])
def test_compiled_calls_equal_the_function_run_op_by_op(name, rng):
    f32 = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    calls = {
        "cosine_similarity": (jaxla.cosine_similarity, (f32(4, 7, 24), f32(7, 24)), {"eps": 1e-6}),
        "top_k_similar": (jaxla.top_k_similar, (f32(5, 24), f32(33, 24), 4), {"metric": "dot"}),
        "mlp": (jaxla.mlp, (jaxla.init_mlp(jax.random.key(1), 24, 40, gated=True), f32(3, 24)), {}),
        "layer_norm": (jaxla.layer_norm, (jaxla.init_layer_norm(24), f32(6, 24)), {"eps": 1e-5}),
        "apply_rope": (jaxla.apply_rope, (f32(2, 9, 3, 8),), {"theta": 100.0}),
        "multi_head_attention": (jaxla.multi_head_attention,
                                 (jaxla.init_mha(jax.random.key(2), 24, 4, num_kv_heads=2),
                                  f32(2, 9, 24)), {"num_heads": 4, "is_causal": True}),
    }
    fn, args, kwargs = calls[name]
    got = fn(*args, **kwargs)
    want = fn.__wrapped__(*args, **kwargs)  # the same function, dispatched op by op
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=2e-6, atol=2e-6)


def test_inside_a_trace_the_function_is_traced_into_the_callers_program():
    jaxpr = jax.make_jaxpr(lambda a, b: jaxla.cosine_similarity(a, b))(jnp.ones(8), jnp.ones(8))
    nested = [e.params.get("name") for e in jaxpr.eqns if e.primitive.name in ("jit", "pjit")]
    assert "cosine_similarity" not in nested and "_where" in nested, nested  # jnp's own jits stay
    # grad and vmap of an eager call go through the function itself too.
    g = jax.grad(lambda a: jaxla.dot(a, a))(jnp.arange(3.0))
    np.testing.assert_array_equal(g, [0.0, 2.0, 4.0])
    v = jax.vmap(lambda a: jaxla.dot(a, a))(jnp.ones((2, 3)))
    np.testing.assert_array_equal(v, [3.0, 3.0])


def test_python_values_lists_and_unhashable_options_keep_their_eager_meaning():
    # Lists are converted as an eager call converts them (not flattened into traced scalars).
    got = jaxla.dot([3.0, 4.0], [1.0, 0.0])
    assert got.dtype == jnp.float32 and float(got) == 3.0
    # Python numbers reach the function as themselves (static), so weak typing is unchanged.
    x = jnp.ones(4, jnp.bfloat16)
    assert jaxla.dot(x, x).dtype == jnp.bfloat16
    # NumPy scalar options are static too: they are still checked, and still usable as floats.
    a = jnp.ones((2, 8))
    with pytest.raises(ValueError, match="eps must be finite"):
        jaxla.cosine_similarity(a, a, eps=np.float32(np.nan))
    q = jnp.ones((1, 4, 2, 8))
    out = jaxla.dot_product_attention(q, q, q, logits_soft_cap=np.float32(30.0))
    np.testing.assert_allclose(out, q, rtol=1e-6)
    # A function option runs op by op: a fresh initializer per call must not compile per call.
    names = _compiled_names(lambda: [jaxla.init_linear(jax.random.key(i), 6, 10, kernel_init=(
        jax.nn.initializers.normal(0.02)))["w"] for i in range(3)])
    assert "jit(init_linear)" not in names, names
    # An unhashable option runs op by op and gets the function's own error.
    with pytest.raises((TypeError, ValueError), match="k"):
        jaxla.top_k_similar(jnp.ones((2, 4)), jnp.ones((3, 4)), [2])
    # Shape errors raised while tracing are the function's own.
    with pytest.raises(ValueError, match=r"x's last dimension 5 does not match"):
        jaxla.linear(jaxla.init_linear(jax.random.key(0), 4, 3), jnp.ones((2, 5)))


def test_compiled_needs_named_parameters():
    def varargs(*xs):
        return xs

    with pytest.raises(TypeError, match="named parameters only"):
        _eager.compiled(varargs)
