"""``quant`` suite: quantized frozen bases (QLoRA) on SmolLM2-135M-Instruct.

* resident parameter bytes of the whole model for f32, bf16, the GGUF's Q4_1 kept as loaded, NF4
  and int8 (kernels and the embedding table quantized), each as a fraction of f32 (target: 4-bit
  formats <= 0.17x); when the file's embedding is wider than 4 bits (SmolLM2's is Q8_0), the
  same with it requantized to q4_1, and what that does to the next-token log-probabilities;
* the fused dequantize-and-multiply CPU kernel (``jaxla.quant._fused``) on one Q4_1 MLP kernel and
  the Q8_0 embedding table used as the tied head: time and GB/s of packed bytes per call against
  the machine's copy bandwidth (read + write, ``harness.copy_bandwidth``), and against the jnp
  decode-then-matmul path and an f32 matmul for 1 to 512 rows of X (the crossover that sets
  ``MAX_FUSED_ROWS``);
* decode tokens/s with the Q4_1-kept base (fused kernel) vs the f32 base (``(M - 1) / (generate(M)
  − generate(1))``, the prefill cancels; target >= 1.0x), timed interleaved; the Q4_1 base with the
  fused kernel forced off (``JAXLA_FUSED_QMM=0``) in a fresh process; llama.cpp on the same file
  when ``llama_cpp`` imports (target >= 0.5x of it); prefill tokens/s of the prompt for each;
* a QLoRA training step (batch 8 x 64 tokens, r = 8 on the attention and MLP kernels, Adam) on
  the Q4_1-kept base vs the same step on the f32 base (target <= 1.5x the time), and each one's
  peak resident memory measured in its own fresh process (target QLoRA <= 0.5x), plain and "lean"
  (remat per layer, the head in chunks): the whole-process peak and, by resetting the high-water
  mark between phases (``/proc/self/clear_refs``), the load-, compile- and steady-state (steps 2-4)
  peaks, each as QLoRA / f32, also above the runtime floor; a probe pair of lean children hands
  the allocator's freed pages back (``malloc_trim``) after the compile and step 1. Beside them,
  for context, the bytes the compiled step itself holds (XLA's memory analysis: arguments, outputs
  and temporaries), what a device allocator would hold without the runtime. The peaks are
  the child's VmHWM: ``getrusage``'s ru_maxrss survives exec, so a child of a large benchmark
  process reported the parent's peak for both bases (4913 MiB each, 2026-12-01).

``--scaling`` (not part of the suite; ``[--sizes SIZE ...]``) asks how the QLoRA / f32 peak ratio
behaves as the model grows: the lean step's per-phase peaks, in a fresh child per (size, base), on
synthetic SmolLM2-shaped models of 135M, 360M and 1B parameters (1.5B by name) whose q4_1 base is
built a piece at a time and whose f32 base holds the same weights decoded; each child first checked
to fit in the memory available.

Timings on a shared machine are noisy: variants are interleaved round by round, medians reported,
and the 1-minute load average is recorded with each timing row. Every row checks its numerics in
the same run (finite logits/loss; the bases give the same first greedy token, the fused kernel
agrees with the decoded product). ``--quick`` runs a tiny random model quantized to q4_1 instead
of the real file (no subprocesses).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxla import lora, models, quant
from jaxla._host_memory import release_freed_memory
from jaxla.benchmarks import harness, specs_models
from jaxla.finetune import _memory
from jaxla.models import _llama

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
    table = q41.params["embed"]["table"]
    requantized = None
    if quant.is_qarray(table) and table.format != "q4_1":
        # The GGUF stores its tied embedding in a wider format (SmolLM2's: Q8_0); what the bytes
        # would be were it 4-bit too, and what that costs the head.
        requantized = {**q41.params, "embed": {"table": quant.quantize(
            quant.dequantize(table), format="q4_1", axis=table.axis)}}
        variants[f"q4_1 throughout (the file's {table.format} embedding requantized to q4_1)"] = (
            requantized)
    rows = []
    for name, params in variants.items():
        n = quant.tree_nbytes(params)
        four_bit = name.startswith(("q4", "nf4"))
        rows.append({"name": f"resident params, {name}", "mib": n / 2**20, "vs_f32": n / f32,
                     "target": "<=0.17x f32" if four_bit else "",
                     "met": (n / f32 <= 0.17) if four_bit else "", "ok": n > 0})
    if requantized is not None:
        rows.append(_requantized_head_row(q41, requantized))
    return rows


_PASSAGE = ("The quick brown fox jumps over the lazy dog. Linear algebra is the study of vectors, "
            "matrices and the maps between them; a low-rank update adds the product of two thin "
            "matrices to a frozen weight, so only a small fraction of the parameters is trained.")


def _requantized_head_row(q41: models.Model, requantized: dict) -> dict:
    """Next-token agreement and log-probability change over an English passage (the random-token
    benchmark prompt when the model has no tokenizer) between the file's embedding and its q4_1
    requantization (the same kernels, so only the table differs)."""
    if q41.tokenizer is not None:
        prompt = jnp.asarray([q41.tokenizer.encode(_PASSAGE).ids], jnp.int32)
    else:
        prompt = _prompt(q41.config, False)
    forward = jax.jit(lambda p, ids: jax.nn.log_softmax(models.forward(q41.config, p, ids), -1))
    before, after = (np.asarray(forward(p, prompt))[0] for p in (q41.params, requantized))
    top = before.argmax(-1)
    rows = np.arange(top.shape[0])
    return {"name": f"q4_1 throughout vs as loaded, {prompt.shape[1]}-token passage: greedy next "
                    "token equal (fraction), mean |change| of its log-probability",
            "top1_agree": float((after.argmax(-1) == top).mean()),
            "mean_abs_dlogp": float(np.abs(after[rows, top] - before[rows, top]).mean()),
            "ok": bool(np.isfinite(after).all())}


def _load() -> float:
    return os.getloadavg()[0]


def _interleaved(fns: dict, args: dict, rounds: int) -> dict[str, float]:
    """Median seconds of each compiled ``fns[k](*args[k])``, timed one after another per round."""
    for k, f in fns.items():
        jax.block_until_ready(f(*args[k]))
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args[k]))
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _matvec_rows(q41: models.Model, quick: bool) -> list[dict]:
    """The fused kernel alone on one Q4_1 MLP kernel and on the Q8_0 (tied head) table."""
    layers = q41.params["layers"]
    cases = {"q4_1 mlp/up layer 0": jax.tree.map(lambda v: v[0], layers["mlp"]["up"]["w"]),
             "embedding table (head)": q41.params["embed"]["table"]}
    copy = harness.copy_bandwidth(quick=quick)
    rows, rng = [], np.random.default_rng(0)
    for name, q in cases.items():
        if quant.fused_reason(q, 1) is not None:
            rows.append({"name": f"fused matmul {name}: {quant.fused_reason(q, 1)}"})
            continue
        dense = quant.dequantize(q, dtype=jnp.float32)
        dense_rows = dense.T if q.axis == -2 else dense                    # (R, C)
        crossover = None
        for m in ((1, 16) if quick else (1, 4, 16, 32, 64, 128, 512)):
            x = jnp.asarray(rng.standard_normal((m, q.columns)), jnp.float32)
            fns = {"fused": jax.jit(quant.rows_product),
                   "decoded": jax.jit(lambda x, q: quant.decoded_product(
                       x, q, compute=jnp.float32, acc=jnp.float32)),
                   "f32": jax.jit(lambda x, w: x @ w.T)}
            args = {"fused": (x, q), "decoded": (x, q), "f32": (x, dense_rows)}
            t = _interleaved(fns, args, 3 if quick else 15)
            got, want = fns["fused"](x, q), fns["decoded"](x, q)
            scale = float(jnp.max(jnp.abs(x) @ jnp.abs(dense_rows).T))
            err = float(jnp.max(jnp.abs(got - want)))
            if crossover is None and t["fused"] > t["decoded"]:
                crossover = m
            rows.append({"name": f"fused matmul {name} {tuple(q.shape)}, M={m}",
                         "fused_us": t["fused"] * 1e6, "decoded_us": t["decoded"] * 1e6,
                         "f32_us": t["f32"] * 1e6, "fused_gb_s": q.nbytes / t["fused"] / 1e9,
                         "vs_copy": q.nbytes / t["fused"] / copy, "load": _load(),
                         "path": quant.fused_path(), "ok": err <= 8 * 1.2e-7 * scale})
        rows.append({"name": f"fused vs decoded crossover, {name}", "first_slower_m": crossover,
                     "max_fused_rows": quant.MAX_FUSED_ROWS, "copy_gb_s": copy / 1e9, "ok": True})
    return rows


def _generate_fns(config, new_tokens):
    return {n: jax.jit(lambda p, ids, n=n: models.generate(config, p, ids, max_new_tokens=n))
            for n in (1, new_tokens)}


def _prompt(config, quick):
    return jax.random.randint(jax.random.key(1), (1, 16 if quick else specs_models.PROMPT_TOKENS),
                              0, config.vocab_size, jnp.int32)


def _decode_rows(dense, q41, label, quick) -> list[dict]:
    config = dense.config
    new_tokens = specs_models.QUICK_DECODE_TOKENS if quick else specs_models.DECODE_TOKENS
    prompt = _prompt(config, quick)
    gen = _generate_fns(config, new_tokens)
    fns, args = {}, {}
    for name, params in (("f32 base", dense.params), ("q4_1 base, fused", q41.params)):
        for n in (1, new_tokens):
            fns[name, n], args[name, n] = gen[n], (params, prompt)
    t = _interleaved(fns, args, 2 if quick else 7)
    speeds, rows = {}, []
    firsts = {name: int(np.asarray(gen[1](params, prompt))[0, -1])
              for name, params in (("f32 base", dense.params), ("q4_1 base, fused", q41.params))}
    for name in ("f32 base", "q4_1 base, fused"):
        speeds[name] = (new_tokens - 1) / max(t[name, new_tokens] - t[name, 1], 1e-9)
        rows.append({"name": f"{label} decode, {name}, {new_tokens} new",
                     "decode_tok_s": speeds[name], "prefill_tok_s": prompt.shape[1] / t[name, 1],
                     "load": _load(), "ok": 0 <= firsts[name] < config.vocab_size})
    ratio = speeds["q4_1 base, fused"] / speeds["f32 base"]
    rows.append({"name": "decode q4_1 (fused) / f32", "ratio": ratio, "target": ">=1.0x",
                 "met": ratio >= 1.0, "ok": firsts["q4_1 base, fused"] == firsts["f32 base"]})
    if quick:
        return rows
    off = _child_json("decode_off", env={"JAXLA_FUSED_QMM": "0"})
    if off:
        rows.append({"name": f"{label} decode, q4_1 base, fused kernel off (fresh process)",
                     "decode_tok_s": off["decode_tok_s"], "prefill_tok_s": off["prefill_tok_s"],
                     "load": off["load"], "ok": off["first"] == firsts["f32 base"]})
        rows.append({"name": "decode q4_1 fused / fused off", "ratio":
                     speeds["q4_1 base, fused"] / off["decode_tok_s"], "ok": True})
    rows += _llama_cpp_rows(speeds["q4_1 base, fused"], new_tokens)
    return rows


def _decode_off() -> dict:
    """In a fresh process started with the fused kernel off: the Q4_1 base's decode speed."""
    q41 = models.load(specs_models.smollm2_file(), keep_quantized=True)
    config = q41.config
    prompt = _prompt(config, False)
    gen = _generate_fns(config, specs_models.DECODE_TOKENS)
    t = _interleaved({n: f for n, f in gen.items()}, {n: (q41.params, prompt) for n in gen}, 3)
    n = specs_models.DECODE_TOKENS
    return {"decode_tok_s": (n - 1) / max(t[n] - t[1], 1e-9), "prefill_tok_s": prompt.shape[1] / t[1],
            "load": _load(), "first": int(np.asarray(gen[1](q41.params, prompt))[0, -1]),
            "fused": quant.fused_path()}


