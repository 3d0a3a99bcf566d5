"""The ``minilm_sentiment`` demo: LoRA on all-MiniLM-L6-v2 regresses human sentiment ratings.

Data: VADER's ``movieReviewSnippets`` ground truth (Hutto & Gilbert, 2014): 10,605 review snippets,
each with the mean of about 20 human ratings on [-4, 4]. The target is that mean valence itself, a
regression, not its sign: the ratings are graded (a snippet at +3.5 is not "as positive" as one at
+0.2), many snippets sit near 0 where the sign is noise, and the reported Pearson r then measures
how well the model orders snippets the way people do.

Split: ``held_out`` examples chosen from ``run.seed`` alone (:func:`jaxla.finetune._text.split`),
never trained on; ``train_examples`` of the rest are the training set of both models:

- the baseline, a *linear probe*: closed-form ridge regression on the frozen sentence embeddings
  (:func:`jaxla.models.embed`, mean-pooled and L2-normalised);
- the *LoRA model*: rank-r adapters on every attention and MLP kernel of the encoder
  (``lora.init(..., stack_axes=1)`` over the stacked layers) plus the linear head, trained together
  on the squared error, the head starting from the probe (linear probing then fine-tuning).

Both are scored by the held-out Pearson r. Sequences are padded to a few bucket lengths; one
compiled step holds one branch per bucket (``lax.switch``) and each step's batch comes from the
precomputed schedule of :func:`jaxla.finetune._text.batch_schedule` (``(seed, epoch)``), so a
resumed run replays an uninterrupted one bit for bit. Token ids are cached in the run directory.

Dimension legend: B batch, T_b bucket length, D embedding width, N_b rows of bucket b, S steps,
E held-out examples.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxla import _files, lora, models, spectral
from jaxla import data as _data
from jaxla.finetune import _checkpoints, _mesh, _runner, _steps, _text
from jaxla.finetune._config import NONNEG, POS, choice
from jaxla.finetune._demo import Demo, MemoryTerm
from jaxla.finetune._errors import ConfigError
from jaxla.models import _download

__all__ = ["DEMO", "MiniLMSentimentConfig", "bucket_lengths", "ridge_fit"]

EVAL_BATCH = 64


@dataclass(frozen=True)
class MiniLMSentimentConfig:
    """The ``[minilm_sentiment]`` section.

    ``model``: a known model name (``jaxla download``) or a Hugging Face BERT directory.
    ``data``: ``"vader-sentiment"`` or a directory of VADER ``*_GroundTruth.txt`` files.
    """

    model: str = "all-minilm-l6-v2"
    data: str = "vader-sentiment"
    corpus: str = field(default="movieReviewSnippets", metadata=choice(*_data.VADER_CORPORA))
    held_out: int = field(default=1000, metadata=POS)
    train_examples: int = field(default=1500, metadata=POS)
    max_length: int = field(default=64, metadata={"check": (lambda v: v >= 2, "a value >= 2")})
    buckets: int = field(default=2, metadata=POS)
    ridge: float = field(default=0.01, metadata=NONNEG)


def bucket_lengths(max_length: int, buckets: int) -> tuple[int, ...]:
    """``buckets`` lengths evenly spaced up to ``max_length``, each rounded up to a multiple of 8."""
    out = []
    for i in range(1, buckets + 1):
        t = min(max_length, -(-math.ceil(max_length * i / buckets) // 8) * 8)
        if not out or t > out[-1]:
            out.append(t)
    return tuple(out)


def ridge_fit(x: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, float]:
    """Closed-form ridge regression ``(w (D,), b)`` minimising ``‖x·w + b − y‖² + lam·N·‖w‖²``.

    In float64; the intercept is not penalised (x and y are centred first).
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    mx, my = x.mean(0), y.mean()
    xc = x - mx
    gram = xc.T @ xc + lam * x.shape[0] * np.eye(x.shape[1])
    w = np.linalg.solve(gram, xc.T @ (y - my))
    return w, float(my - mx @ w)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64) - np.mean(a)
    b = np.asarray(b, np.float64) - np.mean(b)
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / den if den > 0 else float("nan")


