"""Sharded real models on the 8 simulated CPU devices: jaxla.models' rules by parameter path.

A few LoRA training steps of a tiny Llama and a tiny BERT on a 4 × 2 (data × model) mesh follow the
single-device loss trajectory, and the compiled step really receives sharded parameters.

Dimension legend: B batch, T tokens, V vocabulary, D width, F MLP width, L layers, N / K heads,
H head dim.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxla import lora, models, quant

LLAMA = models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                           num_heads=4, num_kv_heads=2, head_dim=8)
BERT = models.BertConfig(vocab_size=40, hidden_size=16, num_layers=2, num_heads=4,
                         intermediate_size=24, max_position_embeddings=12)
TARGETS = ["attn/(q|k|v|o)/w", "mlp/(gate|up|down)/w"]
STEPS = 4
FAST = {"xla_backend_optimization_level": 0}  # compile time, not speed, matters here


def _mesh():
    return Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), ("data", "model"))


def _llama_params(rng, c=LLAMA):
    L, d, f, v = c.num_layers, c.hidden_size, c.intermediate_size, c.vocab_size
    nh, kh = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim

    def w(*shape):
        return jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[-2]), jnp.float32)

    ones = jnp.ones((L, d), jnp.float32)
    return {"embed": {"table": jnp.asarray(rng.normal(size=(v, d)), jnp.float32)},
            "layers": {"attn_norm": {"scale": ones},
                       "attn": {"q": {"w": w(L, d, nh)}, "k": {"w": w(L, d, kh)},
                                "v": {"w": w(L, d, kh)}, "o": {"w": w(L, nh, d)}},
                       "mlp_norm": {"scale": ones},
                       "mlp": {"gate": {"w": w(L, d, f)}, "up": {"w": w(L, d, f)},
                               "down": {"w": w(L, f, d)}}},
            "norm": {"scale": jnp.ones((d,), jnp.float32)},
            "lm_head": {"w": w(d, v)}}


def _bert_params(rng, c=BERT):
    L, d, f = c.num_layers, c.hidden_size, c.intermediate_size

    def w(*shape, scale=None):
        scale = 1 / np.sqrt(shape[-2]) if scale is None else scale
        return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)

    def lin(i, o):
        return {"w": w(L, i, o), "b": w(L, o, scale=0.1)}

    norm = {"scale": 1 + w(L, d, scale=0.1), "bias": w(L, d, scale=0.1)}
    return {"embeddings": {"word": w(c.vocab_size, d, scale=1.0),
                           "position": w(c.max_position_embeddings, d, scale=0.5),
                           "token_type": w(c.type_vocab_size, d, scale=0.5),
                           "norm": {"scale": jnp.ones((d,), jnp.float32),
                                    "bias": jnp.zeros((d,), jnp.float32)}},
            "layers": {"attn": {k: lin(d, d) for k in "qkvo"}, "attn_norm": norm,
                       "mlp": {"up": lin(d, f), "down": lin(f, d)}, "mlp_norm": norm}}


def _llama_loss(params, adapters, ids):
    logits = models.forward(LLAMA, params, ids[:, :-1], adapters=adapters)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]))


def _bert_loss(params, adapters, batch):
    ids, target = batch
    e = models.embed(BERT, params, ids, attention_mask=ids > 0, adapters=adapters)
    return jnp.mean(jnp.square(e - target))


def _trajectory(config, loss_fn, params, batch, mesh):
    """Losses of STEPS momentum-SGD steps on LoRA adapters; with ``mesh`` everything is laid out by
    ``models``' rules and the batch over ``data``. Returns (losses, compiled step)."""
    adapters = lora.init(jax.random.key(0), params, rank=4, alpha=8.0, targets=TARGETS,
                         stack_axes=1)
    # b = 0 would leave the first steps' loss flat; start from a nonzero update instead.
    adapters = jax.tree.map(lambda x: x + 0.05, adapters)
    optimizer = optax.sgd(0.1, momentum=0.9)
    state = {"lora": adapters, "opt": optimizer.init(adapters)}
    train = lora.train_step(loss_fn, optimizer, jit=False)

    def step(state, params, batch):
        adapters, opt, loss = train(params, state["lora"], state["opt"], batch)
        return {"lora": adapters, "opt": opt}, loss

    kw = {}
    if mesh is not None:
        params = models.shard(params, mesh, config=config)
        shardings = models.param_shardings(config, state, mesh)
        state = jax.device_put(state, shardings)
        batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
        kw = dict(out_shardings=(shardings, NamedSharding(mesh, P())))
    compiled = jax.jit(step, **kw).lower(state, params, batch).compile(FAST)
    losses = []
    for _ in range(STEPS):
        state, loss = compiled(state, params, batch)
        losses.append(float(loss))
    return np.asarray(losses), compiled, (state, params, batch)


def _device_bytes(tree):
    """Bytes one device holds of ``tree`` (arrays), from each array's sharding."""
    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
               for x in jax.tree.leaves(tree))