def _llama_cpp_rows(ours: float, new_tokens: int) -> list[dict]:
    """llama.cpp (llama-cpp-python) on the same file, when it is installed."""
    try:
        import llama_cpp
    except ImportError:
        return [{"name": "llama.cpp side by side: llama_cpp not installed (PyPI has no prebuilt "
                         "wheel of llama-cpp-python for this machine; anchors 117-149 tok/s decode "
                         "measured here with llama.cpp itself)",
                 "ratio_vs_117": ours / 117.0, "ratio_vs_149": ours / 149.0, "target": ">=0.5x",
                 "met": ours / 149.0 >= 0.5, "ok": True}]
    llm = llama_cpp.Llama(model_path=str(specs_models.smollm2_file()), n_ctx=512, verbose=False)
    prompt = [int(t) for t in _prompt_ids(llm.n_vocab())]
    times = {}
    for n in (1, new_tokens):
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            for i, _token in enumerate(llm.generate(prompt, top_k=1, reset=True)):
                if i + 1 >= n:
                    break
            runs.append(time.perf_counter() - t0)
        times[n] = statistics.median(runs)
    theirs = (new_tokens - 1) / max(times[new_tokens] - times[1], 1e-9)
    return [{"name": "llama.cpp decode, same file", "decode_tok_s": theirs, "load": _load(),
             "ok": True},
            {"name": "decode jaxla q4_1 (fused) / llama.cpp", "ratio": ours / theirs,
             "target": ">=0.5x", "met": ours / theirs >= 0.5, "ok": True}]


