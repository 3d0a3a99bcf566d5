"""The compiled "cpu" backend runs per shard on batch/head-sharded inputs (8 simulated CPU devices).

Dimension legend: B batch, T length, N query heads, K kv heads, H head dim.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxla

ROWS = P("data", None, "model", None)


def _mesh(shape=(4, 2)):
    return jax.make_mesh(shape, ("data", "model"), axis_types=(AxisType.Explicit,) * 2)


def _data(rng, b=4, t=32, n=4, kh=2, h=8):
    q = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, t, kh, h)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, t, kh, h)), jnp.float32)
    seg = jnp.asarray(np.sort(rng.integers(0, 3, size=(b, t)), axis=1), jnp.int32)
    lengths = jnp.asarray(rng.integers(1, t + 1, size=(b,)), jnp.int32)
    return q, k, v, seg, lengths


def _attention(q, k, v, seg, lengths):
    return jaxla.dot_product_attention(q, k, v, is_causal=True, segment_ids=seg,
                                       key_value_seq_lengths=lengths, implementation="cpu")


def _loss(q, k, v, seg, lengths):
    return jnp.sum(jnp.sin(_attention(q, k, v, seg, lengths)))


def test_cpu_kernel_runs_per_shard_without_gathering(rng):
    q, k, v, seg, lengths = _data(rng)
    ref = _attention(q, k, v, seg, lengths)
    ref_grads = jax.grad(_loss, argnums=(0, 1, 2))(q, k, v, seg, lengths)
    mesh = _mesh()
    with jax.set_mesh(mesh):
        rows = NamedSharding(mesh, ROWS)
        qs, ks, vs = (jax.device_put(x, rows) for x in (q, k, v))
        segs = jax.device_put(seg, NamedSharding(mesh, P("data", None)))
        lens = jax.device_put(lengths, NamedSharding(mesh, P("data")))
        fwd = jax.jit(_attention)
        bwd = jax.jit(jax.grad(_loss, argnums=(0, 1, 2)))
        for fn in (fwd, bwd):
            hlo = fn.lower(qs, ks, vs, segs, lens).compile().as_text()
            assert "all-gather" not in hlo and "all-to-all" not in hlo
            assert "custom-call" in hlo  # the compiled kernel is in the per-device program
        out = fwd(qs, ks, vs, segs, lens)
        assert jax.typeof(out).sharding.spec == ROWS
        np.testing.assert_allclose(out, ref, atol=1e-6)
        for g, r in zip(bwd(qs, ks, vs, segs, lens), ref_grads, strict=True):
            assert jax.typeof(g).sharding.spec == ROWS
            np.testing.assert_allclose(g, r, atol=1e-5)


def test_partitioned_cost_is_a_fraction_of_the_replicated_one(rng):
    """XLA's per-device cost analysis: sharded over 8 devices vs every device doing all rows."""
    q, k, v, *_ = _data(rng)
    mesh = _mesh()
    with jax.set_mesh(mesh):
        def cost(spec):
            shard = NamedSharding(mesh, spec)
            xs = [jax.device_put(x, shard) for x in (q, k, v)]
            fn = jax.jit(lambda q, k, v: jaxla.dot_product_attention(q, k, v, is_causal=True,
                                                                     implementation="cpu"))
            return fn.lower(*xs).compile().cost_analysis()["bytes accessed"]

        assert cost(ROWS) <= cost(P()) / 4


def test_sharding_errors_name_the_problem(rng):
    q, k, v, *_ = _data(rng)
    mesh = _mesh()
    fn = jax.jit(lambda q, k, v: jaxla.dot_product_attention(q, k, v, implementation="cpu"))
    with jax.set_mesh(mesh):
        split_h = NamedSharding(mesh, P("data", None, None, "model"))
        with pytest.raises(ValueError, match=r"head dim .* must not be sharded"):
            fn(*(jax.device_put(x, split_h) for x in (q, k, v)))
        rows = NamedSharding(mesh, ROWS)
        heads_only_q = NamedSharding(mesh, P("data", None, None, None))
        with pytest.raises(ValueError, match="same mesh axes"):
            fn(jax.device_put(q, rows), *(jax.device_put(x, heads_only_q) for x in (k, v)))