def _nbytes(tree):
    return sum(x.nbytes for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_mesh_trajectory_equals_single_device_and_params_are_sharded(rng, family):
    if family == "llama":
        config, loss_fn, params = LLAMA, _llama_loss, _llama_params(rng)
        batch = jnp.asarray(rng.integers(0, LLAMA.vocab_size, size=(8, 9)), jnp.int32)
    else:
        config, loss_fn, params = BERT, _bert_loss, _bert_params(rng)
        ids = rng.integers(1, BERT.vocab_size, size=(8, 10))
        ids[::3, 7:] = 0  # some padding
        batch = (jnp.asarray(ids, jnp.int32),
                 jnp.asarray(rng.normal(size=(8, BERT.hidden_size)) * 0.3, jnp.float32))
    single, _, _ = _trajectory(config, loss_fn, params, batch, None)
    sharded, compiled, (state, placed, _) = _trajectory(config, loss_fn, params, batch, _mesh())
    assert np.all(np.diff(single) < 0), single  # it trains
    np.testing.assert_allclose(sharded, single, atol=1e-4, rtol=0)

    # Every kernel and table lives 1/8 on each device (all dims divide here), column-parallel
    # biases 1/2 (model), the rest (norms, o/down biases, position tables) replicated.
    for path, x in jax.tree_util.tree_flatten_with_path(placed)[0]:
        name = "/".join(str(k.key) for k in path)
        frac = np.prod(x.sharding.shard_shape(x.shape)) / x.size
        if name.endswith(("/w", "table", "word")):
            expected = 1 / 8
        elif name.endswith(("q/b", "k/b", "v/b", "up/b", "gate/b")):
            expected = 1 / 2
        else:
            expected = 1
        assert frac == expected, (name, x.sharding.spec)
    # What XLA compiled for: the per-device argument bytes are those of the sharded layout.
    args = compiled.memory_analysis().argument_size_in_bytes
    batch_bytes = args - _device_bytes(placed) - _device_bytes(state)
    assert 0 <= batch_bytes <= _nbytes(jax.tree.leaves(batch)), (args, batch_bytes)
    assert _device_bytes(placed) < 0.25 * _nbytes(placed)
    # LoRA b of a column-parallel kernel follows its d_out split, a of a row-parallel its d_in.
    assert state["lora"]["layers/attn/q/w"].b.sharding.spec == P(None, "model", None)
    assert state["lora"]["layers/attn/o/w"].a.sharding.spec == P(None, None, "model")
    assert state["opt"][0].trace["layers/attn/q/w"].b.sharding.spec == P(None, "model", None)


def test_rules_for_quantized_kernels_split_rows_and_forward_matches(rng):
    params = _llama_params(rng)
    model = models.quantize(models.Model(LLAMA, params), format="q8_0")
    specs = models.param_specs(model, model.params, {"data": 4, "model": 2})
    q, o = specs["layers"]["attn"]["q"]["w"], specs["layers"]["attn"]["o"]["w"]
    assert isinstance(q, quant.QArray)
    # codes (L, O, nb, bb): O (= N·H) on model for column parallel, O (= D) on data (FSDP) for o.
    assert q.codes == P(None, "model", None, None)
    assert o.codes == P(None, "data", None, None)
    sharded = models.shard(model, _mesh())
    fwd = jax.jit(lambda p, ids: models.forward(LLAMA, p, ids))
    ids = jnp.asarray(rng.integers(0, LLAMA.vocab_size, size=(4, 8)), jnp.int32)
    np.testing.assert_allclose(fwd(sharded.params, ids), fwd(model.params, ids), atol=1e-5)


def test_bad_shardings_are_named(rng):
    params = _llama_params(rng)
    with pytest.raises(ValueError, match=r"mesh axes \['model'\].*axes are \('data', 'tp'\)"):
        models.param_specs(LLAMA, params, {"data": 4, "tp": 2})
    with pytest.raises(ValueError, match=r"'model' of size 4 does not divide num_kv_heads=2"):
        models.param_specs(LLAMA, params, {"data": 2, "model": 4})
    with pytest.raises(ValueError, match=r"'layers/attn/k/w'.*size 4.*2 heads of head_dim 8"):
        models.tree_specs(params, models.sharding_rules(LLAMA), {"data": 2, "model": 4})
    with pytest.raises(ValueError, match="data_axis and model_axis must differ"):
        models.sharding_rules(LLAMA, data_axis="x", model_axis="x")
    with pytest.raises(TypeError, match="needs config="):
        models.shard(params, _mesh())
    # FSDP off and a width the data axis does not divide: replicated, not an error.
    specs = models.param_specs(LLAMA, params, {"data": 3, "model": 2}, fsdp=True)
    assert specs["layers"]["attn"]["q"]["w"] == P(None, None, "model")
    specs = models.param_specs(LLAMA, params, {"data": 4, "model": 1}, fsdp=False)
    assert specs["layers"]["mlp"]["up"]["w"] == P(None, None, None)
    specs = models.param_specs(LLAMA, params, {"data": 4}, model_axis=None)
    assert specs["embed"]["table"] == P(None, "data")


def test_minilm_demo_refuses_a_mesh_that_splits_heads(tmp_path):
    from bert_checkpoint import write_checkpoint

    from jaxla import finetune
    from jaxla.finetune._errors import ConfigError

    write_checkpoint(tmp_path / "model", np.random.default_rng(0), tokenizer=False)  # 4 heads
    cfg = finetune.apply_overrides(finetune.load_config("minilm_sentiment"), [
        f"minilm_sentiment.model={tmp_path / 'model'}", "minilm_sentiment.max_length=12",
        "mesh.data=1", "mesh.model=8"])
    with pytest.raises(ConfigError, match=r"mesh.model = 8: .*does not divide num_heads=4"):
        finetune.run_finetune(cfg, out=tmp_path / "run", progress=False, echo=lambda s: None)