def _prompt_ids(vocab: int) -> np.ndarray:
    return np.asarray(jax.random.randint(jax.random.key(1), (specs_models.PROMPT_TOKENS,), 0, vocab,
                                         jnp.int32))


HEAD_CHUNK = 128  # tokens per chunk of the lean step's vocabulary head


def _lean_loss(config, p, a, ids):
    """The mean next-token loss with each layer rematerialised (``remat=True``) and the (tokens ×
    V) head applied ``HEAD_CHUNK`` tokens at a time under ``jax.checkpoint``, so only one chunk's
    logits are ever live (the full head is 512 × 49152 f32 = 96 MiB per copy)."""
    inputs = _llama.check_inputs(config, ids[:, :-1], None, None)
    h = _llama.run(config, p, inputs, adapters=a, remat=True, head=False)      # (B, T, D)
    labels = ids[:, 1:].reshape(-1)
    n = labels.shape[0]
    chunk = HEAD_CHUNK if n % HEAD_CHUNK == 0 else n
    hs = h.reshape(n // chunk, 1, chunk, h.shape[-1])

    @jax.checkpoint
    def chunk_loss(h, labels):
        logits = _llama.logits_of(config, p, a, h)[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()

    return jax.lax.map(lambda hl: chunk_loss(*hl), (hs, labels.reshape(-1, chunk))).sum() / n


def _step_setup(dense, params, shape, lean: bool = False):
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
        if lean:
            return _lean_loss(config, p, a, ids)
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
        rows += _peak_rows()
    return rows


# What each fresh child's peak measures (``_step_child``), in the order the phases run.
PEAKS = {"whole": "whole-process peak (VmHWM: load + compile + 4 steps)",
         "load": "load-phase peak (VmHWM after loading)",
         "compile": "compile-phase peak (lowering + XLA compile of the step)",
         "steady": "steady-state peak of train steps 2-4 (after compile + step 1)"}
STEP_KINDS = ("f32", "q4_1", "f32 lean", "q4_1 lean", "f32 lean trim", "q4_1 lean trim")


def _peak_rows(kinds: tuple[str, ...] = STEP_KINDS, size: str | None = None,
               quick: bool = False) -> list[dict]:
    """One fresh child per base and step (``_step_child``): its peaks, and QLoRA / f32 per peak.
    ``size``: a :data:`SCALING_SIZES` name, the synthetic model of that size instead of the file
    (each child first checked to fit in the memory available now, and skipped with a row saying so
    when it does not; progress on stderr)."""
    peaks, rows = {}, []
    for kind in kinds:
        if size is None:
            peaks[kind] = _child_json("step", kind)
            continue
        need, free = _scaling_child_bytes(size, kind.split(" ")[0]), _memory.available_bytes()
        if free is not None and need > 0.8 * free:
            rows.append({"name": f"synthetic {size}, {kind}: skipped, needs ~{need / 2**30:.1f} "
                                 f"GiB, {free / 2**30:.1f} GiB available", "ok": True})
            peaks[kind] = None
            continue
        t0 = time.perf_counter()
        print(f"quant --scaling: {size} {kind} (needs ~{need / 2**30:.1f} GiB) ...", end=" ",
              file=sys.stderr, flush=True)
        peaks[kind] = _child_json("step", kind, size, quick, timeout=SCALING_CHILD_TIMEOUT_S)
        got = peaks[kind]
        print(f"{time.perf_counter() - t0:.0f} s, " + (
            f"steady {got['steady_peak'] / 2**20:.0f} MiB, whole {got['peak_rss'] / 2**20:.0f} MiB"
            if got and got["steady_peak"] is not None else "failed" if not got else "done"),
            file=sys.stderr, flush=True)
    where = "fresh process" if size is None else f"synthetic {size}, fresh process"
    load = "load" if size is None else "build"
    for kind, got in peaks.items():
        def mib(key, got=got):
            return got[key] / 2**20 if got and got[key] is not None else None
        if size is not None and got is None and any(kind in r["name"] for r in rows):
            continue  # skipped for memory: said so above
        base = kind.split(" ")[0]
        what = (f", lean (remat per layer, head in chunks of {HEAD_CHUNK} tokens)"
                if "lean" in kind else "") + (
            "; probe: malloc_trim after compile and step 1" if "trim" in kind else "")
        rows.append({"name": f"{where}, {base} base: {load} + 4 train steps{what}",
                     "peak_rss_mib": mib("peak_rss"), "load_peak_mib": mib("load_peak"),
                     "compile_peak_mib": mib("compile_peak"), "steady_peak_mib": mib("steady_peak"),
                     "runtime_floor_mib": mib("floor_rss"), "after_load_mib": mib("loaded_rss"),
                     "after_lowering_mib": mib("lowered_rss"),
                     "after_compile_mib": mib("compiled_rss"),
                     "before_step1_mib": mib("trimmed_rss"), "after_step1_mib": mib("stepped_rss"),
                     "params_mib": mib("params_bytes"), "temp_mib": mib("temp_bytes"),
                     "outputs_mib": mib("output_bytes"), "step_s": got["step_s"] if got else None,
                     "loss": got["loss"] if got else None,
                     **({"build_s": got["load_s"] if got else None} if size is not None else {}),
                     "ok": bool(got) and np.isfinite(got["loss"])})
    pairs = [("", "f32", "q4_1"), (" lean", "f32 lean", "q4_1 lean"),
             (" (lean QLoRA / plain f32)", "f32", "q4_1 lean"),
             (" lean, allocator trimmed (probe)", "f32 lean trim", "q4_1 lean trim")]
    label = "" if size is None else f"synthetic {size}, "
    for suffix, f32_kind, q_kind in pairs:
        f32, q41 = peaks.get(f32_kind), peaks.get(q_kind)
        if not (f32 and q41):
            continue
        same = abs(q41["loss"] - f32["loss"]) <= 1e-3 * abs(f32["loss"])
        for key, what in PEAKS.items():
            field = "peak_rss" if key == "whole" else f"{key}_peak"
            if q41[field] is None or f32[field] is None:  # no /proc/self/clear_refs here
                continue
            r = q41[field] / f32[field]
            above = (q41[field] - q41["floor_rss"]) / (f32[field] - f32["floor_rss"])
            rows.append({"name": f"{label}{what}: QLoRA / f32 LoRA{suffix}", "ratio": r,
                         "ratio_above_runtime_floor": above, "target": "<=0.5x", "met": r <= 0.5,
                         "ok": same})
        if step_buffer_bytes(q41) and step_buffer_bytes(f32):
            rows.append({"name": f"{label}{STEP_BUFFERS}: QLoRA / f32 LoRA{suffix}",
                         "ratio": step_buffer_bytes(q41) / step_buffer_bytes(f32),
                         "qlora_mib": step_buffer_bytes(q41) / 2**20,
                         "f32_mib": step_buffer_bytes(f32) / 2**20, "ok": same})
    return rows


# Beside the resident-memory peaks (the target), what the compiled step itself holds: context for
# them, since a device allocator holds these buffers and not the Python/XLA runtime around them.
STEP_BUFFERS = ("step buffers, no runtime (XLA memory_analysis: arguments + outputs - aliased + "
                "temporaries)")


def step_buffer_bytes(child: dict) -> int:
    """Bytes the compiled train step of a ``_step_child`` result holds while it runs: its
    arguments (base weights, adapters, optimizer state, batch), outputs not aliased to an argument,
    and XLA's temporaries; 0 when the backend reports no memory analysis."""
    if not child.get("argument_bytes"):
        return 0
    return (child["argument_bytes"] + child["output_bytes"] - child.get("alias_bytes", 0)
            + child["temp_bytes"])


def _rss_bytes() -> int:
    """This process's VmRSS now."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _peak_rss_bytes() -> int:
    """This process's VmHWM. Not ``getrusage``: its ru_maxrss survives exec, so in a child of a big
    process it is at least the parent's resident size at the fork."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return harness.peak_rss_bytes()


def _reset_peak() -> bool:
    """Resets this process's VmHWM to its current VmRSS (Linux >= 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _step_child(kind: str, size: str | None = None, quick: bool = False) -> dict:
    """In a fresh process: load the base, compile the train step, run it 4 times. ``kind`` is
    ``"f32"`` or ``"q4_1"``, with `` lean`` for the rematerialised step with the chunked head, and
    `` trim`` for a probe that also hands the allocator's freed pages back to the OS (glibc's
    ``malloc_trim``, as loading does) after the compile and after step 1. ``size``: None for
    SmolLM2-135M's GGUF file (f32: decoded, q4_1: kept as stored), or a :data:`SCALING_SIZES` name
    for the synthetic model of that size (``_synthetic_model``: q4_1 built a piece at a time, f32
    the same weights decoded). ``quick``: the step on ``QUICK_STEP`` shapes.

    The high-water mark is read and reset between the phases, so each phase's peak is its own:
    loading, compiling (lowering + XLA), step 1, steps 2-4 (the steady state); the whole-process
    peak is the largest of them (the VmHWM a run without resets would report)."""

    base, *variants = kind.split(" ")
    trim = release_freed_memory if "trim" in variants else (lambda: None)
    jax.block_until_ready(jnp.ones(8) + 1)  # the runtime started: the floor before any weights
    floor = _rss_bytes()
    t0 = time.perf_counter()
    if size is None:
        model = models.load(specs_models.smollm2_file(), keep_quantized=base == "q4_1")
    else:
        model = _synthetic_model(scaling_config(size), base)
    load_s = time.perf_counter() - t0
    loaded, load_peak = _rss_bytes(), _peak_rss_bytes()
    resets = _reset_peak()
    shape = QUICK_STEP if quick else (STEP_BATCH, STEP_TOKENS, STEP_RANK)
    step, adapters, state, ids = _step_setup(model, model.params, shape, lean="lean" in variants)
    lowered = step.lower(model.params, adapters, state, ids)
    lowered_rss = _rss_bytes()
    compiled = lowered.compile()
    del lowered
    memory = compiled.memory_analysis()
    compiled_rss, compile_peak = _rss_bytes(), _peak_rss_bytes()
    trim()
    trimmed_rss = _rss_bytes()
    _reset_peak()
    adapters, state, loss = jax.block_until_ready(compiled(model.params, adapters, state, ids))
    first_peak = _peak_rss_bytes()
    trim()
    stepped_rss = _rss_bytes()
    _reset_peak()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        adapters, state, loss = jax.block_until_ready(compiled(model.params, adapters, state, ids))
        times.append(time.perf_counter() - t0)
    steady_peak = _peak_rss_bytes()
    phases = (load_peak, compile_peak, first_peak, steady_peak)
    return {"peak_rss": max(phases) if resets else steady_peak, "load_peak": load_peak,
            "compile_peak": compile_peak if resets else None,
            "steady_peak": steady_peak if resets else None,
            "first_step_peak": first_peak if resets else None,
            "step_s": statistics.median(times), "loss": float(loss), "load_s": load_s,
            "temp_bytes": getattr(memory, "temp_size_in_bytes", 0),
            "output_bytes": getattr(memory, "output_size_in_bytes", 0),
            "argument_bytes": getattr(memory, "argument_size_in_bytes", 0),
            "alias_bytes": getattr(memory, "alias_size_in_bytes", 0),
            "floor_rss": floor, "loaded_rss": loaded, "lowered_rss": lowered_rss,
            "compiled_rss": compiled_rss, "trimmed_rss": trimmed_rss, "stepped_rss": stepped_rss,
            "params_bytes": quant.tree_nbytes(model.params)}


# --- Scaling: the QLoRA / f32 peak ratio as the model grows (``--scaling``) --------------------------
# Synthetic Llama models of SmolLM2's architecture (head_dim 64, 3 query heads per KV head, SwiGLU,
# tied embedding, vocabulary 49152): name -> (D hidden, L layers, N heads, K KV heads, F MLP width).
# 135M and 360M are SmolLM2-135M's and SmolLM2-360M's shapes; 1B keeps the GQA ratio 3 (SmolLM2-1.7B
# is 2048 wide with 32 heads, not a multiple of 3); every blocked axis (D, F, N·64, K·64) is a multiple
# of 64, so q4_1 (blocks of 32) and nf4 (64) both divide it.
SCALING_SIZES = {"135M": (576, 30, 9, 3, 1536), "360M": (960, 32, 15, 5, 2560),
                 "1B": (1920, 24, 30, 10, 5120), "1.5B": (2304, 24, 36, 12, 6144)}
SCALING_RUN = ("135M", "360M", "1B")          # what ``--scaling`` runs (1.5B: by name, ~9 GiB f32)
SCALING_QUICK = {"tiny": (192, 2, 3, 1, 512)}  # ``--scaling --quick``: the machinery on a toy
SCALING_FORMAT = "q4_1"
SCALING_KINDS = ("f32 lean", "q4_1 lean", "f32 lean trim", "q4_1 lean trim")
SCALING_CHILD_TIMEOUT_S = 1800
_TABLE_PIECE_ROWS = 4096  # embedding-table rows drawn and quantized at a time


def scaling_config(size: str) -> models.LlamaConfig:
    """The synthetic config called ``size`` (a :data:`SCALING_SIZES` or :data:`SCALING_QUICK` name)."""
    sizes = {**SCALING_SIZES, **SCALING_QUICK}
    if size not in sizes:
        raise ValueError(f"size must be one of {tuple(sizes)}, got {size!r}")
    d, layers, heads, kv_heads, ff = sizes[size]
    return models.LlamaConfig(vocab_size=49152, hidden_size=d, intermediate_size=ff,
                              num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=64,
                              rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
                              tie_word_embeddings=True)


def _synthetic_leaves(config: models.LlamaConfig) -> dict[str, tuple[tuple[int, ...], float]]:
    """The quantized leaves of a synthetic model: path -> (shape, std of its random values); the
    kernels (L, I, O) with std 1/sqrt(I), the table (V, D) with std 1/sqrt(D)."""
    d, f, n = config.hidden_size, config.intermediate_size, config.num_layers
    nh, kh = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    dims = {"attn/q": (d, nh), "attn/k": (d, kh), "attn/v": (d, kh), "attn/o": (nh, d),
            "mlp/gate": (d, f), "mlp/up": (d, f), "mlp/down": (f, d)}
    leaves = {f"layers/{k}/w": ((n, i, o), float(1 / np.sqrt(i))) for k, (i, o) in dims.items()}
    return {**leaves, "embed/table": ((config.vocab_size, d), float(1 / np.sqrt(d)))}


def scaling_param_count(config: models.LlamaConfig) -> int:
    """Parameters of the synthetic model (kernels, the tied table, the RMSNorm scales)."""
    norms = (2 * config.num_layers + 1) * config.hidden_size
    return norms + sum(int(np.prod(shape)) for shape, _ in _synthetic_leaves(config).values())


_decode = jax.jit(quant.dequantize)


@functools.partial(jax.jit, donate_argnums=0)
def _put(whole: jax.Array, piece: jax.Array, start) -> jax.Array:
    """``whole`` with ``piece`` written in place from row ``start`` of its first axis."""
    return jax.lax.dynamic_update_slice_in_dim(whole, piece, start, 0)


def _synthetic_model(config: models.LlamaConfig, base: str, *, seed: int = 0,
                     format: str = SCALING_FORMAT) -> models.Model:
    """A model of ``config`` with random weights from ``jax.random.key(seed)``, the RMSNorm scales
    ones. ``base``: ``"random"`` (the f32 weights as drawn), ``format`` (the 7 kernels and the table
    quantized, exactly what ``models.quantize(random, format=format, targets=[*KERNELS,
    "embed/table"])`` gives) or ``"f32"`` (those quantized weights decoded: the f32 base holding
    the same values, as a GGUF file loaded without keep_quantized).

    Each leaf is drawn, quantized and decoded a piece at a time (a layer of a kernel stack,
    ``_TABLE_PIECE_ROWS`` rows of the table) and written into one preallocated stack in place
    (a donated update), so no f32 copy of a whole leaf exists beside a quantized model, and an f32
    model is built with one piece's transients beside it (a whole-stack ``quantize`` would hold the
    f32 stack and several host copies of it). It ends, as ``models.load`` of a GGUF file does, by
    handing the allocator's freed pages back (``malloc_trim``): without it the pieces' freed host
    transients kept ~100-200 MiB resident in both bases (runs 1-2, benchmarks/RESULTS.md)."""
    if base not in ("random", "f32", format):
        raise ValueError(f"base must be 'random', 'f32' or {format!r}, got {base!r}")
    flat = {}
    for index, (path, (shape, std)) in enumerate(_synthetic_leaves(config).items()):
        table = path == "embed/table"
        step = _TABLE_PIECE_ROWS if table else 1
        key = jax.random.fold_in(jax.random.key(seed), index)
        whole = None
        for piece, start in enumerate(range(0, shape[0], step)):
            w = std * jax.random.normal(jax.random.fold_in(key, piece),
                                        (min(step, shape[0] - start), *shape[1:]), jnp.float32)
            if base != "random":
                q = quant.quantize(w, format=format, stack_axes=0 if table else 1,
                                   axis=-1 if table else -2)
                w = q if base == format else _decode(q)
            if whole is None:
                whole = jax.tree.map(lambda x, n=shape[0]: jnp.zeros((n, *x.shape[1:]), x.dtype), w)
            whole = jax.tree.map(lambda whole, w, start=start: _put(whole, w, start), whole, w)
            del w
        flat[path] = jax.block_until_ready(whole)
    n, d = config.num_layers, config.hidden_size
    layers = {"attn_norm": {"scale": jnp.ones((n, d))}, "mlp_norm": {"scale": jnp.ones((n, d))},
              "attn": {}, "mlp": {}}
    for path, leaf in flat.items():
        if path.startswith("layers/"):
            _, group, name, _ = path.split("/")
            layers[group][name] = {"w": leaf}
    params = {"embed": {"table": flat["embed/table"]}, "layers": layers,
              "norm": {"scale": jnp.ones((d,))}}
    release_freed_memory()  # as load_gguf ends: the pieces' freed transients back to the OS
    return models.Model(config=config, params=params, tokenizer=None, chat_template=None,
                        source=f"synthetic random ({base}, seed {seed})")


def _scaling_child_bytes(size: str, base: str) -> int:
    """A generous bound on one lean scaling child's peak: 1.5 GiB (runtime, compiles, the step's
    activations at batch 8 x 64) plus twice its resident parameters (the params, one leaf's pieces
    in flight, the step's per-layer decoded kernels)."""
    config = scaling_config(size)
    count = scaling_param_count(config)
    params = 4 * count if base == "f32" else count * 5 // 8 + 4 * (2 * config.num_layers + 1) * (
        config.hidden_size)
    return int(1.5 * 2**30) + 2 * params