def validate(cfg) -> None:
    """Cross-key checks (ConfigError): the LoRA variants the BERT forward applies."""
    if cfg.lora.init not in ("kaiming", "gaussian"):
        raise ConfigError(f"config key lora.init = {cfg.lora.init!r} is not supported by "
                          "minilm_sentiment: expected 'kaiming' or 'gaussian'.")
    for key, value, ok in (("lora.dora", cfg.lora.dora, False), ("lora.dropout", cfg.lora.dropout, 0.0)):
        if value != ok:
            raise ConfigError(f"config key {key} = {value!r} is not supported by minilm_sentiment "
                              f"(the BERT forward applies plain LoRA): expected {ok!r}.")


def _model_dir(cfg) -> Path:
    mc = cfg.minilm_sentiment
    try:
        path = _download.resolve(mc.model)
    except FileNotFoundError as e:
        raise ConfigError(f"config key minilm_sentiment.model = {mc.model!r}: {e}") from None
    if not (path / "config.json").is_file():
        raise ConfigError(f"config key minilm_sentiment.model = {mc.model!r}: no Hugging Face "
                          f"model directory at {path} (for the default run "
                          "`jaxla download all-minilm-l6-v2`).")
    return path


def _data_file(cfg) -> Path:
    mc = cfg.minilm_sentiment
    return _text.vader_file("minilm_sentiment", mc.data, mc.corpus)


def _param_shapes(config: models.BertConfig) -> dict[str, Any]:
    c = config
    L, d, f = c.num_layers, c.hidden_size, c.intermediate_size

    def s(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.float32)

    def lin(i, o):
        return {"w": s(L, i, o), "b": s(L, o)}

    norm = {"scale": s(L, d), "bias": s(L, d)}
    return {
        "embeddings": {"word": s(c.vocab_size, d), "position": s(c.max_position_embeddings, d),
                       "token_type": s(c.type_vocab_size, d), "norm": {"scale": s(d), "bias": s(d)}},
        "layers": {"attn": {k: lin(d, d) for k in "qkvo"}, "attn_norm": norm,
                   "mlp": {"up": lin(d, f), "down": lin(f, d)}, "mlp_norm": norm},
    }


def _read_config(cfg) -> models.BertConfig:
    from jaxla.models import _bert, _hf

    path = _model_dir(cfg) / "config.json"
    try:
        config = _bert.config_from_hf(_hf.read_json(path))
    except ValueError as e:
        raise ConfigError(f"config key minilm_sentiment.model: {e}") from None
    if cfg.minilm_sentiment.max_length > config.max_position_embeddings:
        raise ConfigError(f"config key minilm_sentiment.max_length = "
                          f"{cfg.minilm_sentiment.max_length} is too large: the model takes at most "
                          f"{config.max_position_embeddings} tokens.")
    return config


def preflight(cfg) -> None:
    """The model and data exist, ``lora.targets`` select kernels of the model, ``mesh.model``
    divides its heads (ConfigError)."""
    config = _read_config(cfg)
    _mesh.model_rules(config, cfg.mesh)
    _data_file(cfg)
    shapes = _param_shapes(config)
    _steps.check_lora_targets(
        lambda: lora.init(jax.random.key(0), shapes, rank=cfg.lora.rank, alpha=cfg.lora.alpha,
                          targets=list(cfg.lora.targets), stack_axes=1), cfg.lora.targets)


def memory(cfg) -> list[MemoryTerm]:
    """Rough upper estimate of the bytes a run needs.

    The model (all-MiniLM-L6-v2: 22.7 M float32 parameters) counted three times (the host read,
    the device copy, the loader's temporaries): 0.3 GB. One step: per token of ``B · max_length``
    about 40 activations of width D=384 and 4 of width F=1536 per layer, saved for the backward
    pass and its gradient (×2), 6 layers, float32; the attention scores ``(B, N, T, T)`` per layer
    likewise. The held-out embeddings and token cache are a few MB.
    """
    mc, b = cfg.minilm_sentiment, cfg.train.batch_size
    t = mc.max_length
    per_token = 2 * 4 * 6 * (40 * 384 + 4 * 1536)
    return [
        MemoryTerm("the model, three copies", 3 * 4 * 23_000_000, ("minilm_sentiment.model",)),
        MemoryTerm("one step's activations", b * t * per_token + 2 * 4 * 6 * 12 * b * t * t,
                   ("train.batch_size", "minilm_sentiment.max_length")),
        MemoryTerm("embeddings and tokens", 4 * (mc.held_out + mc.train_examples) * (384 + 2 * t),
                   ("minilm_sentiment.held_out", "minilm_sentiment.train_examples")),
    ]


