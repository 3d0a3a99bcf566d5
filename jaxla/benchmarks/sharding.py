"""``sharding`` suite: attention and models across devices, from XLA's per-device compiled programs.

Three parts, on 8 devices (on a CPU host the suite runs itself in a child process with 8 simulated
devices, ``--xla_force_host_platform_device_count=8``):

- *partitioned kernels*: XLA's cost analysis (flops, bytes accessed) of the per-device program of
  ``dot_product_attention(implementation="cpu")`` (forward, and forward + backward) with query/key/
  value sharded over a 4 × 2 (batch × heads) mesh, against the same call on replicated inputs
  (every device computes everything: what XLA does with an opaque custom call). Expected ratio 1/P,
  P = 8. Also a tiny Llama LoRA training step laid out by ``jaxla.models.shard`` against the same
  step on one device.
- *ring memory*: the compiled per-device memory (arguments, temporaries) of causal
  ``ring_attention`` forward + backward, zigzag layout, "chunked" blocks (``--quick``: the default
  backend's, the compiled kernel on CPU), at P = 8 as T grows:
  expected O(T / P); the single-device ``dot_product_attention`` ("chunked") of the whole sequence
  beside it.
- *ring step time*: one causal ring forward (P block steps per device with P - 1 rotations) against
  one local causal block of T / P on one device, medians with compilation timed apart. On simulated
  devices all 8 "devices" share the host's cores, so this measures the overhead of the ring's
  loop, ppermutes and merges, not a speed-up: simulated devices cannot show one.

Each ring row checks its output against the gathered single-device attention (``ok``).

Dimension legend: B batch, T global sequence, P devices, N heads, H head dim.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxla.benchmarks import harness

DEVICES = 8
_FLAG = f"--xla_force_host_platform_device_count={DEVICES}"
NOTE = ("simulated CPU devices share the host's cores: ratios of per-device flops, bytes and memory "
        "are exact, times show overheads, not speed-ups")


def _cost(compiled) -> tuple[float, float]:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older jax: one dict per program
        cost = cost[0]
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def _partitioned_rows(quick: bool) -> list[dict]:
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxla

    b, t, n, k, h = (8, 128, 4, 2, 32) if quick else (8, 1024, 8, 4, 64)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
    kv = jnp.asarray(rng.standard_normal((b, t, k, h)), jnp.float32)
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)

    def attend(q, k, v):
        return jaxla.dot_product_attention(q, k, v, is_causal=True, implementation="cpu")

    def loss(q, k, v):
        return jnp.sum(attend(q, k, v))

    rows = []
    kinds = (("forward", attend), ("forward+backward", jax.grad(loss, argnums=(0, 1, 2))))
    with jax.set_mesh(mesh):
        for what, fn in kinds[:1] if quick else kinds:
            costs, outs = {}, {}
            for layout, spec in (("sharded", P("data", None, "model", None)), ("gathered", P())):
                xs = [jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, kv, kv)]
                compiled = jax.jit(fn).lower(*xs).compile()
                costs[layout] = _cost(compiled)
                outs[layout] = compiled(*xs)
            (fs, bs), (fg, bg) = costs["sharded"], costs["gathered"]
            err = max(float(jnp.max(jnp.abs(a - c))) for a, c in zip(
                jax.tree.leaves(outs["sharded"]), jax.tree.leaves(outs["gathered"]), strict=True))
            rows.append({
                "name": f"cpu kernel {what} B{b} T{t} N{n} K{k} H{h}, 4x2 mesh vs replicated",
                "flops_sharded": fs, "flops_gathered": fg,
                "flops_ratio": fs / fg if fg else None,
                "bytes_sharded": bs, "bytes_gathered": bg, "bytes_ratio": bs / bg if bg else None,
                "expected_ratio": 1 / DEVICES, "max_abs_err": err, "ok": err < 1e-4,
            })
    if not quick:  # two compiles of a training step: seconds even for a tiny model
        rows.append(_model_row())
    return rows


def _model_row() -> dict:
    """A tiny Llama LoRA step: per-device cost on a 4 × 2 mesh (models.shard) vs one device."""
    import optax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxla import lora, models

    d, f, layers, v = 256, 1024, 4, 1024
    c = models.LlamaConfig(vocab_size=v, hidden_size=d, intermediate_size=f, num_layers=layers,
                           num_heads=4, num_kv_heads=2, head_dim=d // 4)
    rng = np.random.default_rng(1)

    def w(*shape):
        return jnp.asarray(rng.standard_normal(shape) / np.sqrt(shape[-2]), jnp.float32)

    nh, kh = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    ones = jnp.ones((layers, d), jnp.float32)
    params = {"embed": {"table": w(v, d)}, "norm": {"scale": jnp.ones((d,), jnp.float32)},
              "lm_head": {"w": w(d, v)},
              "layers": {"attn_norm": {"scale": ones}, "mlp_norm": {"scale": ones},
                         "attn": {"q": {"w": w(layers, d, nh)}, "k": {"w": w(layers, d, kh)},
                                  "v": {"w": w(layers, d, kh)}, "o": {"w": w(layers, nh, d)}},
                         "mlp": {"gate": {"w": w(layers, d, f)}, "up": {"w": w(layers, d, f)},
                                 "down": {"w": w(layers, f, d)}}}}
    ids = jnp.asarray(rng.integers(0, v, size=(8, 257)), jnp.int32)
    adapters = lora.init(jax.random.key(0), params, rank=8, alpha=16.0,
                         targets=["attn/(q|k|v|o)/w", "mlp/(gate|up|down)/w"], stack_axes=1)
    optimizer = optax.sgd(0.1)

    def loss_fn(p, a, ids):
        logits = models.forward(c, p, ids[:, :-1], adapters=a)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]))

    step = lora.train_step(loss_fn, optimizer, jit=False)
    state = optimizer.init(adapters)
    mesh = Mesh(np.asarray(jax.devices()[:DEVICES]).reshape(4, 2), ("data", "model"))
    single = jax.jit(step).lower(params, adapters, state, ids).compile()
    placed = models.shard(params, mesh, config=c)
    sharded_adapters = jax.device_put(adapters, models.param_shardings(c, adapters, mesh))
    sharded_ids = jax.device_put(ids, NamedSharding(mesh, P("data")))
    sharded = jax.jit(step).lower(placed, sharded_adapters, state, sharded_ids).compile()
    (fs, bs), (f1, b1) = _cost(sharded), _cost(single)
    loss_s = float(sharded(placed, sharded_adapters, state, sharded_ids)[2])
    loss_1 = float(single(params, adapters, state, ids)[2])
    args_s = sharded.memory_analysis().argument_size_in_bytes
    args_1 = single.memory_analysis().argument_size_in_bytes
    return {
        "name": f"llama LoRA step D{d} F{f} L{layers} V{v} B8, models.shard 4x2 vs 1 device",
        "flops_sharded": fs, "flops_gathered": f1, "flops_ratio": fs / f1 if f1 else None,
        "bytes_sharded": bs, "bytes_gathered": b1, "bytes_ratio": bs / b1 if b1 else None,
        "arg_bytes_ratio": args_s / args_1, "expected_ratio": 1 / DEVICES,
        "max_abs_err": abs(loss_s - loss_1), "ok": abs(loss_s - loss_1) < 1e-4,
    }


def _ring_fn(mesh, *, blocks, implementation):
    from jax.sharding import PartitionSpec as P

    import jaxla

    spec = P(None, "sp")

    def local(q, k, v):
        return jaxla.ring_attention(q, k, v, axis_name="sp", is_causal=True, layout="zigzag",
                                    implementation=implementation, block_sizes=blocks)

    return jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=spec)


def _ring_rows(quick: bool) -> list[dict]:
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxla
    from jaxla.attention import to_ring_layout

    n, h = (2, 32) if quick else (4, 64)
    lengths = (128,) if quick else (1024, 2048, 4096, 8192)
    blocks = jaxla.ChunkedBlockSizes(128, 128)
    mesh = Mesh(np.asarray(jax.devices()[:DEVICES]), ("sp",))
    sharding = NamedSharding(mesh, P(None, "sp"))
    # "chunked" blocks: all their memory is XLA's, so memory_analysis sees it. --quick: the
    # compiled kernel's blocks (None on CPU), much faster to compile.
    implementation = None if quick else "chunked"
    blocks = None if quick else blocks
    ring = _ring_fn(mesh, blocks=blocks, implementation=implementation)
    rows = []
    for t in lengths:
        rng = np.random.default_rng(t)
        q, k, v = (jnp.asarray(rng.standard_normal((1, t, n, h)), jnp.float32) for _ in range(3))
        zq, zk, zv = (jax.device_put(to_ring_layout(x, ring_size=DEVICES), sharding) for x in (q, k, v))

        def grads(q, k, v, fn):
            return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v)), argnums=(0, 1, 2))(q, k, v)

        ring_mem = jax.jit(lambda q, k, v: grads(q, k, v, ring)).lower(zq, zk, zv).compile() \
            .memory_analysis()

        def single_fn(q, k, v):
            return jaxla.dot_product_attention(q, k, v, is_causal=True,
                                               implementation=implementation, block_sizes=blocks)

        one_mem = None if quick else jax.jit(lambda q, k, v: grads(q, k, v, single_fn)).lower(
            q, k, v).compile().memory_analysis()
        # Timing: one ring forward (P block steps per device) vs one local causal block of T/P.
        ring_t = harness.measure(jax.jit(ring), zq, zk, zv, iters=3 if quick else 5)
        tl = t // DEVICES
        block_t = harness.measure(jax.jit(single_fn), q[:, :tl], k[:, :tl], v[:, :tl],
                                  iters=3 if quick else 5)
        ref = single_fn(q, k, v)
        out = jaxla.attention.from_ring_layout(ring_t["out"], ring_size=DEVICES)
        err = float(jnp.max(jnp.abs(out - ref)))
        rows.append({
            "name": f"ring causal zigzag fwd+bwd T{t} P{DEVICES} N{n} H{h} "
                    f"{implementation or 'default'} blocks",
            "ring_arg_KB_per_device": ring_mem.argument_size_in_bytes / 1024,
            "ring_temp_KB_per_device": ring_mem.temp_size_in_bytes / 1024,
            "single_arg_KB": None if one_mem is None else one_mem.argument_size_in_bytes / 1024,
            "single_temp_KB": None if one_mem is None else one_mem.temp_size_in_bytes / 1024,
            "ring_fwd_ms": ring_t["median_s"] * 1e3, "ring_compile_s": ring_t["compile_s"],
            "local_block_fwd_ms": block_t["median_s"] * 1e3,
            "ring_over_block": ring_t["median_s"] / block_t["median_s"],
            "max_abs_err": err, "ok": err < 1e-4,
        })
    return rows


def rows(*, quick: bool) -> list[dict]:
    """Every row, on this process's devices (which must be at least 8)."""
    out = _partitioned_rows(quick) + _ring_rows(quick)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    for r in out:
        r["load_avg_1min"] = load
    if jax.default_backend() == "cpu":
        out.append({"name": f"note: {NOTE}"})
    return out


def run(*, quick: bool) -> list[dict]:
    if len(jax.devices()) >= DEVICES:
        return rows(quick=quick)
    if jax.default_backend() != "cpu":
        return [{"name": f"sharding: needs {DEVICES} devices, {len(jax.devices())} "
                         f"{jax.default_backend()} device(s) here", "ok": None}]
    # Simulated devices must be configured before jax starts: measure in a child process.
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + _FLAG).strip()
    cmd = [sys.executable, "-c", "import json, sys; from jaxla.benchmarks import sharding; "
           "print(json.dumps(sharding.rows(quick=sys.argv[1] == '1')))", "1" if quick else "0"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"the 8-device child process failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    raise SystemExit(harness.main("sharding", run))