def run_scaling(*, quick: bool, sizes: tuple[str, ...] | None = None,
                kinds: tuple[str, ...] = SCALING_KINDS) -> list[dict]:
    """``--scaling``: the lean QLoRA step (q4_1 base) vs the same step on the f32 base, a fresh child
    per (size, base, probe) (``_step_child`` on ``_synthetic_model``): the params' MiB and every
    phase's peak per child, each peak as QLoRA / f32 per size, and the first size whose QLoRA / f32
    ratio is <= 0.5x for the steady state and for the whole process."""
    sizes = tuple(SCALING_QUICK if quick else SCALING_RUN) if sizes is None else sizes
    rows, first = [], {}
    for size in sizes:
        config = scaling_config(size)
        count = scaling_param_count(config)
        d, layers, heads, kv_heads, ff = {**SCALING_SIZES, **SCALING_QUICK}[size]
        rows.append({"name": f"synthetic {size}: D={d} L={layers} heads {heads}/{kv_heads} F={ff} "
                             f"V={config.vocab_size}, {SCALING_FORMAT} kernels + table",
                     "params_m": count / 1e6, "ok": True})
        got = _peak_rows(kinds, size=size, quick=quick)
        rows += got
        met = {r["name"] for r in got if r.get("met")}
        for key in ("steady", "whole"):
            if f"synthetic {size}, {PEAKS[key]}: QLoRA / f32 LoRA lean" in met:
                first.setdefault(key, size)
    for key in ("steady", "whole"):
        rows.append({"name": f"first size whose {PEAKS[key]}, QLoRA / f32 lean, is <= 0.5x",
                     "size": first.get(key, f"none of {', '.join(sizes)}"), "ok": True})
    return rows