def _embed_all(ctx, embed_fn, params, adapters, buckets: _text.Buckets, n: int) -> np.ndarray:
    """Embeddings ``(n, D)`` of every bucketed sequence, in input order (fixed-size batches)."""
    out = None
    for ids, mask, index in zip(buckets.ids, buckets.mask, buckets.index, strict=True):
        for start in range(0, ids.shape[0], EVAL_BATCH):
            x, m = ids[start:start + EVAL_BATCH], mask[start:start + EVAL_BATCH]
            k = x.shape[0]
            if k < EVAL_BATCH:  # pad to the batch size: one program per bucket length
                x = np.concatenate([x, np.zeros((EVAL_BATCH - k, x.shape[1]), x.dtype)])
                m = np.concatenate([m, np.zeros((EVAL_BATCH - k, m.shape[1]), bool)])
            e = np.asarray(embed_fn(params, adapters, x, m))[:k]
            if out is None:
                out = np.zeros((n, e.shape[1]), np.float32)
            out[index[start:start + k]] = e
    return out


def run(ctx: _runner.RunContext) -> dict[str, Any]:
    """Probe, LoRA training (resumable), held-out evaluation, adapter and plots."""
    cfg = ctx.config
    mc = cfg.minilm_sentiment
    t_setup = time.perf_counter()
    model_dir, data_file = _model_dir(cfg), _data_file(cfg)
    model = models.load(model_dir)
    if not isinstance(model.config, models.BertConfig) or model.tokenizer is None:
        raise ConfigError(f"config key minilm_sentiment.model = {mc.model!r}: expected a BERT "
                          "encoder with a tokenizer.json")
    texts, valence = _data.vader_sentiment(data_file.parent, corpus=mc.corpus)
    n = len(texts)
    if mc.held_out + 1 > n:
        raise ConfigError(f"config key minilm_sentiment.held_out = {mc.held_out} leaves no "
                          f"training data: the corpus has {n} examples.")
    train_pool, held = _text.split(n, seed=cfg.run.seed, held_out=mc.held_out)
    # The training set: the first train_examples of the pool in a seeded order.
    order = np.random.default_rng([cfg.run.seed, 0x7A11]).permutation(train_pool.size)
    train = np.sort(train_pool[order[:min(mc.train_examples, train_pool.size)]])

    weights_file = model_dir / "model.safetensors"
    model_sha = _text.sha256_file(weights_file) if weights_file.is_file() else "(sharded)"
    data_sha = _text.sha256_file(data_file)
    tok_json = model.tokenizer.to_str()
    import hashlib

    tok_sha = hashlib.sha256(tok_json.encode()).hexdigest()
    seqs = _text.tokenize_cached(model.tokenizer, texts, max_length=mc.max_length,
                                 cache_dir=ctx.out, key=f"{data_sha}|{tok_sha}",
                                 vocab_size=model.config.vocab_size)
    lengths = bucket_lengths(mc.max_length, mc.buckets)
    bt = _text.bucketize([seqs[i] for i in train], lengths)
    bh = _text.bucketize([seqs[i] for i in held], lengths)
    y_train, y_held = valence[train].astype(np.float64), valence[held].astype(np.float64)
    mu, sd = float(y_train.mean()), float(y_train.std()) or 1.0

    config, params = model.config, model.params
    # One compiled program instead of a dozen eager ones.
    adapters0 = ctx.jit(lambda p: lora.init(
        _steps.stream_key(cfg.run.seed, "adapter"), p, rank=cfg.lora.rank, alpha=cfg.lora.alpha,
        targets=list(cfg.lora.targets), init=cfg.lora.init, rslora=cfg.lora.rslora,
        stack_axes=1))(params)
    embed_fn = ctx.jit(lambda p, ads, x, m: models.embed(config, p, x, attention_mask=m,
                                                         adapters=ads))
    # Frozen embeddings (the initial adapters have b = 0: the base model's output exactly).
    e_train0 = _embed_all(ctx, embed_fn, params, adapters0, bt, train.size)
    e_held0 = _embed_all(ctx, embed_fn, params, adapters0, bh, held.size)
    w_probe, b_probe = ridge_fit(e_train0, (y_train - mu) / sd, mc.ridge)
    probe_held = mu + sd * (e_held0 @ w_probe + b_probe)
    probe_train = mu + sd * (e_train0 @ w_probe + b_probe)
    r_probe = _pearson(probe_held, y_held)
    setup_s = time.perf_counter() - t_setup

    # Training: one lax.switch branch per non-empty bucket.
    live = [b for b in range(len(lengths)) if bt.ids[b].shape[0]]
    sched = _text.batch_schedule([bt.ids[b].shape[0] for b in live], steps=cfg.train.steps,
                                 batch_size=cfg.train.batch_size, seed=cfg.run.seed)
    y_std = ((y_train - mu) / sd).astype(np.float32)
    frozen = {
        "params": params,
        "ids": tuple(bt.ids[b] for b in live), "mask": tuple(bt.mask[b] for b in live),
        "y": tuple(y_std[bt.index[b]] for b in live),
        "bucket": sched.bucket, "rows": sched.rows, "weight": sched.weight,
    }
    frozen = jax.device_put(frozen)
    head0 = {"w": jnp.asarray(w_probe, jnp.float32), "b": jnp.asarray(b_probe, jnp.float32)}
    optimizer, schedule = _steps.make_optimizer(cfg.optim, steps=cfg.train.steps)
    optimizer = _steps.adapter_optimizer(optimizer, cfg.lora)

    def init_state(adapters, head):
        trainable = {"lora": adapters, "head": head}
        return {"params": trainable, "opt": optimizer.init(trainable)}

    def batch_fn(frozen, step):
        return frozen["bucket"][step], frozen["rows"][step], frozen["weight"][step]

    def loss_fn(frozen, trainable, batch):
        which, rows, weight = batch

        def branch(j):
            def f(trainable):
                x, m = (_mesh.constrain_batch(frozen[k][j][rows], ctx.mesh) for k in ("ids", "mask"))
                e = models.embed(config, frozen["params"], x, attention_mask=m,
                                 adapters=trainable["lora"])
                return e @ trainable["head"]["w"] + trainable["head"]["b"], frozen["y"][j][rows]
            return f

        pred, y = jax.lax.switch(which, [branch(j) for j in range(len(live))], trainable)
        return jnp.sum(weight * jnp.square(pred - y)) / jnp.maximum(jnp.sum(weight), 1.0)

    res = _runner.train_phase(
        ctx, phase="adapt", init_state=init_state, init_args=(adapters0, head0), frozen=frozen,
        step_fn=_steps.make_step(loss_fn, optimizer, schedule, batch_fn), steps=cfg.train.steps,
        items_per_step=cfg.train.batch_size, rules=_mesh.model_rules(config, cfg.mesh))
    title = (f"minilm_sentiment: {Path(model.source).name} + LoRA r={cfg.lora.rank} on "
             f"{mc.corpus} valence")
    if res.interrupted:
        return _runner.interrupted_summary(ctx, title, res)

    trained = _checkpoints.to_host(res.state["params"])
    e_held1 = _embed_all(ctx, embed_fn, params, trained["lora"], bh, held.size)
    head = {k: np.asarray(v, np.float64) for k, v in trained["head"].items()}
    lora_held = mu + sd * (e_held1 @ head["w"] + head["b"])
    r_lora = _pearson(lora_held, y_held)
    rmse = {k: float(np.sqrt(np.mean((p - y_held) ** 2)))
            for k, p in (("probe", probe_held), ("lora", lora_held))}
    sign_acc = {k: float(np.mean((p > 0) == (y_held > 0)))
                for k, p in (("probe", probe_held), ("lora", lora_held))}
    def project(e):
        fit = spectral.pca(e, 2, solver="full")
        return spectral.pca_transform(fit, e), fit.explained_variance_ratio

    project = ctx.jit(project)
    pcs = {}
    for tag, e in (("before", e_held0), ("after", e_held1)):
        z, ratio = project(jnp.asarray(e))
        pcs[tag] = (np.asarray(z, np.float64), np.asarray(ratio, np.float64))
    pc1_r = {tag: abs(_pearson(z[:, 0], y_held)) for tag, (z, _) in pcs.items()}

    count = lora.count_params(params, trained["lora"])
    lora.save(ctx.out / "adapter.safetensors", trained["lora"],
              config={"demo": "minilm_sentiment", "model": mc.model, "model_sha256": model_sha})
    buf = io.BytesIO()
    np.savez(buf, w=head["w"].astype(np.float32), b=np.float32(head["b"]), mean=np.float32(mu),
             std=np.float32(sd))
    _files.write_atomic(ctx.out / "head.npz", buf.getvalue())
    plots = _write_plots(ctx, pcs, y_held) if cfg.run.plots else []

    sizes = {"corpus": n, "train_pool": int(train_pool.size), "train": int(train.size),
             "held_out": int(held.size)}
    metrics = {
        "pearson_r_probe": r_probe, "pearson_r_lora": r_lora,
        "train_pearson_r_probe": _pearson(probe_train, y_train),
        "rmse": rmse, "sign_accuracy": sign_acc, "pc1_abs_r": pc1_r, "split": sizes,
        "bucket_lengths": list(lengths),
        "bucket_sizes_train": [int(x.shape[0]) for x in bt.ids],
        "epochs": sched.epochs,
        "files": {"model": str(weights_file), "model_sha256": model_sha, "data": str(data_file),
                  "data_sha256": data_sha},
        "trainable_params": count.trainable + int(head["w"].size) + 1,
        "frozen_params": count.frozen, "adapter": _steps.describe_lora(cfg.lora),
        "final_train_loss": res.last_loss, "steps": res.end_step, "setup_s": setup_s,
        "compile_s": res.compile_s, "run_s": res.run_s, "steps_per_s": res.steps_per_s,
    }
    rows = [
        ("model", f"{weights_file} (sha256 {model_sha[:16]}…)"),
        ("data", f"{data_file} (sha256 {data_sha[:16]}…)"),
        ("split", f"{n:,} snippets: {held.size:,} held out (seed {cfg.run.seed}), "
                  f"{train.size:,} of the other {train_pool.size:,} for training"),
        ("buckets", f"lengths {list(lengths)}; training rows "
                    f"{[int(x.shape[0]) for x in bt.ids]}"),
        ("adapter", _steps.describe_lora(cfg.lora) + " + linear head (from the probe)"),
        ("trainable params", f"{metrics['trainable_params']:,} vs {count.frozen:,} frozen "
                             f"({100 * metrics['trainable_params'] / count.frozen:.2f}%)"),
        ("steps", f"{res.end_step}/{cfg.train.steps} ({sched.epochs} epoch(s) started)"),
        ("held-out Pearson r", f"LoRA {r_lora:.4f} vs linear probe (ridge) {r_probe:.4f}"),
        ("held-out RMSE", f"LoRA {rmse['lora']:.4f} vs probe {rmse['probe']:.4f} "
                          f"(valence std {y_held.std():.3f})"),
        ("held-out sign accuracy", f"LoRA {sign_acc['lora']:.3f} vs probe {sign_acc['probe']:.3f}"),
        ("|r(PC1, valence)|", f"before {pc1_r['before']:.3f}, after {pc1_r['after']:.3f}"),
        ("time", f"setup+probe {setup_s:.1f} s, compile {res.compile_s:.1f} s, run "
                 f"{res.run_s:.1f} s ({res.steps_per_s:.2f} steps/s)"),
        ("outputs", f"{ctx.out} (adapter.safetensors, head.npz, tokens.npz, metrics.jsonl"
                    + "".join(", " + p for p in plots) + ")"),
    ]
    return {"title": title, "rows": rows, "metrics": metrics, "interrupted": False}


_BINS = ((-4.0, -2.0, "very negative"), (-2.0, -0.5, "negative"), (-0.5, 0.5, "neutral"),
         (0.5, 2.0, "positive"), (2.0, 4.01, "very positive"))


def _write_plots(ctx, pcs: dict, valence: np.ndarray) -> list[str]:
    """``loss.png`` and ``pca_before.png`` / ``pca_after.png`` (none without matplotlib)."""
    labels = []
    for v in valence:
        labels.append(next(name for lo, hi, name in _BINS if lo <= v < hi))
    try:
        _runner.plot_losses(ctx, ctx.out / "loss.png")
        for tag, (z, ratio) in pcs.items():
            spectral.plot_pca_scatter(z, labels, path=ctx.out / f"pca_{tag}.png",
                                      explained_variance_ratio=ratio,
                                      title=f"Held-out embeddings {tag} LoRA, by human valence")
    except ImportError:
        return []
    return ["loss.png", "pca_before.png", "pca_after.png"]


DEMO = Demo(
    name="minilm_sentiment",
    section=MiniLMSentimentConfig,
    run=run,
    validate=validate,
    preflight=preflight,
    memory=memory,
)
