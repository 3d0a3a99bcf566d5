"""Ring attention on the 8 simulated CPU devices: equals dot_product_attention on the gathered sequence.

Dimension legend: B batch, T global length, P ring size, N query heads, K kv heads, H head dim.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_cases import np_attention
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jaxla
from jaxla.attention import EMPTY_ROW_LSE, from_ring_layout, to_ring_layout

RING = 8


def _mesh():
    return Mesh(np.array(jax.devices()[:RING]), ("sp",))


def _data(rng, b=2, t=64, n=4, kh=2, h=8, hv=8):
    q = rng.normal(size=(b, t, n, h)).astype(np.float32)
    k = rng.normal(size=(b, t, kh, h)).astype(np.float32)
    v = rng.normal(size=(b, t, kh, hv)).astype(np.float32)
    return q, k, v


def _ring_fn(*, layout="contiguous", check_vma=True, with_segments=False, **kw):
    """f(q, k, v[, seg]) on global arrays: permute into the layout, ring-attend, permute back."""
    spec = P(None, "sp")

    def local(q, k, v, *seg):
        segment_ids = seg[0] if seg else None
        out, lse = jaxla.ring_attention(q, k, v, axis_name="sp", layout=layout,
                                        segment_ids=segment_ids, return_residual=True, **kw)
        return out, lse

    ring = jax.shard_map(local, mesh=_mesh(), in_specs=spec, out_specs=(spec, spec),
                         check_vma=check_vma)

    def f(*xs):
        xs = [to_ring_layout(x, ring_size=RING, layout=layout) for x in xs]
        out, lse = ring(*xs)
        return (from_ring_layout(out, ring_size=RING, layout=layout),
                from_ring_layout(lse, ring_size=RING, layout=layout))

    return f


def _loss(f, w_out, w_lse):
    def loss(q, k, v, *rest):
        out, lse = f(q, k, v, *rest)
        return jnp.sum(out * w_out) + jnp.sum(jnp.where(lse > EMPTY_ROW_LSE, lse, 0.0) * w_lse)
    return loss


def _compare(rng, ring, single, args):
    out, lse = jax.jit(ring)(*args)
    ref_out, ref_lse = single(*args)
    np.testing.assert_allclose(out, ref_out, atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, atol=2e-6, rtol=1e-5)
    w_out = jnp.asarray(rng.normal(size=ref_out.shape), jnp.float32)
    w_lse = jnp.asarray(rng.normal(size=ref_lse.shape), jnp.float32)
    grads = jax.jit(jax.grad(_loss(ring, w_out, w_lse), argnums=(0, 1, 2)))(*args)
    ref_grads = jax.grad(_loss(single, w_out, w_lse), argnums=(0, 1, 2))(*args)
    for g, r, name in zip(grads, ref_grads, "qkv", strict=True):
        np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")
    return out


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("causal", [False, True])
def test_ring_equals_gathered_attention_values_and_grads(rng, layout, causal):
    q, k, v = _data(rng)  # GQA: N=4 query heads over K=2 kv heads
    ring = _ring_fn(layout=layout, is_causal=causal)

    def single(q, k, v):
        return jaxla.dot_product_attention(q, k, v, is_causal=causal, implementation="xla",
                                           return_residual=True)

    out = _compare(rng, ring, single, (q, k, v))
    ref = np_attention(q, k, v, causal=causal)
    np.testing.assert_allclose(out, ref.out, atol=1e-5)


@pytest.mark.parametrize("implementation", ["cpu", "chunked"])
def test_ring_with_compiled_blocks_segments_and_softcap(rng, implementation):
    """Under shard_map's default check_vma=True: the compiled blocks type their results and
    gradients as varying over the ring axis (the memory test below runs check_vma=False)."""
    q, k, v = _data(rng, h=8, hv=16)
    seg = np.sort(rng.integers(0, 4, size=(2, 64)), axis=1).astype(np.int32)
    softcap = None if implementation == "cpu" else 3.0  # the cpu kernel has no soft cap
    kw = dict(is_causal=True, logits_soft_cap=softcap)
    ring = _ring_fn(layout="zigzag", check_vma=True, implementation=implementation, **kw)

    def single(q, k, v, seg):
        return jaxla.dot_product_attention(q, k, v, segment_ids=seg, implementation="xla",
                                           return_residual=True, **kw)

    out = _compare(rng, ring, single, (q, k, v, seg))
    ref = np_attention(q, k, v, causal=True, q_seg=seg, kv_seg=seg, softcap=softcap)
    np.testing.assert_allclose(out, ref.out, atol=1e-5)


def test_layout_helpers_roundtrip_and_zigzag_order():
    x = jnp.arange(16)[None]
    z = to_ring_layout(x, ring_size=4, layout="zigzag")
    # chunks of 2: device i holds chunks i and 7 - i
    assert z[0].tolist() == [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9]
    np.testing.assert_array_equal(from_ring_layout(z, ring_size=4, layout="zigzag"), x)
    np.testing.assert_array_equal(to_ring_layout(x, ring_size=4, layout="contiguous"), x)


def test_memory_per_device_is_linear_in_local_length(rng):
    """The compiled per-device program (forward + backward) holds O(T/P), not O(T²) or O(T)."""
    spec = P(None, "sp")
    sharding = jax.sharding.NamedSharding(_mesh(), spec)
    blocks = jaxla.ChunkedBlockSizes(8, 8)

    def local(q, k, v):
        return jaxla.ring_attention(q, k, v, axis_name="sp", is_causal=True, layout="zigzag",
                                    implementation="chunked", block_sizes=blocks)

    ring = jax.shard_map(local, mesh=_mesh(), in_specs=spec, out_specs=spec, check_vma=False)

    def stats(t):
        q, k, v = (jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=sharding)
                   for x in _data(rng, b=1, t=t))
        fn = jax.jit(jax.grad(lambda q, k, v: jnp.sum(ring(q, k, v)), argnums=(0, 1, 2)))
        return fn.lower(q, k, v).compile().memory_analysis(), q.size + k.size + v.size

    (small, n_small), (large, n_large) = stats(256), stats(1024)
    # Each device receives only its T/P rows of q, k and v.
    assert small.argument_size_in_bytes == 4 * n_small // RING
    assert large.argument_size_in_bytes == 4 * n_large // RING
    # 4× the length: temporaries grow about 4× (linear), far from the 16× of T² scores.
    assert large.temp_size_in_bytes <= 5 * small.temp_size_in_bytes, (
        small.temp_size_in_bytes, large.temp_size_in_bytes)


def test_bad_inputs_say_what_is_wrong(rng):
    q, k, v = _data(rng)
    with pytest.raises(ValueError, match="axis_name='sp' is not a mesh axis"):
        jaxla.ring_attention(q, k, v, axis_name="sp")
    with pytest.raises(ValueError, match="multiple of 16"):
        to_ring_layout(jnp.zeros((1, 20)), ring_size=8, layout="zigzag")
    with pytest.raises(ValueError, match="layout must be one of"):
        to_ring_layout(jnp.zeros((1, 16)), ring_size=8, layout="striped")

    def run(fn, *xs, check_vma=True):
        spec = P(None, "sp")
        return jax.shard_map(fn, mesh=_mesh(), in_specs=spec, out_specs=spec,
                             check_vma=check_vma)(*xs)

    with pytest.raises(ValueError, match="axis_name='seq' is not a mesh axis"):
        run(lambda q, k, v: jaxla.ring_attention(q, k, v, axis_name="seq"), q, k, v)
    # A global length the ring does not split: shard_map itself refuses, naming the sizes.
    with pytest.raises(ValueError, match="not evenly divisible"):
        run(lambda q, k, v: jaxla.ring_attention(q, k, v, axis_name="sp"), *_data(rng, t=60))
    odd = _data(rng, t=24)  # local length 3: zigzag needs 2 chunks per device
    with pytest.raises(ValueError, match="even local length"):
        run(lambda q, k, v: jaxla.ring_attention(q, k, v, axis_name="sp", is_causal=True,
                                                 layout="zigzag"), *odd)
    with pytest.raises(ValueError, match="same local length"):
        run(lambda q, k: jaxla.ring_attention(q, k[:, :4], k[:, :4], axis_name="sp"), q, k)
    with pytest.raises(ValueError, match=r"'pallas' runs only under .*check_vma=False"):
        run(lambda q, k, v: jaxla.ring_attention(q, k, v, axis_name="sp",
                                                 implementation="pallas"), q, k, v)
    with pytest.raises(ValueError, match="multiple of the kv heads"):
        run(lambda q, k, v: jaxla.ring_attention(q[..., :3, :], k, v, axis_name="sp"), q, k, v)


def test_rank3_inputs_with_a_segment_pair(rng):
    q, k, v = (x[0] for x in _data(rng))  # TNH
    seg = np.sort(rng.integers(0, 3, size=(64,)), axis=0).astype(np.int32)
    spec = P("sp")
    ring = jax.shard_map(
        lambda q, k, v, s: jaxla.ring_attention(q, k, v, axis_name="sp", segment_ids=(s, s)),
        mesh=_mesh(), in_specs=spec, out_specs=spec)
    out = jax.jit(ring)(q, k, v, seg)
    ref = np_attention(q[None], k[None], v[None], q_seg=seg[None], kv_seg=seg[None])
    np.testing.assert_allclose(out, ref.out[0], atol=1e-5)


def test_nan_reaches_only_the_rows_that_see_it(rng):
    q, k, v = _data(rng)
    k = k.copy()
    k[:, 60] = np.nan  # on the last device: causal rows before 60 never see it
    out, _ = jax.jit(_ring_fn(is_causal=True))(q, k, v)
    assert np.isfinite(np.asarray(out[:, :60])).all()
    assert np.isnan(np.asarray(out[:, 60:])).all()