def main(argv: list[str] | None = None) -> int:
    """``python -m jaxla.benchmarks.quant [--quick] [--json FILE] [--scaling [--sizes SIZE ...]]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m jaxla.benchmarks.quant",
                                     description="jaxla quant benchmark suite")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, a few seconds")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    parser.add_argument("--scaling", action="store_true",
                        help="instead of the suite: QLoRA / f32 peak memory of the lean step on "
                             f"synthetic SmolLM2-shaped models of {', '.join(SCALING_RUN)} "
                             "parameters, a fresh process per child (minutes; needs ~9 GiB free)")
    parser.add_argument("--sizes", nargs="+", metavar="SIZE", choices=[*SCALING_SIZES, *SCALING_QUICK],
                        help=f"with --scaling: these sizes instead ({', '.join(SCALING_SIZES)}; "
                             f"{', '.join(SCALING_QUICK)} is --quick's)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.sizes and not args.scaling:
        parser.error("--sizes goes with --scaling")
    rest = (["--quick"] if args.quick else []) + (["--json", args.json] if args.json else [])
    if args.scaling:
        sizes = tuple(dict.fromkeys(args.sizes)) if args.sizes else None
        return harness.main("quant_scaling", functools.partial(run_scaling, sizes=sizes), rest)
    return harness.main("quant", run, rest)


def decode_breakdown(rounds: int = 7, tokens: int = 10) -> list[dict]:
    """Per-token wall and CPU milliseconds of SmolLM2's decode step (one jitted loop of ``tokens``
    steps over a 116-slot cache, the cache donated), f32 and Q4_1 bases interleaved: the whole step,
    the Q4_1 step with the stacked kernels sliced per layer (the layout before the in-place layer
    product), and ablations without the vocabulary head and/or the attention (a profiling probe:
    the ablated pieces are swapped out while tracing). ``python -c "from jaxla.benchmarks.quant
    import decode_breakdown as d; d()"``."""
    import contextlib

    from jaxla.models import _generate

    path = specs_models.smollm2_file()
    bases = {"f32": models.load(path).params, "q4_1": models.load(path, keep_quantized=True).params}
    config = models.load(path, keep_quantized=True).config
    s, shape = 116, (config.num_layers, 1, 116, config.num_kv_heads, config.head_dim)
    valid = jnp.ones((1, s), bool)

    @contextlib.contextmanager
    def ablated(attention, head):
        saved = _generate.dot_product_attention, _llama.logits_of
        if not attention:
            _generate.dot_product_attention = lambda q, k, v, **kw: q
        if not head:
            _llama.logits_of = lambda config, p, a, x: x
        try:
            yield
        finally:
            _generate.dot_product_attention, _llama.logits_of = saved

    def loop(in_place, attention, head):
        def run(p, ck, cv, tok):
            def body(i, carry):
                ck, cv, tok = carry
                logits, cache = _generate._decode_step(
                    config, p, {}, tok, jnp.array([84]), {"k": ck, "v": cv}, valid, 84,
                    in_place=in_place)
                return cache["k"], cache["v"], (jnp.argmax(logits, -1) % 100).astype(jnp.int32)
            with ablated(attention, head):
                return jax.lax.fori_loop(0, tokens, body, (ck, cv, tok))
        return jax.jit(run, donate_argnums=(1, 2))

    variants = {}
    for base in bases:
        variants[base, "step"] = loop(True, True, True)
        if base == "q4_1":
            variants[base, "step, kernels sliced per layer"] = loop(False, True, True)
        variants[base, "no head"] = loop(True, True, False)
        variants[base, "no attention"] = loop(True, False, True)
        variants[base, "no head, no attention"] = loop(True, False, False)

    def args():
        return jnp.zeros(shape), jnp.zeros(shape), jnp.array([5], jnp.int32)

    for (base, _), f in variants.items():
        jax.block_until_ready(f(bases[base], *args()))
    wall = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    for _ in range(rounds):
        for k, f in variants.items():
            a = jax.block_until_ready(args())
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(f(bases[k[0]], *a))
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    rows = [{"name": f"decode step {base}: {what}",
             "wall_ms": statistics.median(wall[base, what]) / tokens * 1e3,
             "cpu_ms": statistics.median(cpu[base, what]) / tokens * 1e3, "load": _load()}
            for base, what in variants]
    for row in rows:
        print(json.dumps(row))
    return rows


