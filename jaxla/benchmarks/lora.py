"""``lora`` suite: adapted linear forward, LoRA vs full fine-tune vs Flax NNX training step, state size.

Rows:
* forward at the seed's shape (batch 4096, 768 → 3072, r = 8): plain ``jaxla.linear``, unmerged
  ``jaxla.lora.linear`` (factored, the default), ``lora.linear(..., formulation="merged")`` (W + ΔW
  formed per call) and ``jaxla.linear`` on merged weights; ``ratio_vs_plain`` is the target
  (unmerged ≤ 1.10, merged ≈ 1.00).
* one training step (forward, backward, Adam) on a residual MLP stack, same weights and data for all:
  full fine-tune, LoRA through ``jaxla.lora.linear``, LoRA through ``jaxla.lora.wrap`` (merged in the
  graph), and Flax NNX ``nnx.LoRALinear`` when flax is importable (split/merge inside ``jax.jit``, so
  only the compiled step is timed, as for jaxla). ``opt_state_bytes`` is the Optax state's size.
* DoRA's training step through ``jaxla.lora.linear`` (same a, b; magnitudes from W's column
  norms): ``ratio_vs_lora_step`` is its time over the LoRA step's (target ≤ 1.2).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxla
from jaxla import lora
from jaxla.benchmarks import harness, specs_lora


def _nbytes(tree) -> int:
    return int(sum(np.dtype(x.dtype).itemsize * np.size(x) for x in jax.tree.leaves(tree)))


def _forward_rows(spec: dict, iters: int) -> list[dict]:
    g = np.random.default_rng(0)
    batch, d_in, d_out, r = spec["batch"], spec["d_in"], spec["d_out"], spec["rank"]
    params = {"w": jnp.asarray(g.standard_normal((d_in, d_out)) / np.sqrt(d_in), jnp.float32),
              "b": jnp.asarray(g.standard_normal(d_out), jnp.float32)}
    adapter = lora.Adapter(jnp.asarray(g.standard_normal((r, d_in)) / np.sqrt(d_in), jnp.float32),
                           jnp.asarray(g.standard_normal((d_out, r)) * 0.1, jnp.float32), 16.0)
    x = jnp.asarray(g.standard_normal((batch, d_in)), jnp.float32)
    merged, _ = lora.merge({"p": params}, {"p/w": adapter})
    plain = harness.measure(jax.jit(jaxla.linear), params, x, iters=iters)
    unmerged = harness.measure(jax.jit(lora.linear), params, adapter, x, iters=iters)
    # formulation="merged": W + ΔW formed inside the call (one big matmul; rows >= d_in pay for it).
    folded = harness.measure(jax.jit(lambda p, a, x: lora.linear(p, a, x, formulation="merged")),
                             params, adapter, x, iters=iters)
    merged_t = harness.measure(jax.jit(jaxla.linear), merged["p"], x, iters=iters)
    # Both adapted variants against the float64 definition x·(W + scale·(b·a)ᵀ) + bias.
    w64 = np.asarray(params["w"], np.float64)
    delta64 = adapter.scale * (np.asarray(adapter.b, np.float64) @ np.asarray(adapter.a, np.float64)).T
    ref = np.asarray(x, np.float64) @ (w64 + delta64) + np.asarray(params["b"], np.float64)
    checks = {"lora unmerged": harness.check_close(unmerged["out"], ref, rtol=1e-4, atol=1e-4),
              "lora formulation=merged": harness.check_close(folded["out"], ref, rtol=1e-4, atol=1e-4),
              "lora merged": harness.check_close(merged_t["out"], ref, rtol=1e-4, atol=1e-4)}
    flops = harness.matmul_flops(batch, d_out, d_in)
    ceiling = harness.matmul_ceiling(jnp.float32, quick=iters < 5)
    shape = f"{batch}x{d_in}->{d_out} r={r}"
    rows = []
    variants = (("plain", plain), ("lora unmerged", unmerged), ("lora formulation=merged", folded),
                ("lora merged", merged_t))
    for name, res in variants:
        rows.append({
            "name": f"forward {name} {shape}",
            "ms": res["median_s"] * 1e3,
            "ratio_vs_plain": res["median_s"] / plain["median_s"],
            "gflops": flops / res["median_s"] / 1e9,
            "frac_of_matmul_ceiling": flops / res["median_s"] / ceiling,
            "temp_bytes": res["temp_bytes"],
            "compile_s": res["compile_s"],
            "max_abs_err": checks[name]["max_abs_err"] if name in checks else None,
            "ok": checks[name]["ok"] if name in checks else True,
        })
    return rows


def _stack(spec: dict):
    g = np.random.default_rng(1)
    d, f = spec["d_model"], spec["d_hidden"]

    def dense(i, o):
        return {"w": jnp.asarray(g.standard_normal((i, o)) / np.sqrt(i), jnp.float32),
                "b": jnp.zeros((o,), jnp.float32)}

    params = {"layers": [{"up": dense(d, f), "down": dense(f, d)} for _ in range(spec["layers"])]}
    x = jnp.asarray(g.standard_normal((spec["batch"], d)), jnp.float32)
    y = jnp.asarray(np.tanh(g.standard_normal((spec["batch"], d))), jnp.float32)
    return params, x, y


def _apply(params, x, adapters=None):
    h = x
    for i, layer in enumerate(params["layers"]):
        if adapters is None:
            z = jax.nn.gelu(jaxla.linear(layer["up"], h))
            h = h + jaxla.linear(layer["down"], z)
        else:
            z = jax.nn.gelu(lora.linear(layer["up"], adapters[f"layers/{i}/up/w"], h))
            h = h + lora.linear(layer["down"], adapters[f"layers/{i}/down/w"], z)
    return h


def _mse(out, y):
    return jnp.mean((out - y) ** 2)


def _nnx_step(spec, params, tx):
    """The same model with ``nnx.LoRALinear`` layers and the same weights, trained on LoRAParam."""
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, layer, rngs):
            d, f = layer["up"]["w"].shape
            self.up = nnx.LoRALinear(d, f, lora_rank=spec["rank"], rngs=rngs)
            self.down = nnx.LoRALinear(f, d, lora_rank=spec["rank"], rngs=rngs)
            for lin, p in ((self.up, layer["up"]), (self.down, layer["down"])):
                lin.kernel.value, lin.bias.value = p["w"], p["b"]

        def __call__(self, h):
            return h + self.down(jax.nn.gelu(self.up(h)))

    class Stack(nnx.Module):
        def __init__(self, rngs):
            self.blocks = nnx.List([Block(layer, rngs) for layer in params["layers"]]) if hasattr(
                nnx, "List") else [Block(layer, rngs) for layer in params["layers"]]

        def __call__(self, h):
            for block in self.blocks:
                h = block(h)
            return h

    graphdef, trainable, frozen = nnx.split(Stack(nnx.Rngs(0)), nnx.LoRAParam, ...)

    def step(trainable, opt_state, x, y):
        def loss_fn(tr):
            return _mse(nnx.merge(graphdef, tr, frozen)(x), y)

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = tx.update(grads, opt_state, trainable)
            trainable = optax.apply_updates(trainable, updates)
        return trainable, opt_state, loss

    return jax.jit(step), trainable


def _train_rows(spec: dict, iters: int) -> list[dict]:
    params, x, y = _stack(spec)
    tx = optax.adam(1e-3)
    targets = ["up/w", "down/w"]
    adapters = lora.init(jax.random.key(0), params, rank=spec["rank"], alpha=spec["alpha"],
                         targets=targets)
    # Nonzero b so the low-rank branch is real work in every variant.
    adapters = {k: lora.Adapter(ad.a, ad.b + 0.01, ad.alpha) for k, ad in adapters.items()}
    # DoRA on the same a, b: magnitudes from W's column norms (the adapter then differs from W).
    dora = lora.init(jax.random.key(0), params, rank=spec["rank"], alpha=spec["alpha"],
                     targets=targets, dora=True)
    dora = {k: dataclasses.replace(ad, a=adapters[k].a, b=adapters[k].b) for k, ad in dora.items()}

    def full_step(p, opt_state, x, y):
        loss, grads = jax.value_and_grad(lambda q: _mse(_apply(q, x), y))(p)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = tx.update(grads, opt_state, p)
            p = optax.apply_updates(p, updates)
        return p, opt_state, loss

    lora_step = lora.train_step(lambda p, ad, x, y: _mse(_apply(p, x, ad), y), tx)
    wrapped = lora.wrap(_apply)
    wrap_step = lora.train_step(lambda p, ad, x, y: _mse(wrapped(p, ad, x), y), tx)
    full_state, lora_state = tx.init(params), tx.init(adapters)
    results = {
        "full fine-tune": (harness.measure(jax.jit(full_step), params, full_state, x, y,
                                           iters=iters), _nbytes(full_state)),
        "lora (lora.linear)": (harness.measure(lora_step, params, adapters, lora_state, x, y,
                                               iters=iters), _nbytes(lora_state)),
        "lora (lora.wrap)": (harness.measure(wrap_step, params, adapters, lora_state, x, y,
                                             iters=iters), _nbytes(lora_state)),
    }
    dora_state = tx.init(dora)
    results["dora (lora.linear)"] = (harness.measure(lora_step, params, dora, dora_state, x, y,
                                                     iters=iters), _nbytes(dora_state))
    try:
        step, trainable = _nnx_step(spec, params, tx)
        nnx_state = tx.init(trainable)
        results["flax nnx.LoRALinear"] = (
            harness.measure(step, trainable, nnx_state, x, y, iters=iters), _nbytes(nnx_state))
    except ImportError:
        pass
    base = results["flax nnx.LoRALinear" if "flax nnx.LoRALinear" in results
                   else "full fine-tune"][0]["median_s"]
    count = lora.count_params(params, adapters)
    dora_count = lora.count_params(params, dora)
    shape = (f"L={spec['layers']} {spec['d_model']}->{spec['d_hidden']} B={spec['batch']} "
             f"r={spec['rank']}")
    rows = []
    for name, (res, state_bytes) in results.items():
        loss = float(res["out"][-1])
        rows.append({
            "name": f"train step {name} {shape}",
            "ms": res["median_s"] * 1e3,
            "ratio_vs_nnx": res["median_s"] / base if "flax nnx.LoRALinear" in results else None,
            # DoRA's target: <= 1.2x the LoRA step through the same lora.linear model.
            "ratio_vs_lora_step": (res["median_s"] / results["lora (lora.linear)"][0]["median_s"]
                                   if name.startswith(("lora (lora.linear)", "dora")) else None),
            "opt_state_bytes": state_bytes,
            "trainable_params": (count.frozen if name == "full fine-tune" else dora_count.trainable
                                 if name.startswith("dora") else count.trainable),
            "compile_s": res["compile_s"],
            "loss": loss,
            "ok": bool(np.isfinite(loss)),
        })
    return rows


def run(*, quick: bool) -> list[dict]:
    iters = 3 if quick else 7
    fwd = specs_lora.QUICK if quick else specs_lora.SEED
    stack = specs_lora.MLP_STACK_QUICK if quick else specs_lora.MLP_STACK
    return _forward_rows(fwd, iters) + _train_rows(stack, iters)


if __name__ == "__main__":
    raise SystemExit(harness.main("lora", run))
