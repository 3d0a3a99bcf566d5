"""``qwix_compare`` suite: qwix's QLoRA beside jaxla's on SmolLM2-135M-Instruct (issue 14).

qwix (Google's JAX quantization library) quantizes Flax modules by intercepting the
``dot_general``/``einsum`` calls of the modules its rules match; its QLoRA is
``qwix.LoraProvider(weight_qtype=..., tile_size=...)`` applied with ``qwix.apply_lora_to_model``
(frozen quantized kernel + trainable ``nnx.LoRAParam`` ``lora_a``/``lora_b``). jaxla's models are
plain functions, so this suite ports SmolLM2 to a small Flax NNX module of its own
(:func:`flax_decoder`: embedding, 30 pre-norm layers of RMSNorm, RoPE, grouped-query attention
9/3 heads, SwiGLU MLP, tied head), copies jaxla's f32 weights into it and checks, in the same run,
that its logits equal ``jaxla.models.forward`` on a prompt.

Both libraries then train the same thing: the same base weights, the q, k, v, o, gate, up and
down kernels quantized and adapted (rank 8, alpha 16), the same initial adapters (jaxla's, copied
into qwix's ``lora_a``/``lora_b``), Adam 1e-3 on the adapters only, batch 8 x 64 tokens (the step
of ``jaxla.benchmarks.quant._step_setup``), the plain (non-rematerialised) step in both and
jaxla's lean step (layers rematerialised, head in chunks) as a separate row.

* Quantization. NF4: blocks of 64 along d_in, one absmax scale per block, nearest value of the
  QLoRA table, in both (qwix ``weight_qtype="nf4", tile_size=64``; jaxla
  ``models.quantize(format="nf4")``, block 64): the same algorithm, checked kernel by kernel (the
  dequantized kernels agree). int4: qwix's asymmetric int4 (``jnp.int4``,
  ``weight_calibration_method="minmax"``: an integer zero point per tile of 64) vs jaxla's
  ``"int4"`` (a float minimum and step per block of 64): similar, not equal.
* Storage. jaxla packs two 4-bit codes per byte; qwix keeps ``uint4``/``int4`` arrays, which
  XLA:CPU stores one byte per code (``on_device_size_in_bytes``): the "base MiB" column is what
  each frozen base occupies on the device (embedding and norms included, f32 in both).
* Step time: medians of rounds interleaved in one process (each round runs every variant's step
  once, training on), compile time apart; the step-0 loss of each pair and its difference, and the
  loss after the steps. The Flax port loops over its 30 layers in Python (qwix intercepts each
  layer's own modules), so its compiled step is unrolled where jaxla's scans the stacked layers.
* Peak memory: each library's nf4 QLoRA in a fresh child process (``--part memory``): runtime
  floor, RSS after setup (f32 load, quantization, the f32 copy dropped), XLA's temp of the
  compiled step, peak VmHWM after compiling and running 3 steps.

``python -m jaxla.benchmarks.qwix_compare [--quick] [--json FILE] [--part all|time|memory]``
(``jaxla bench qwix_compare`` runs all parts). Without flax and qwix (``pip install flax qwix``,
or ``pip install 'jaxla[compare]'``) it prints one line saying so and only checks, on a small
kernel, that jaxla's NF4 codes equal a NumPy transcription of the algorithm qwix uses. ``--quick``
runs a tiny random model, the nf4 pair only, no child processes.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxla import models, quant
from jaxla._host_memory import release_freed_memory
from jaxla.benchmarks import harness, specs_models
from jaxla.benchmarks import quant as quant_bench

INSTALL = "pip install flax qwix"
BLOCK = 64  # NF4/int4 block (qwix tile) size along d_in, both libraries
# qwix module paths ("/"-joined NNX paths of flax_decoder) of the kernels jaxla adapts (KERNELS).
QWIX_TARGETS = r"layers/\d+/(attn/(q|k|v|o)|mlp/(gate|up|down))"
# format -> (qwix weight_qtype, qwix weight_calibration_method)
QWIX_FORMATS = {"nf4": ("nf4", "absmax"), "int4": (jnp.int4, "minmax")}
PARTS = ("all", "time", "memory")


def missing() -> str | None:
    """The line to print when flax (NNX) or qwix cannot be imported, else None."""
    try:
        import qwix  # noqa: F401
        from flax import nnx  # noqa: F401
    except ImportError as e:
        return (f"qwix_compare: needs flax and qwix ({e}); install them with `{INSTALL}` "
                "(or pip install 'jaxla[compare]'). Skipping the qwix side.")
    return None


# ----------------------------------------------------------------------------------------------
# The Flax NNX port of the Llama decoder (SmolLM2's variant).


def _check_config(config: models.LlamaConfig) -> None:
    unsupported = {"tie_word_embeddings": not config.tie_word_embeddings,
                   "qkv_bias": config.qkv_bias, "o_bias": config.o_bias,
                   "mlp_bias": config.mlp_bias, "sliding_window": config.sliding_window is not None,
                   "rope_scaling": config.rope_scaling is not None}
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"flax_decoder ports SmolLM2's Llama variant (tied embeddings, no biases, "
                         f"no sliding window or RoPE scaling); this config differs in {bad}")


@functools.cache
def _nnx_classes() -> Any:
    """The NNX module classes (built once, on first use: flax is imported only here)."""
    from flax import nnx

    def fixed(value):  # an initializer returning the given weights (no random init to discard)
        return lambda key, shape, dtype: value

    def linear(w, rngs):
        return nnx.Linear(w.shape[0], w.shape[1], use_bias=False, kernel_init=fixed(w), rngs=rngs)

    class RMSNorm(nnx.Module):
        def __init__(self, scale, eps):
            self.scale = nnx.Param(scale)
            self.eps = eps

        def __call__(self, x):
            xf = x.astype(jnp.float32)
            y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
            return (y * self.scale[...]).astype(x.dtype)

    class Attention(nnx.Module):
        def __init__(self, config, w, rngs):
            self.q, self.k = linear(w["q"]["w"], rngs), linear(w["k"]["w"], rngs)
            self.v, self.o = linear(w["v"]["w"], rngs), linear(w["o"]["w"], rngs)
            self.heads, self.kv_heads = config.num_heads, config.num_kv_heads
            self.head_dim, self.theta = config.head_dim, float(config.rope_theta)

        def rope(self, x):  # x (B, T, heads, H): rotate-half layout, angles in f32
            half = self.head_dim // 2
            freqs = jnp.asarray(self.theta, jnp.float32) ** -(
                jnp.arange(0, self.head_dim, 2, dtype=jnp.float32) / self.head_dim)
            angles = jnp.arange(x.shape[1], dtype=jnp.float32)[:, None, None] * freqs  # (T, 1, H/2)
            cos, sin = jnp.cos(angles), jnp.sin(angles)
            first, second = x[..., :half], x[..., half:]
            return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], -1)

        def __call__(self, h):
            b, t, _ = h.shape
            kv, group, hd = self.kv_heads, self.heads // self.kv_heads, self.head_dim
            # query head n uses kv head n // group (Hugging Face's repeat_kv, jaxla's GQA)
            q = self.rope(self.q(h).reshape(b, t, self.heads, hd)).reshape(b, t, kv, group, hd)
            k = self.rope(self.k(h).reshape(b, t, kv, hd))
            v = self.v(h).reshape(b, t, kv, hd)
            scores = jnp.einsum("btkgh,bskh->bkgts", q, k,
                                preferred_element_type=jnp.float32) / np.sqrt(hd)
            causal = jnp.tril(jnp.ones((t, t), bool))  # the diagonal: no row is empty
            probs = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
            out = jnp.einsum("bkgts,bskh->btkgh", probs, v, preferred_element_type=jnp.float32)
            return self.o(out.reshape(b, t, self.heads * hd))

    class MLP(nnx.Module):
        def __init__(self, w, rngs):
            self.gate, self.up = linear(w["gate"]["w"], rngs), linear(w["up"]["w"], rngs)
            self.down = linear(w["down"]["w"], rngs)

        def __call__(self, h):
            return self.down(jax.nn.silu(self.gate(h)) * self.up(h))

    class Layer(nnx.Module):
        def __init__(self, config, w, rngs):
            self.attn_norm = RMSNorm(w["attn_norm"]["scale"], config.rms_norm_eps)
            self.attn = Attention(config, w["attn"], rngs)
            self.mlp_norm = RMSNorm(w["mlp_norm"]["scale"], config.rms_norm_eps)
            self.mlp = MLP(w["mlp"], rngs)

        def __call__(self, x):
            x = x + self.attn(self.attn_norm(x))
            return x + self.mlp(self.mlp_norm(x))

    class Embed(nnx.Module):
        def __init__(self, table):
            self.table = nnx.Param(table)

        def __call__(self, ids):
            return jnp.take(self.table[...], ids, axis=0)

        def attend(self, h):  # the tied head: (B, T, D) -> (B, T, V) f32
            return jnp.einsum("btd,vd->btv", h, self.table[...],
                              preferred_element_type=jnp.float32)

    class Decoder(nnx.Module):
        """SmolLM2 in NNX: ``Decoder(ids (B, T) int32) -> logits (B, T, V) f32``."""

        def __init__(self, config, params, rngs):
            self.embed = Embed(params["embed"]["table"])
            self.layers = nnx.List([
                Layer(config, jax.tree.map(lambda a, i=i: a[i], params["layers"]), rngs)
                for i in range(config.num_layers)])
            self.norm = RMSNorm(params["norm"]["scale"], config.rms_norm_eps)

        def __call__(self, ids):
            x = self.embed(ids)
            for layer in self.layers:
                x = layer(x)
            return self.embed.attend(self.norm(x))

    return Decoder


def flax_decoder(config: models.LlamaConfig, params: Any) -> Any:
    """An NNX module computing ``jaxla.models.forward(config, params, ids)`` for SmolLM2's variant
    of the Llama family (tied embeddings, no biases), holding per-layer copies of ``params``'
    stacked f32 weights. Dimension legend: B batch, T tokens, V vocabulary.

    Raises:
      ValueError: a config feature the port does not have (biases, untied head, sliding window,
        RoPE scaling), named.
    """
    from flax import nnx

    _check_config(config)
    return _nnx_classes()(config, params, nnx.Rngs(0))


# ----------------------------------------------------------------------------------------------
# The two QLoRA setups.


class Variant(NamedTuple):
    """One compiled training setup: ``step(frozen, adapters, opt_state, ids) -> (adapters,
    opt_state, loss)`` with its arguments."""

    step: Any
    frozen: Any
    adapters: Any
    opt_state: Any
    ids: jax.Array


def _shape(quick: bool) -> tuple[int, int, int]:
    return quant_bench.QUICK_STEP if quick else (quant_bench.STEP_BATCH, quant_bench.STEP_TOKENS,
                                                 quant_bench.STEP_RANK)


def jaxla_variant(dense: models.Model, fmt: str, shape, *, lean: bool = False) -> Variant:
    """jaxla's QLoRA step (``quant._step_setup``) on ``dense`` quantized to ``fmt`` (block 64)."""
    base = models.quantize(dense, format=fmt, block_size=BLOCK)
    step, adapters, state, ids = quant_bench._step_setup(dense, base.params, shape, lean=lean)
    return Variant(step, base.params, adapters, state, ids)


