"""jaxla.lora training: Optax steps on frozen weights, LoRA+, and adapters on Flax linen / NNX models."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxla
from jaxla import lora
from jaxla.benchmarks import specs_lora

SPEC = specs_lora.TEST_MLP_STACK


def _stack_params(seed=0):
    g = np.random.default_rng(seed)
    n, d, f = SPEC["layers"], SPEC["d_model"], SPEC["d_hidden"]
    return {
        "up": {"w": jnp.asarray(g.standard_normal((n, d, f)) / np.sqrt(d), jnp.float32),
               "b": jnp.zeros((n, f), jnp.float32)},
        "down": {"w": jnp.asarray(g.standard_normal((n, f, d)) / np.sqrt(f), jnp.float32),
                 "b": jnp.zeros((n, d), jnp.float32)},
        "head": {"w": jnp.asarray(g.standard_normal((d, 1)) / np.sqrt(d), jnp.float32)},
    }


def _stack_apply(params, adapters, x):
    """A residual MLP stack scanned over layers, with adapters on both projections."""

    def body(h, layer):
        up, down, a_up, a_down = layer
        z = jax.nn.gelu(lora.linear(up, a_up, h))
        return h + lora.linear(down, a_down, z), None

    xs = (params["up"], params["down"], adapters["up/w"], adapters["down/w"])
    h, _ = jax.lax.scan(body, x, xs)
    return jaxla.linear(params["head"], h)


def _data(seed=1):
    g = np.random.default_rng(seed)
    x = g.standard_normal((SPEC["batch"], SPEC["d_model"]))
    y = np.sin(x.sum(axis=1, keepdims=True))
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def _loss(params, adapters, x, y):
    return jnp.mean((_stack_apply(params, adapters, x) - y) ** 2)


def _init(key, params):
    return lora.init(key, params, rank=SPEC["rank"], alpha=SPEC["alpha"], targets=["up/w", "down/w"],
                     stack_axes=1)


@pytest.mark.parametrize("make_tx", [
    lambda: optax.adam(1e-2),
    lambda: lora.loraplus(optax.chain(optax.clip_by_global_norm(1.0),
                                      optax.adamw(1e-2, weight_decay=0.1)), ratio=4.0),
], ids=["adam", "loraplus-clip-adamw"])
def test_steps_keep_weights_frozen(key, make_tx):
    params = _stack_params()
    before = jax.tree.map(np.array, params)
    adapters = _init(key, params)
    tx = make_tx()
    opt_state = tx.init(adapters)
    step = lora.train_step(_loss, tx)
    x, y = _data()
    losses = []
    for _ in range(6):
        adapters, opt_state, loss = step(params, adapters, opt_state, x, y)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    for u, v in zip(jax.tree.leaves(params), jax.tree.leaves(before), strict=True):
        assert np.array_equal(np.asarray(u), v)  # bitwise
    w_shapes = {tuple(np.shape(w)) for w in jax.tree.leaves(params) if np.ndim(w) >= 2}
    state_shapes = {tuple(np.shape(s)) for s in jax.tree.leaves(opt_state)}
    assert not (w_shapes & state_shapes), "an optimizer-state leaf has a weight's shape"
    state_size = sum(np.size(s) for s in jax.tree.leaves(opt_state))
    adapter_size = lora.count_params(params, adapters).trainable
    assert state_size <= 2 * adapter_size + 4


def test_gradients_only_for_adapters(key):
    params = _stack_params()
    adapters = _init(key, params)
    grads = jax.grad(_loss, argnums=1)(params, adapters, *_data())
    assert jax.tree.structure(grads) == jax.tree.structure(adapters)
    # b = 0 at init: a's gradient is exactly zero, b's is not.
    assert not np.any(np.asarray(grads["up/w"].a))
    assert np.any(np.asarray(grads["up/w"].b))


def test_loraplus_scales_b_updates(key):
    params = _stack_params()
    adapters = jax.tree.map(lambda v: v + 0.01, _init(key, params))
    x, y = _data()
    grads = jax.grad(_loss, argnums=1)(params, adapters, x, y)
    plain, _ = optax.sgd(0.1).update(grads, optax.sgd(0.1).init(adapters))
    tx = lora.loraplus(optax.sgd(0.1), ratio=8.0)
    plus, _ = tx.update(grads, tx.init(adapters), adapters)
    for k in adapters:
        np.testing.assert_allclose(plus[k].a, plain[k].a, rtol=1e-6)
        np.testing.assert_allclose(plus[k].b, 8.0 * plain[k].b, rtol=1e-6)
    with pytest.raises(ValueError, match="ratio"):
        lora.scale_b(0.0)
    with pytest.raises(TypeError, match="optax"):
        lora.train_step(_loss, lambda g: g)


def test_train_step_has_aux_and_donate(key):
    params = _stack_params()
    adapters = _init(key, params)
    tx = optax.adam(1e-2)

    def loss_aux(p, ad, x, y):
        loss = _loss(p, ad, x, y)
        return loss, {"loss_x2": 2 * loss}

    step = lora.train_step(loss_aux, tx, has_aux=True, donate=True)
    new, _, loss, aux = step(params, adapters, tx.init(adapters), *_data())
    assert float(aux["loss_x2"]) == pytest.approx(2 * float(loss))
    assert jax.tree.structure(new) == jax.tree.structure(adapters)


def test_flax_linen_model(key):
    nn = pytest.importorskip("flax.linen")

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.gelu(nn.Dense(16, name="up")(x))
            return nn.Dense(1, name="down")(x)

    model = MLP()
    x, y = _data()
    variables = model.init(jax.random.key(0), x)
    adapters = lora.init(key, variables, rank=2, alpha=4.0, targets=r"(up|down)/kernel",
                         rank_pattern={"down/kernel": 1})
    assert sorted(adapters) == ["params/down/kernel", "params/up/kernel"]
    apply = lora.wrap(model.apply)
    np.testing.assert_array_equal(apply(variables, adapters, x), model.apply(variables, x))

    def loss(v, ad, x, y):
        return jnp.mean((apply(v, ad, x) - y) ** 2)

    tx = optax.adam(1e-2)
    step, opt_state = lora.train_step(loss, tx), tx.init(adapters)
    first = None
    for _ in range(5):
        adapters, opt_state, value = step(variables, adapters, opt_state, x, y)
        first = float(value) if first is None else first
    assert float(value) < first
    merged, err = lora.merge(variables, adapters)
    np.testing.assert_allclose(model.apply(merged, x), apply(variables, adapters, x),
                               rtol=1e-5, atol=1e-6)
    assert float(err) < 1e-6


def test_flax_nnx_state(key):
    nnx = pytest.importorskip("flax.nnx")

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(SPEC["d_model"], 16, rngs=rngs)
            self.down = nnx.Linear(16, 1, rngs=rngs)

        def __call__(self, x):
            return self.down(jax.nn.gelu(self.up(x)))

    graphdef, state = nnx.split(MLP(nnx.Rngs(0)))
    adapters = lora.init(key, state, rank=2, alpha=2.0, targets="kernel.*",
                         rank_pattern={"down/kernel/value": 1})
    assert sorted(adapters) == ["down/kernel/value", "up/kernel/value"]

    def apply(st, x):
        return nnx.merge(graphdef, st)(x)

    x, _ = _data()
    adapters = jax.tree.map(lambda v: v + 0.05, adapters)
    out = jax.jit(lora.wrap(apply))(state, adapters, x)
    merged, _ = lora.merge(state, adapters)
    np.testing.assert_allclose(apply(merged, x), out, rtol=1e-5, atol=1e-6)
    assert not np.allclose(apply(state, x), out)


def test_train_step_grad_norm_and_full_fine_tune(key):
    params = _stack_params()
    adapters = _init(key, params)
    tx = optax.sgd(0.1)
    x, y = _data()
    step = lora.train_step(_loss, tx, grad_norm=True)
    new, _, loss, gnorm = step(params, adapters, tx.init(adapters), x, y)
    grads = jax.grad(_loss, argnums=1)(params, adapters, x, y)
    expected = np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64)))
                           for g in jax.tree.leaves(grads)))
    assert gnorm.dtype == jnp.float32 and gnorm.shape == ()
    np.testing.assert_allclose(float(gnorm), expected, rtol=1e-5)
    # Without the option the step's outputs are unchanged.
    plain = lora.train_step(_loss, tx)(params, adapters, tx.init(adapters), x, y)
    assert len(plain) == 3
    for u, v in zip(jax.tree.leaves(new), jax.tree.leaves(plain[0]), strict=True):
        np.testing.assert_array_equal(u, v)
    np.testing.assert_array_equal(loss, plain[2])

    # Every parameter as the trained argument, nothing frozen: a full fine-tune with the same step.
    def full_loss(frozen, p, x, y):
        return _loss(p, _init(key, params), x, y)

    full = lora.train_step(full_loss, tx, has_aux=False, jit=False, grad_norm=True)
    new_params, _, _, gfull = jax.jit(full)({}, params, tx.init(params), x, y)
    assert jax.tree.structure(new_params) == jax.tree.structure(params)
    assert float(gfull) > 0
    assert not np.array_equal(new_params["up"]["w"], params["up"]["w"])
