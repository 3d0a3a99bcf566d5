"""``quant`` suite: quantized frozen bases (QLoRA) on SmolLM2-135M-Instruct.

* resident parameter bytes of the whole model for f32, bf16, the GGUF's Q4_1 kept as loaded, NF4
  and int8 (kernels and the embedding table quantized), each as a fraction of f32 (target: 4-bit
  formats <= 0.17x);
* decode tokens/s with the Q4_1-kept base vs the f32 base (``(M - 1) / (generate(M) −
  generate(1))``, the prefill cancels; target >= 1.0x);
* a QLoRA training step (batch 8 x 64 tokens, r = 8 on the attention and MLP kernels, Adam) on
  the Q4_1-kept base vs the same step on the f32 base (target <= 1.5x the time), and each one's
  peak resident memory measured in a fresh process (target QLoRA <= 0.5x).

Every row checks its numerics in the same run (finite logits/loss; the Q4_1 and f32 bases give the
same first greedy token, since they hold the same weights). The decode on the Q4_1 base goes
through XLA, which decodes each kernel inside the program (no fused dequantize-matmul kernel yet).
``--quick`` runs a tiny random model quantized to q4_1 instead of the real file (no subprocesses).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxla import lora, models, quant
from jaxla.benchmarks import harness, specs_models

KERNELS = [f"layers/{p}/w" for p in ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/gate", "mlp/up",
                                     "mlp/down")]
STEP_BATCH, STEP_TOKENS, STEP_RANK = 8, 64, 8
QUICK_STEP = (2, 16, 4)


def _tiny_model() -> models.Model:
    config = models.LlamaConfig(**{**specs_models.TINY_CONFIG, "hidden_size": 64,
                                   "intermediate_size": 128})
    d, f, v, n = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_layers
    nh, kh = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    rng = np.random.default_rng(0)

    def w(i, o):
        return {"w": jnp.asarray(rng.standard_normal((n, i, o)) / np.sqrt(i), jnp.float32)}

    ones = {"scale": jnp.ones((n, d))}
    params = {"embed": {"table": jnp.asarray(rng.standard_normal((v, d)), jnp.float32)},
              "layers": {"attn_norm": ones, "mlp_norm": ones,
                         "attn": {"q": w(d, nh), "k": w(d, kh), "v": w(d, kh), "o": w(nh, d)},
                         "mlp": {"gate": w(d, f), "up": w(d, f), "down": w(f, d)}},
              "norm": {"scale": jnp.ones((d,))}}
    return models.Model(config=config, params=params, tokenizer=None, chat_template=None,
                        source="tiny random")


def _bases(quick: bool) -> tuple[models.Model, models.Model, str]:
    """(f32 model, Q4_1 model, label): the file dequantized and kept, or a tiny model."""
    path = None if quick else specs_models.smollm2_file()
    if path is None:
        q41 = models.quantize(_tiny_model(), format="q4_1", targets=[*KERNELS, "embed/table"])
        # The f32 base holds the same weights decoded, as loading the file without keep_quantized.
        decoded = jax.tree.map(lambda x: quant.dequantize(x) if quant.is_qarray(x) else x,
                               q41.params, is_leaf=quant.is_qarray)
        return dataclasses.replace(q41, params=decoded), q41, "tiny random"
    return models.load(path), models.load(path, keep_quantized=True), "SmolLM2-135M"


def _bytes_rows(dense: models.Model, q41: models.Model) -> list[dict]:
    f32 = quant.tree_nbytes(dense.params)
    variants = {
        "f32": dense.params,
        "bf16": jax.tree.map(lambda x: x.astype(jnp.bfloat16), dense.params),
        "q4_1 as loaded (GGUF bytes)": q41.params,
        "nf4 (kernels + embedding)": models.quantize(dense, format="nf4",
                                                     targets=[*KERNELS, "embed/table"]).params,
        "int8 (kernels + embedding)": models.quantize(dense, format="int8",
                                                      targets=[*KERNELS, "embed/table"]).params,
    }
    rows = []
    for name, params in variants.items():
        n = quant.tree_nbytes(params)
        four_bit = name.startswith(("q4", "nf4"))
        rows.append({"name": f"resident params, {name}", "mib": n / 2**20, "vs_f32": n / f32,
                     "target": "<=0.17x f32" if four_bit else "",
                     "met": (n / f32 <= 0.17) if four_bit else "", "ok": n > 0})
    return rows


def _decode_rows(dense, q41, label, quick) -> list[dict]:
    config = dense.config
    new_tokens = specs_models.QUICK_DECODE_TOKENS if quick else specs_models.DECODE_TOKENS
    prompt = jax.random.randint(jax.random.key(1), (1, 16 if quick else specs_models.PROMPT_TOKENS),
                                0, config.vocab_size, jnp.int32)
    iters = 2 if quick else 5
    speeds, firsts, rows = {}, {}, []
    for name, params in (("f32 base", dense.params), ("q4_1 base", q41.params)):
        runs = {n: harness.measure(jax.jit(lambda p, ids, n=n: models.generate(
            config, p, ids, max_new_tokens=n)), params, prompt, iters=iters) for n in (1, new_tokens)}
        decode_s = max(runs[new_tokens]["median_s"] - runs[1]["median_s"], 1e-9)
        speeds[name] = (new_tokens - 1) / decode_s
        firsts[name] = int(np.asarray(runs[1]["out"])[0, 0])
        rows.append({"name": f"{label} decode, {name}, {new_tokens} new", "decode_tok_s": speeds[name],
                     "compile_s": runs[new_tokens]["compile_s"],
                     "ok": 0 <= firsts[name] < config.vocab_size})
    ratio = speeds["q4_1 base"] / speeds["f32 base"]
    rows.append({"name": "decode q4_1 / f32", "ratio": ratio, "target": ">=1.0x",
                 "met": ratio >= 1.0, "ok": firsts["q4_1 base"] == firsts["f32 base"]})
    return rows


def _step_setup(dense, params, shape):
    batch, tokens, rank = shape
    config = dense.config
    ids = jax.random.randint(jax.random.key(2), (batch, tokens + 1), 0, config.vocab_size, jnp.int32)
    float_view = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), params,
                              is_leaf=quant.is_qarray)
    adapters = lora.init(jax.random.key(3), float_view, rank=rank, alpha=2 * rank,
                         targets=KERNELS, stack_axes=1)
    adapters = {k: dataclasses.replace(v, b=0.01 * jnp.ones_like(v.b)) for k, v in adapters.items()}
    opt = optax.adam(1e-3)

    def loss(p, a, ids):
        logits = models.forward(config, p, ids[:, :-1], adapters=a)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    return lora.train_step(loss, opt), adapters, opt.init(adapters), ids


def _step_rows(dense, q41, label, quick) -> list[dict]:
    shape = QUICK_STEP if quick else (STEP_BATCH, STEP_TOKENS, STEP_RANK)
    times, losses, rows = {}, {}, []
    for name, params in (("f32 LoRA", dense.params), ("QLoRA q4_1", q41.params)):
        step, adapters, state, ids = _step_setup(dense, params, shape)
        m = harness.measure(step, params, adapters, state, ids, iters=2 if quick else 5)
        times[name], losses[name] = m["median_s"], float(m["out"][2])
        rows.append({"name": f"{label} train step {name}, batch {shape[0]}x{shape[1]}, r={shape[2]}",
                     "step_s": m["median_s"], "compile_s": m["compile_s"], "loss": losses[name],
                     "ok": bool(np.isfinite(losses[name]))})
    ratio = times["QLoRA q4_1"] / times["f32 LoRA"]
    rows.append({"name": "train step QLoRA / f32 LoRA time", "ratio": ratio, "target": "<=1.5x",
                 "met": ratio <= 1.5,
                 "ok": abs(losses["QLoRA q4_1"] - losses["f32 LoRA"]) <= 1e-3 * abs(losses["f32 LoRA"])})
    if not quick:
        peaks = {kind: _child_peak(kind) for kind in ("f32", "q4_1")}
        for kind, peak in peaks.items():
            rows.append({"name": f"peak RSS, fresh process: load + train step, {kind} base",
                         "peak_rss_mib": peak / 2**20 if peak else None, "ok": bool(peak)})
        if peaks["f32"] and peaks["q4_1"]:
            r = peaks["q4_1"] / peaks["f32"]
            rows.append({"name": "peak RSS QLoRA / f32 LoRA", "ratio": r, "target": "<=0.5x",
                         "met": r <= 0.5, "ok": True})
    return rows


def _child(kind: str) -> None:
    """In a fresh process: load the base, run two train steps, print the peak RSS as JSON."""
    path = specs_models.smollm2_file()
    model = models.load(path, keep_quantized=kind == "q4_1")
    step, adapters, state, ids = _step_setup(model, model.params, (STEP_BATCH, STEP_TOKENS, STEP_RANK))
    for _ in range(2):
        adapters, state, loss = step(model.params, adapters, state, ids)
    jax.block_until_ready(loss)
    print(json.dumps({"peak_rss": harness.peak_rss_bytes()}))


def _child_peak(kind: str) -> int | None:
    code = f"from jaxla.benchmarks.quant import _child; _child({kind!r})"
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=900, check=True)
        return int(json.loads(done.stdout.strip().splitlines()[-1])["peak_rss"])
    except (subprocess.SubprocessError, ValueError, KeyError, IndexError):
        return None


def run(*, quick: bool) -> list[dict]:
    dense, q41, label = _bases(quick)
    rows = []
    if not quick and label != "SmolLM2-135M":
        rows.append({"name": f"SmolLM2 not cached (jaxla download {specs_models.SMOLLM2}); "
                             "timing a tiny random model"})
    rows += _bytes_rows(dense, q41)
    rows += _decode_rows(dense, q41, label, quick)
    rows += _step_rows(dense, q41, label, quick)
    return rows


if __name__ == "__main__":
    raise SystemExit(harness.main("quant", run))