def qwix_model(decoder: Any, fmt: str, rank: int) -> tuple[Any, Any]:
    """qwix's QLoRA of ``decoder``: ``(model, provider)``, the targeted kernels quantized to
    ``fmt`` in tiles of 64 along d_in with LoRA rank ``rank`` and alpha ``2 · rank``."""
    import qwix
    from flax import nnx

    qtype, calibration = QWIX_FORMATS[fmt]
    provider = qwix.LoraProvider(module_path=QWIX_TARGETS, rank=rank, alpha=2.0 * rank,
                                 weight_qtype=qtype, tile_size=BLOCK,
                                 weight_calibration_method=calibration)
    model = qwix.apply_lora_to_model(decoder, provider, jnp.zeros((1, 8), jnp.int32),
                                     rngs=nnx.Rngs(0))
    if provider.get_unused_rules():
        raise RuntimeError(f"qwix matched no module with {QWIX_TARGETS!r}")
    return model, provider


def _modules(model: Any, layer: int, kernel: str) -> Any:
    """The NNX Linear of ``kernel`` (a KERNELS path such as ``"layers/attn/q/w"``) in ``layer``."""
    group, name = kernel.split("/")[1:3]
    return getattr(getattr(model.layers[layer], group), name)


def copy_adapters(model: Any, adapters: dict, num_layers: int) -> None:
    """Sets qwix's ``lora_a`` (I, r) / ``lora_b`` (r, O) of every adapted kernel to jaxla's
    adapter ``a`` (L, r, I) / ``b`` (L, O, r) (same scale alpha / r in both libraries)."""
    for path, ad in adapters.items():
        for i in range(num_layers):
            lin = _modules(model, i, path)
            want_a, want_b = ad.a[i].T, ad.b[i].T
            if lin.kernel_lora_a.shape != want_a.shape or lin.kernel_lora_b.shape != want_b.shape:
                raise ValueError(f"{path} layer {i}: qwix lora_a/b {lin.kernel_lora_a.shape}/"
                                 f"{lin.kernel_lora_b.shape}, jaxla a.T/b.T {want_a.shape}/"
                                 f"{want_b.shape}")
            lin.kernel_lora_a.value, lin.kernel_lora_b.value = want_a, want_b