def head_blocks_probe(lean: bool = True, rounds: int = 7) -> dict:
    """A probe of the row-block decode (``_fused.DECODE_BLOCK_BYTES``): the train step on the f32
    base, on the Q4_1 base as it runs, and on the Q4_1 base with the tied head's table decoded
    whole (the limit raised while tracing), timed interleaved round by round in one process (wall
    and CPU medians), with each compiled step's XLA temp. ``python -c "from
    jaxla.benchmarks.quant import head_blocks_probe as p; p(lean=False)"``."""
    from jaxla.quant import _fused

    path = specs_models.smollm2_file()
    bases = {"f32": models.load(path), "q4_1": models.load(path, keep_quantized=True)}
    fns, args, temp = {}, {}, {}
    for name, base, limit in (("f32", "f32", None), ("q4_1, row blocks", "q4_1", None),
                              ("q4_1, whole decode", "q4_1", 1 << 62)):
        model, saved = bases[base], _fused.DECODE_BLOCK_BYTES
        if limit is not None:
            _fused.DECODE_BLOCK_BYTES = limit
        try:
            step, adapters, state, ids = _step_setup(model, model.params,
                                                     (STEP_BATCH, STEP_TOKENS, STEP_RANK), lean=lean)
            fns[name] = step.lower(model.params, adapters, state, ids).compile()
        finally:
            _fused.DECODE_BLOCK_BYTES = saved
        args[name] = (model.params, adapters, state, ids)
        temp[name] = fns[name].memory_analysis().temp_size_in_bytes / 2**20
    losses = {k: float(jax.block_until_ready(f(*args[k]))[2]) for k, f in fns.items()}
    wall, cpu = {k: [] for k in fns}, {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(f(*args[k]))
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    out = {"lean": lean, "load": _load(), "temp_mib": temp, "loss": losses,
           "wall_s": {k: statistics.median(v) for k, v in wall.items()},
           "cpu_s": {k: statistics.median(v) for k, v in cpu.items()}}
    print(json.dumps(out))
    return out


def load_breakdown(kind: str = "q4_1") -> list[dict]:
    """A profiling probe of what a GGUF load leaves resident, run in a fresh process: the steps of
    ``jaxla.models._gguf.load_gguf`` one at a time (``kind`` ``"q4_1"``: keep_quantized, ``"f32"``:
    decoded), each row the RSS / anonymous memory after it and the peak during it (VmHWM reset
    between steps), then the reader dropped and the allocator trimmed (what ``load_gguf`` now does
    at its end). ``python -c "from jaxla.benchmarks.quant import load_breakdown as b; b('f32')"``."""
    import gc
    from pathlib import Path

    from jaxla.models import _gguf, _registry

    def anonymous() -> int:
        with open("/proc/self/smaps_rollup") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Anonymous:"))

    rows = []

    def row(what):
        rows.append({"name": f"load {kind}: {what}", "rss_mib": _rss_bytes() / 2**20,
                     "anonymous_mib": anonymous() / 2**20, "peak_mib": _peak_rss_bytes() / 2**20})
        print(json.dumps(rows[-1]))
        _reset_peak()

    import gguf  # noqa: F401 - imported by the load, counted in the floor
    import tokenizers  # noqa: F401

    jax.block_until_ready(jnp.ones(8) + 1)
    row("runtime floor (jax, gguf and tokenizers imported)")
    path = Path(specs_models.smollm2_file())
    reader = _gguf._open(path)
    row("GGUFReader (every field parsed)")
    where = str(path)
    meta = _gguf._Metadata(reader, where)
    arch = meta.get("general.architecture", str)
    family = _registry.for_gguf_architecture(arch, where)
    hf = _gguf._hf_config(meta, arch, meta.list_len("tokenizer.ggml.tokens"),
                          tied="output.weight" not in {t.name for t in reader.tensors})
    config = family.config_from_hf(hf)
    source = _gguf._tensor_source(reader, path, arch, config.num_layers, config.num_heads,
                                  config.num_kv_heads)
    params = (_gguf._kept_params(reader, path, config, source, jnp.float32) if kind == "q4_1"
              else family.params_from_hf(config, source, jnp.float32))
    row(f"params ({quant.tree_nbytes(params) / 2**20:.1f} MiB of arrays)")
    tokenizer = _gguf.tokenizer_from_metadata(reader, where)
    row("tokenizer")
    del reader, meta, source
    gc.collect()
    row("reader dropped")
    release_freed_memory()
    row("allocator trimmed (the end of load_gguf)")
    del tokenizer
    release_freed_memory()
    row("tokenizer dropped, trimmed")
    del params
    return rows


_CHILDREN = {"step": _step_child, "decode_off": _decode_off}


def _child(which: str, *args) -> None:
    print(json.dumps(_CHILDREN[which](*args)))


def _child_json(which: str, *args, env: dict | None = None, timeout: float = 900) -> dict | None:
    """Runs ``_CHILDREN[which](*args)`` (literals: strings, numbers, None, bools) in a fresh Python
    process; its JSON line, or None on failure."""
    code = (f"from jaxla.benchmarks.quant import _child; "
            f"_child({', '.join(map(repr, (which, *args)))})")
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=timeout, check=True, env={**os.environ, **(env or {})})
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, KeyError, IndexError):
        return None


def run(*, quick: bool) -> list[dict]:
    dense, q41, label = _bases(quick)
    rows = []
    if not quick and label != "SmolLM2-135M":
        rows.append({"name": f"SmolLM2 not cached (jaxla download {specs_models.SMOLLM2}); "
                             "timing a tiny random model"})
    rows += _bytes_rows(dense, q41)
    rows += _matvec_rows(q41, quick)
    rows += _decode_rows(dense, q41, label, quick)
    rows += _step_rows(dense, q41, label, quick)
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