def _qwix_step(graphdef: Any, opt: optax.GradientTransformation) -> Any:
    """The plain QLoRA step on qwix's split model (loss as in ``quant._step_setup``)."""
    from flax import nnx

    def loss_fn(lora_params, rest, ids):
        logits = nnx.merge(graphdef, lora_params, rest)(ids[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    def step(rest, lora_params, opt_state, ids):
        loss, grads = jax.value_and_grad(loss_fn)(lora_params, rest, ids)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = opt.update(grads, opt_state, lora_params)
            lora_params = optax.apply_updates(lora_params, updates)
        return lora_params, opt_state, loss

    return jax.jit(step)


def qwix_variant(model: Any, like: Variant) -> Variant:
    """qwix's step on ``model`` (adapters already copied), with ``like``'s batch."""
    from flax import nnx

    graphdef, lora_params, rest = nnx.split(model, nnx.LoRAParam, ...)
    opt = optax.adam(1e-3)
    return Variant(_qwix_step(graphdef, opt), rest, lora_params, opt.init(lora_params), like.ids)


def _device_bytes(tree: Any) -> int:
    """Bytes the arrays of ``tree`` occupy on their device (uint4 takes a byte per code on CPU)."""
    leaves = [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)]
    return sum(s.data.on_device_size_in_bytes() for x in leaves for s in x.addressable_shards)


# ----------------------------------------------------------------------------------------------
# Checks.


def numpy_nf4(w: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """qwix's NF4 of a kernel (I, O), transcribed in NumPy f32: per block of ``block`` rows along
    I the absmax scale, ``w / scale`` to the nearest table value (first on ties), times scale."""
    if w.ndim != 2 or w.shape[0] % block:
        raise ValueError(f"numpy_nf4 needs a kernel (I, O) with I a multiple of block={block}, "
                         f"got shape {w.shape}")
    i, o = w.shape
    blocks = w.astype(np.float32).reshape(i // block, block, o)
    scale = np.abs(blocks).max(axis=1, keepdims=True)
    scale = np.where(scale < np.sqrt(np.finfo(np.float32).tiny), np.float32(1), scale)
    codes = np.abs((blocks / scale)[..., None] - quant.NF4_TABLE).argmin(axis=-1)
    return (quant.NF4_TABLE[codes] * scale).reshape(i, o)


def _nf4_reference_row() -> dict:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((2 * BLOCK, 96)) * 0.05).astype(np.float32)
    got = np.asarray(quant.dequantize(quant.quantize(jnp.asarray(w), format="nf4",
                                                     block_size=BLOCK)))
    err = float(np.max(np.abs(got - numpy_nf4(w))))
    return {"name": f"jaxla nf4 vs qwix's NF4 algorithm (NumPy transcription), {w.shape} kernel",
            "max_abs_diff": err, "ok": err == 0.0}


def _forward_row(config, dense_params, decoder, quick: bool) -> dict:
    prompt = quant_bench._prompt(config, quick)
    want = jax.jit(lambda p, ids: models.forward(config, p, ids))(dense_params, prompt)
    from flax import nnx

    graphdef, state = nnx.split(decoder)
    got = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids))(state, prompt)
    scale = float(jnp.max(jnp.abs(want)))
    check = harness.check_close(got, want, rtol=0.0, atol=2e-5 * scale)
    return {"name": f"flax port vs jaxla models.forward, f32 logits, prompt {tuple(prompt.shape)}",
            "max_abs_err": check["max_abs_err"], "max_abs_logit": scale,
            "tol": 2e-5 * scale, "ok": check["ok"]}


def _kernel_rows(fmt: str, dense_params, jaxla_base, model, num_layers: int) -> list[dict]:
    """Each library's dequantized kernels against the f32 ones and against each other."""
    diff, sq = 0.0, {"qwix": 0.0, "jaxla": 0.0}
    total = 0.0
    import qwix

    for path in quant_bench.KERNELS:
        group, name = path.split("/")[1:3]
        w = dense_params["layers"][group][name]["w"]                         # (L, I, O)
        ours = quant.dequantize(jaxla_base["layers"][group][name]["w"])
        theirs = jnp.stack([qwix.dequantize(_modules(model, i, path).kernel.array)
                            for i in range(num_layers)])
        diff = max(diff, float(jnp.max(jnp.abs(ours - theirs))))
        sq["jaxla"] += float(jnp.sum((ours - w) ** 2))
        sq["qwix"] += float(jnp.sum((theirs - w) ** 2))
        total += float(jnp.sum(w * w))
    rel = {k: float(np.sqrt(v / total)) for k, v in sq.items()}
    same = fmt == "nf4"
    return [{"name": f"frozen kernels {fmt}: qwix vs jaxla dequantized"
                     + (" (same algorithm: equal)" if same else " (different zero points)"),
             "max_abs_diff": diff, "rms_rel_err_qwix": rel["qwix"], "rms_rel_err_jaxla": rel["jaxla"],
             "ok": (diff <= 1e-6 if same else True) and all(v < 0.2 for v in rel.values())}]


# ----------------------------------------------------------------------------------------------
# Timing: every variant's step, interleaved.


def _compile(v: Variant) -> tuple[Any, float]:
    t0 = time.perf_counter()
    compiled = v.step.lower(v.frozen, v.adapters, v.opt_state, v.ids).compile()
    return compiled, time.perf_counter() - t0


def _train_interleaved(variants: dict[str, Variant], rounds: int) -> dict[str, dict]:
    """Compiles each step, runs it once (step 0, untimed), then ``rounds`` rounds of one timed
    step per variant in turn, training on. Median seconds, compile seconds, step-0 and last loss."""
    compiled, out = {}, {}
    for name, v in variants.items():
        compiled[name], compile_s = _compile(v)
        adapters, state, loss = jax.block_until_ready(
            compiled[name](v.frozen, v.adapters, v.opt_state, v.ids))
        variants[name] = v._replace(adapters=adapters, opt_state=state)
        out[name] = {"compile_s": compile_s, "loss0": float(loss), "times": []}
    for _ in range(rounds):
        for name, v in variants.items():
            t0 = time.perf_counter()
            adapters, state, loss = jax.block_until_ready(
                compiled[name](v.frozen, v.adapters, v.opt_state, v.ids))
            out[name]["times"].append(time.perf_counter() - t0)
            out[name]["loss_last"] = float(loss)
            variants[name] = v._replace(adapters=adapters, opt_state=state)
    for r in out.values():
        r["median_s"] = statistics.median(r.pop("times"))
    return out


def _bases(quick: bool) -> tuple[models.Model, str]:
    path = None if quick else specs_models.smollm2_file()
    if path is None:
        return quant_bench._tiny_model(), "tiny random"
    return models.load(path), "SmolLM2-135M"


def _time_rows(quick: bool) -> list[dict]:
    dense, label = _bases(quick)
    config = dense.config
    rows = []
    if not quick and label != "SmolLM2-135M":
        rows.append({"name": f"SmolLM2 not cached (jaxla download {specs_models.SMOLLM2}); "
                             "timing a tiny random model"})
    decoder = flax_decoder(config, dense.params)
    rows.append(_forward_row(config, dense.params, decoder, quick))
    shape = _shape(quick)
    variants: dict[str, Variant] = {}
    base_bytes = {}
    f32_bytes = _device_bytes(dense.params)
    formats = ("nf4",) if quick else tuple(QWIX_FORMATS)  # --quick: the nf4 pair alone
    for fmt in formats:
        ours = jaxla_variant(dense, fmt, shape)
        model, _ = qwix_model(decoder, fmt, shape[2])
        rows += _kernel_rows(fmt, dense.params, ours.frozen, model, config.num_layers)
        copy_adapters(model, ours.adapters, config.num_layers)
        variants[f"qwix {fmt}"] = qwix_variant(model, ours)
        variants[f"jaxla {fmt}"] = ours
        if fmt == "nf4" and not quick:
            variants["jaxla nf4 lean"] = jaxla_variant(dense, fmt, shape, lean=True)
        del model
    del decoder
    for name, v in variants.items():
        base_bytes[name] = _device_bytes(v.frozen)
    results = _train_interleaved(variants, 2 if quick else 5)
    load = quant_bench._load()
    b, t, r = shape
    for name, res in results.items():
        rows.append({"name": f"{label} QLoRA step, {name}"
                             + (" (remat per layer, head in chunks)" if "lean" in name else "")
                             + f", batch {b}x{t}, r={r}",
                     "step_s": res["median_s"], "compile_s": res["compile_s"],
                     "loss_step0": res["loss0"], "loss_last": res["loss_last"],
                     "base_mib": base_bytes[name] / 2**20,
                     "base_vs_f32": base_bytes[name] / f32_bytes, "load": load,
                     "ok": bool(np.isfinite(res["loss0"]) and np.isfinite(res["loss_last"]))})
    for fmt in formats:
        q, j = results[f"qwix {fmt}"], results[f"jaxla {fmt}"]
        d0, d1 = q["loss0"] - j["loss0"], q["loss_last"] - j["loss_last"]
        row = {"name": f"{fmt}: qwix / jaxla step time; loss differences (qwix - jaxla)",
               "ratio": q["median_s"] / j["median_s"], "loss0_diff": d0, "loss_last_diff": d1}
        if fmt == "nf4":  # the same quantized weights: the same losses up to f32 rounding
            row["ok"] = (abs(d0) <= 1e-4 * abs(j["loss0"])
                         and abs(d1) <= 1e-3 * abs(j["loss_last"]))
        rows.append(row)  # int4: two different quantizations, so a measurement, not a check
    if quick:
        return rows
    lean = results["jaxla nf4 lean"]
    rows.append({"name": "nf4: qwix / jaxla lean step time",
                 "ratio": results["qwix nf4"]["median_s"] / lean["median_s"],
                 "loss0_diff": results["qwix nf4"]["loss0"] - lean["loss0"],
                 "ok": abs(results["qwix nf4"]["loss0"] - lean["loss0"]) <= 1e-4 * abs(lean["loss0"])})
    return rows


# ----------------------------------------------------------------------------------------------
# Memory: one fresh process per library.

CHILD_KINDS = ("qwix nf4", "jaxla nf4", "jaxla nf4 lean")


def _release_freed() -> None:
    """Collects garbage and hands freed heap pages back to the OS (what a GGUF load ends with), so
    that VmRSS after setup counts what is live, not what the allocator kept from the f32 load."""
    import gc

    gc.collect()
    release_freed_memory()


def _child(kind: str) -> dict:
    """In a fresh process: load SmolLM2 (f32), quantize to NF4 and set up the adapters with
    ``kind``'s library, drop the f32 copy, then compile the step and run it 3 times. VmRSS at the
    start (runtime floor) and after setup, VmHWM of the setup, then (reset) VmHWM of the step."""
    library, fmt, *lean = kind.split()
    if library not in ("qwix", "jaxla") or fmt not in QWIX_FORMATS or lean not in ([], ["lean"]):
        raise ValueError(f"unknown child kind {kind!r}; expected one of {CHILD_KINDS}")
    jax.block_until_ready(jnp.ones(8) + 1)
    floor = quant_bench._rss_bytes()
    dense = models.load(specs_models.smollm2_file())
    shape = _shape(False)
    if library == "qwix":  # jaxla's initial adapters and batch (no jaxla quantization here)
        _, adapters, _, ids = quant_bench._step_setup(dense, dense.params, shape)
        decoder = flax_decoder(dense.config, dense.params)
        model, _ = qwix_model(decoder, fmt, shape[2])
        del decoder
        copy_adapters(model, adapters, dense.config.num_layers)
        v = qwix_variant(model, Variant(None, None, adapters, None, ids))
        del model, adapters
    else:
        v = jaxla_variant(dense, fmt, shape, lean=bool(lean))
    del dense
    _release_freed()
    setup, setup_peak = quant_bench._rss_bytes(), quant_bench._peak_rss_bytes()
    reset = quant_bench._reset_peak()
    compiled = v.step.lower(v.frozen, v.adapters, v.opt_state, v.ids).compile()
    temp = compiled.memory_analysis()
    adapters, state, times = v.adapters, v.opt_state, []
    for _ in range(3):
        t0 = time.perf_counter()
        adapters, state, loss = jax.block_until_ready(compiled(v.frozen, adapters, state, v.ids))
        times.append(time.perf_counter() - t0)
    return {"floor_rss": floor, "setup_rss": setup, "setup_peak_rss": setup_peak,
            "step_peak_rss": quant_bench._peak_rss_bytes() if reset else None,
            "base_bytes": _device_bytes(v.frozen),
            "temp_bytes": getattr(temp, "temp_size_in_bytes", 0),
            "step_s": statistics.median(times[1:]), "loss": float(loss), "load": quant_bench._load()}


def _child_main(kind: str) -> None:
    print(json.dumps(_child(kind)))


def _child_json(kind: str) -> tuple[dict | None, str]:
    """``_child(kind)`` in a fresh Python process: (its JSON, "") or (None, why it failed)."""
    code = f"from jaxla.benchmarks.qwix_compare import _child_main; _child_main({kind!r})"
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=900, check=False)
    except subprocess.SubprocessError as e:
        return None, str(e)
    if done.returncode:
        return None, (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
    try:
        return json.loads(done.stdout.strip().splitlines()[-1]), ""
    except (ValueError, IndexError) as e:
        return None, f"unreadable child output ({e})"


def _memory_rows() -> list[dict]:
    if specs_models.smollm2_file() is None:
        return [{"name": f"memory rows need SmolLM2 (jaxla download {specs_models.SMOLLM2})"}]
    rows, got = [], {}
    for kind in CHILD_KINDS:
        got[kind], why = _child_json(kind)
        g = got[kind]

        def mib(key, g=g):
            return g[key] / 2**20 if g and g[key] is not None else None

        rows.append({"name": f"fresh process: f32 load + {kind} QLoRA setup; then compile + 3 steps"
                             + ("" if g else f" (failed: {why})"),
                     "floor_mib": mib("floor_rss"), "setup_peak_mib": mib("setup_peak_rss"),
                     "after_setup_mib": mib("setup_rss"), "base_mib": mib("base_bytes"),
                     "temp_mib": mib("temp_bytes"), "step_peak_mib": mib("step_peak_rss"),
                     "step_s": g["step_s"] if g else None, "loss": g["loss"] if g else None,
                     "load": g["load"] if g else None,
                     "ok": bool(g) and bool(np.isfinite(g["loss"]))})
    q = got["qwix nf4"]
    for other in ("jaxla nf4", "jaxla nf4 lean"):
        j = got[other]
        if q and j and q["step_peak_rss"] and j["step_peak_rss"]:
            rows.append({"name": f"step peak RSS qwix nf4 / {other}",
                         "ratio": q["step_peak_rss"] / j["step_peak_rss"],
                         "minus_floor_ratio": (q["step_peak_rss"] - q["floor_rss"])
                         / (j["step_peak_rss"] - j["floor_rss"]),
                         "setup_peak_ratio": q["setup_peak_rss"] / j["setup_peak_rss"],
                         "ok": abs(q["loss"] - j["loss"]) <= 1e-4 * abs(j["loss"])})
    return rows


def run(*, quick: bool, part: str = "all") -> list[dict]:
    """The suite's rows (see the module docstring); ``part`` is ``"all"``, ``"time"`` (one
    process: the checks and interleaved steps) or ``"memory"`` (the fresh child processes)."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    rows = [_nf4_reference_row()]
    why = missing()
    if why is not None:
        print(why)
        return [{"name": f"qwix side skipped: flax/qwix not importable ({INSTALL})"}, *rows]
    if part in ("all", "time"):
        rows += _time_rows(quick)
    if part in ("all", "memory"):
        rows += [{"name": "memory rows: not in --quick (each loads SmolLM2 in a child process)"}
                 ] if quick else _memory_rows()
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m jaxla.benchmarks.qwix_compare [--quick] [--json FILE] [--part PART]``."""
    parser = argparse.ArgumentParser(prog="python -m jaxla.benchmarks.qwix_compare", add_help=False)
    parser.add_argument("--part", choices=PARTS, default="all")
    known, rest = parser.parse_known_args(argv)
    if {"-h", "--help"} & set(rest):
        print("qwix_compare also takes --part {all,time,memory}: 'time' runs the checks and the "
              "interleaved steps in this process, 'memory' the fresh child processes (default all)")
    return harness.main("qwix_compare", functools.partial(run, part=known.part), rest)


if __name__ == "__main__":
    raise SystemExit(main())
