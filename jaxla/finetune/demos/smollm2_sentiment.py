"""The ``smollm2_sentiment`` demo: QLoRA on SmolLM2-135M-Instruct classifies movie-review sentiment.

Model: SmolLM2-135M-Instruct from its GGUF file, loaded with ``keep_quantized=True``: the Q4_1
kernels (and the Q8_0 embedding table, tied to the output head) stay packed as
:class:`jaxla.quant.QArray` and are decoded inside each compiled program, never kept as float32
copies. LoRA adapters (``lora.init(..., stack_axes=1)`` over the stacked layers) sit on the
attention and MLP kernels q, k, v, o, gate, up, down of every layer: QLoRA.

Data: VADER's ``movieReviewSnippets`` (Hutto & Gilbert, 2014), mean human valence on [-4, 4]; the
snippets with ``|valence| > min_abs_valence`` (0.5: 10,043 of 10,605), labelled by the sign.
A fixed held-out split (``held_out``, from ``run.seed`` alone; :func:`jaxla.finetune._text.split`),
never trained on.

Prompt and loss: ``Review: <text>\\nSentiment:`` and the label token ``" positive"`` or
``" negative"`` (one token each in SmolLM2's vocabulary, checked). Prompts are left-padded, so the
label is predicted from the logits of the last column only (``_llama.run(..., last_only=True)``):
the 49,152-way head is applied to one position per prompt, never to every position. The loss
(``loss = "full_vocab"``, the default) is the cross entropy of the label token over the whole
vocabulary at that position, the issue's "cross entropy of the label token": it keeps the model a
language model whose greedy next token *is* the label, so the generations after training say it.
``loss = "two_way"`` is the cross entropy of the softmax restricted to the two label tokens (a
classifier head; the other tokens' logits are then free). Accuracy, zero-shot or adapted, is the
argmax over the two label tokens either way; the summary also says how often the label tokens are
the model's top-1 token (``label_top1``).

Reports: zero-shot held-out accuracy of the frozen model and of the adapted one on the same
held-out set, confusion matrices, greedy generations of a few held-out prompts before and after,
the accuracy on a fixed held-out subset every ``eval_every`` steps *inside* the compiled step (so a
resumed run logs the same numbers), tokens/s, where the time goes, and
:func:`jaxla.spectral.adapter_report` of every learned ΔW (its norm relative to the dequantized W,
effective and stable ranks). Outputs: the adapter in PEFT format with Hugging Face module names
(``peft/``, :func:`jaxla.models.save_peft`), ``adapter.safetensors``, plots when matplotlib is
installed (loss, subset accuracy over training, singular values of ΔW per layer).

Dimension legend: B batch, T_b bucket length, V vocabulary, L layers, r LoRA rank, E held-out
examples, S steps.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxla import data as _data
from jaxla import lora, models, quant, spectral
from jaxla.finetune import _checkpoints, _mesh, _runner, _steps, _text
from jaxla.finetune._config import NONNEG, POS, choice
from jaxla.finetune._demo import Demo, MemoryTerm
from jaxla.finetune._errors import ConfigError
from jaxla.lora import _targets as lora_targets
from jaxla.models import _download, _llama

__all__ = ["DEMO", "SmolLM2SentimentConfig", "check_prompt", "label_token_ids"]

LABELS = ("positive", "negative")  # class 0, class 1
_MAX_GENERATIONS = 32


def _one_text_slot(v: str) -> bool:
    return v.count("{text}") == 1


@dataclass(frozen=True)
class SmolLM2SentimentConfig:
    """The ``[smollm2_sentiment]`` section.

    ``model``: a known model name (``jaxla download``) or a ``.gguf`` file of a Llama-family decoder
    with quantized kernels. ``data``: ``"vader-sentiment"`` or a directory of VADER
    ``*_GroundTruth.txt`` files. ``prompt`` holds ``{text}`` once; ``positive`` / ``negative`` are
    the label strings that follow it, one token each.
    """

    model: str = "smollm2-135m-instruct"
    data: str = "vader-sentiment"
    corpus: str = field(default="movieReviewSnippets", metadata=choice(*_data.VADER_CORPORA))
    min_abs_valence: float = field(default=0.5, metadata={
        "check": (lambda v: 0 <= v < 4, "a value in [0, 4)")})
    held_out: int = field(default=1000, metadata=POS)
    prompt: str = field(default="Review: {text}\nSentiment:", metadata={
        "check": (_one_text_slot, "a string holding '{text}' exactly once")})
    positive: str = " positive"
    negative: str = " negative"
    loss: str = field(default="full_vocab", metadata=choice("full_vocab", "two_way"))
    max_length: int = field(default=64, metadata={"check": (lambda v: v >= 4, "a value >= 4")})
    buckets: int = field(default=3, metadata=POS)
    # Operational keys (reports only: a run may resume with other values): the batch of the
    # held-out evaluations and the generations after training.
    eval_batch: int = field(default=32, metadata={**POS, "operational": True})
    eval_every: int = field(default=25, metadata=NONNEG)
    eval_subset: int = field(default=128, metadata=POS)
    generations: int = field(default=4, metadata={
        "check": (lambda v: 0 <= v <= _MAX_GENERATIONS, f"an integer in [0, {_MAX_GENERATIONS}]"),
        "operational": True})
    generation_tokens: int = field(default=4, metadata={**POS, "operational": True})


# ----------------------------------------------------------------------------------------------
# Checks and files.


def validate(cfg) -> None:
    """Cross-key checks (ConfigError): the LoRA variants the Llama forward applies."""
    sc = cfg.smollm2_sentiment
    if cfg.lora.init not in ("kaiming", "gaussian"):
        raise ConfigError(f"config key lora.init = {cfg.lora.init!r} is not supported by "
                          "smollm2_sentiment (PiSSA/OLoRA rewrite the base, which stays "
                          "quantized): expected 'kaiming' or 'gaussian'.")
    for key, value, ok in (("lora.dora", cfg.lora.dora, False), ("lora.dropout", cfg.lora.dropout, 0.0)):
        if value != ok:
            raise ConfigError(f"config key {key} = {value!r} is not supported by smollm2_sentiment "
                              f"(the Llama forward applies plain LoRA): expected {ok!r}.")
    if sc.positive == sc.negative:
        raise ConfigError(f"config keys smollm2_sentiment.positive and .negative are both "
                          f"{sc.positive!r}: expected two different label strings.")
    if sc.generation_tokens + sc.max_length > 4096:
        raise ConfigError(f"config key smollm2_sentiment.generation_tokens = "
                          f"{sc.generation_tokens} is too large: expected at most "
                          f"{4096 - sc.max_length} (with max_length {sc.max_length}).")


def _model_file(cfg) -> Path:
    sc = cfg.smollm2_sentiment
    try:
        path = _download.resolve(sc.model)
    except FileNotFoundError as e:
        raise ConfigError(f"config key smollm2_sentiment.model = {sc.model!r}: {e}") from None
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if not found:
            raise ConfigError(f"config key smollm2_sentiment.model = {sc.model!r}: no .gguf file in "
                              f"{path} (for the default run `jaxla download smollm2-135m-instruct`).")
        path = found[0]
    if not path.is_file() or path.suffix != ".gguf":
        raise ConfigError(f"config key smollm2_sentiment.model = {sc.model!r}: expected a .gguf file "
                          f"(a quantized base for QLoRA), got {path}.")
    return path


def _data_file(cfg) -> Path:
    sc = cfg.smollm2_sentiment
    return _text.vader_file("smollm2_sentiment", sc.data, sc.corpus)


def _read_config(path: Path) -> _llama.LlamaConfig:
    """The decoder's config from the GGUF header only (no tensor is read)."""
    from jaxla.models import _gguf, _registry

    where = str(path)
    try:
        reader = _gguf._open(path)
        meta = _gguf._Metadata(reader, where)
        arch = meta.get("general.architecture", str)
        family = _registry.for_gguf_architecture(arch, where)
        names = {t.name for t in reader.tensors}
        vocab = meta.list_len("tokenizer.ggml.tokens") or meta.count(f"{arch}.vocab_size", None)
        config = family.config_from_hf(_gguf._hf_config(meta, arch, vocab,
                                                         tied="output.weight" not in names))
    except (ValueError, OSError) as e:
        raise ConfigError(f"config key smollm2_sentiment.model: {e}") from None
    if not isinstance(config, _llama.LlamaConfig):
        raise ConfigError(f"config key smollm2_sentiment.model: {where} is not a decoder")
    return config


def _targets(cfg) -> list[str]:
    return list(cfg.lora.targets)


def _param_shapes(config: _llama.LlamaConfig) -> dict[str, Any]:
    c = config
    L, d, f = c.num_layers, c.hidden_size, c.intermediate_size
    nh, kh = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim

    def s(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.float32)

    return {"embed": {"table": s(c.vocab_size, d)},
            "layers": {"attn_norm": {"scale": s(L, d)}, "mlp_norm": {"scale": s(L, d)},
                       "attn": {"q": {"w": s(L, d, nh)}, "k": {"w": s(L, d, kh)},
                                "v": {"w": s(L, d, kh)}, "o": {"w": s(L, nh, d)}},
                       "mlp": {"gate": {"w": s(L, d, f)}, "up": {"w": s(L, d, f)},
                               "down": {"w": s(L, f, d)}}},
            "norm": {"scale": s(d)}}


def preflight(cfg) -> None:
    """The model and data exist, the prompt fits the context, ``lora.targets`` select kernels,
    ``mesh.model`` divides the heads (ConfigError)."""
    config = _read_config(_model_file(cfg))
    _mesh.model_rules(config, cfg.mesh)
    _data_file(cfg)
    sc = cfg.smollm2_sentiment
    if sc.max_length + sc.generation_tokens > config.max_position_embeddings:
        raise ConfigError(f"config key smollm2_sentiment.max_length = {sc.max_length} (plus "
                          f"generation_tokens {sc.generation_tokens}) is too large: the model "
                          f"takes at most {config.max_position_embeddings} tokens.")
    shapes = _param_shapes(config)
    _steps.check_lora_targets(
        lambda: lora.init(jax.random.key(0), shapes, rank=cfg.lora.rank, alpha=cfg.lora.alpha,
                          targets=_targets(cfg), stack_axes=1), cfg.lora.targets)


def memory(cfg) -> list[MemoryTerm]:
    """Rough upper estimate of the bytes a run needs.

    The packed model (SmolLM2-135M Q4_1 + its Q8_0 embedding: 98 MB) read twice (file and device
    copy), plus its embedding table decoded to float32 (49,152 × 576 × 4 B) for the lookup and the
    tied head: 0.3 GB. One training step: per token of ``B · max_length`` about 8 activations of
    width D=576, 4 of width F=1536 and the attention row per layer, kept for the backward pass
    (30 layers, float32, ×2 for the gradients), and the layers' kernels decoded to float32 as
    residuals of the backward pass (106 M × 4 B, ×2). An evaluation batch (no gradients) keeps
    one layer's activations live (×4 for XLA's temporaries).
    """
    sc, b = cfg.smollm2_sentiment, cfg.train.batch_size
    t = sc.max_length
    width = 8 * 576 + 4 * 1536
    rows = max(sc.eval_batch, sc.eval_subset if sc.eval_every else 0)
    return [
        MemoryTerm("the packed model and decoded embedding", 2 * 98_000_000 + 4 * 49152 * 576,
                   ("smollm2_sentiment.model",)),
        MemoryTerm("one step's activations", b * t * 2 * 4 * 30 * (width + 9 * t)
                   + 2 * 4 * 106_000_000, ("train.batch_size", "smollm2_sentiment.max_length")),
        MemoryTerm("evaluation batches", 4 * 4 * rows * t * (width + 9 * t),
                   ("smollm2_sentiment.eval_batch", "smollm2_sentiment.eval_subset")),
    ]


# ----------------------------------------------------------------------------------------------
# Prompts and labels.


def check_prompt(prompt: str) -> tuple[str, str]:
    """``(head, tail)`` around the one ``{text}`` of ``prompt`` (ValueError otherwise)."""
    if prompt.count("{text}") != 1:
        raise ValueError(f"prompt must hold '{{text}}' exactly once, got {prompt!r}")
    head, tail = prompt.split("{text}")
    return head, tail


def label_token_ids(tokenizer: Any, tail: str, labels: tuple[str, str]) -> tuple[int, int]:
    """The token id of each label string; ConfigError unless each is one token, the two differ,
    and each stays that one token after the prompt (tokenizing ``tail + label`` gives
    ``tail ids + [label id]``)."""
    tail_ids = tokenizer.encode(tail).ids if tail else []
    ids = []
    for key, text in zip(("positive", "negative"), labels, strict=True):
        got = tokenizer.encode(text).ids
        if len(got) != 1:
            raise ConfigError(f"config key smollm2_sentiment.{key} = {text!r} is {len(got)} tokens "
                              f"({got[:8]}) in this tokenizer: expected a string that is exactly "
                              "one token (e.g. ' positive' in SmolLM2's vocabulary).")
        ids.append(int(got[0]))
        joined = tokenizer.encode(tail + text).ids
        if joined != [*tail_ids, ids[-1]]:
            raise ConfigError(f"config key smollm2_sentiment.{key} = {text!r} does not stay one "
                              f"token after the prompt's end {tail!r} (together they tokenize to "
                              f"{joined[:8]}): expected a label that starts a new token, e.g. "
                              "with a leading space.")
    if ids[0] == ids[1]:
        raise ConfigError(f"config keys smollm2_sentiment.positive/negative = {labels!r} are the same "
                          f"token {ids[0]}: expected two different tokens.")
    return ids[0], ids[1]


class _Prompts(NamedTuple):
    """Tokenized prompts: ids ending with the prompt's tail, and how many were cut."""

    seqs: list[np.ndarray]
    truncated: int
    tokens: int


def _tokenize_prompts(ctx, tokenizer, texts: list[str], sc, key: str, vocab_size: int) -> _Prompts:
    """Each prompt's ids: ``head + text`` (cut to fit) then the tail's ids.

    The head and text are tokenized together (cached in the run directory, keyed by ``key``), the
    tail apart and appended, so a long review loses its end, never the ``\\nSentiment:`` that the
    label follows. On VADER every whole prompt tokenizes to exactly these ids (the tail starts at a
    pre-token boundary).
    """
    head, tail = check_prompt(sc.prompt)
    tail_ids = np.asarray(tokenizer.encode(tail).ids, np.int32) if tail else np.zeros(0, np.int32)
    room = sc.max_length - tail_ids.size
    if room < 2:
        raise ConfigError(f"config key smollm2_sentiment.max_length = {sc.max_length} leaves "
                          f"{room} token(s) for the review after the prompt's tail of "
                          f"{tail_ids.size}: expected at least {tail_ids.size + 2}.")
    heads = [head + t for t in texts]
    seqs = _text.tokenize_cached(tokenizer, heads, max_length=room, cache_dir=ctx.out,
                                 key=f"{key}|{tail_ids.tolist()}", vocab_size=vocab_size)
    full = [np.concatenate([s, tail_ids]) for s in seqs]
    # The truncation count: prompts whose head + text reached the room (re-tokenizing is cheap
    # for those few only).
    at_limit = [i for i, s in enumerate(seqs) if s.size == room]
    truncated = sum(len(tokenizer.encode(heads[i]).ids) > room for i in at_limit)
    return _Prompts(full, int(truncated), int(sum(s.size for s in full)))


# ----------------------------------------------------------------------------------------------
# The model's scores at the label position.


def _last_logits(config, params, adapters, ids, mask) -> jax.Array:
    """(B, V) float32 logits of the last column of left-padded (B, T) prompts."""
    inputs = _llama.check_inputs(config, ids, mask, None)
    return _llama.run(config, params, inputs, adapters=adapters, last_only=True)[:, 0]


def _scores(config, label_ids, params, adapters, ids, mask):
    """``(two label logits (B, 2), logsumexp over V (B,), top-1 token is a label (B,))``."""
    logits = _last_logits(config, params, adapters, ids, mask)
    pair = logits[:, jnp.asarray(label_ids)]
    top = jnp.argmax(logits, axis=-1)
    is_label = (top == label_ids[0]) | (top == label_ids[1])
    return pair, jax.nn.logsumexp(logits, axis=-1), is_label


def _label_loss(config, label_ids, kind, params, adapters, ids, mask, y, weight) -> jax.Array:
    """Mean cross entropy of the label token (class ``y`` ∈ {0, 1}) over the weighted rows."""
    logits = _last_logits(config, params, adapters, ids, mask)
    pair = logits[:, jnp.asarray(label_ids)]
    norm = jax.nn.logsumexp(logits if kind == "full_vocab" else pair, axis=-1)
    ce = norm - jnp.take_along_axis(pair, y[:, None], axis=1)[:, 0]
    return jnp.sum(weight * ce) / jnp.maximum(jnp.sum(weight), 1.0)


class _Eval(NamedTuple):
    """Held-out results of one adapter set (E examples)."""

    pred: np.ndarray       # (E,) predicted class (argmax over the two label tokens)
    margin: np.ndarray     # (E,) logit(positive) - logit(negative)
    loss: float            # mean full-vocabulary cross entropy of the label token
    label_top1: float      # fraction whose top-1 token over V is a label token
    label_mass: float      # mean probability of the two label tokens together
    seconds: float
    tokens: int            # padded tokens run


def _evaluate(score_fn, params, adapters, buckets: _text.Buckets, y: np.ndarray, batch: int) -> _Eval:
    """Scores every held-out prompt in fixed-size batches (one program per bucket length)."""
    t0 = time.perf_counter()
    n = y.size
    pair = np.zeros((n, 2), np.float64)
    lse = np.zeros(n, np.float64)
    top = np.zeros(n, bool)
    tokens = 0
    for ids, mask, index in zip(buckets.ids, buckets.mask, buckets.index, strict=True):
        for start in range(0, ids.shape[0], batch):
            x, m = ids[start:start + batch], mask[start:start + batch]
            k = x.shape[0]
            if k < batch:  # pad to the batch size (rows of padding only: their scores are dropped)
                x = np.concatenate([x, np.zeros((batch - k, x.shape[1]), x.dtype)])
                m = np.concatenate([m, np.ones((batch - k, m.shape[1]), bool)])
            p, s, t = jax.device_get(score_fn(params, adapters, x, m))
            rows = index[start:start + k]
            pair[rows], lse[rows], top[rows] = p[:k], s[:k], t[:k]
            tokens += x.size
    pred = (pair[:, 1] > pair[:, 0]).astype(np.int64)
    true = pair[np.arange(n), y]
    mass = np.exp(pair - lse[:, None]).sum(1)
    return _Eval(pred, pair[:, 0] - pair[:, 1], float(np.mean(lse - true)), float(top.mean()),
                 float(mass.mean()), time.perf_counter() - t0, tokens)


def _confusion(y: np.ndarray, pred: np.ndarray) -> list[list[int]]:
    """2×2 counts: rows the true class (positive, negative), columns the predicted one."""
    return [[int(np.sum((y == i) & (pred == j))) for j in range(2)] for i in range(2)]


def _generate(config, params, tokenizer, adapters_list, seqs: list[np.ndarray], m: int
              ) -> list[list[str]]:
    """Greedy continuations (``m`` tokens) of ``seqs`` under each adapter set (one program)."""
    width = max(s.size for s in seqs)
    ids = np.zeros((len(seqs), width), np.int32)
    mask = np.zeros((len(seqs), width), bool)
    for r, s in enumerate(seqs):
        ids[r, width - s.size:] = s
        mask[r, width - s.size:] = True
    out = []
    for ads in adapters_list:
        new = np.asarray(models.generate(config, params, ids, attention_mask=mask, max_new_tokens=m,
                                         adapters=ads))
        out.append([tokenizer.decode(row.tolist(), skip_special_tokens=False) for row in new])
    return out


# ----------------------------------------------------------------------------------------------
# ΔW of the learned adapters.


def _delta_report(adapters, params, *, top_k: int):
    """Per adapted kernel (L stacked layers): ΔW's singular values (L, r), effective and stable
    ranks (L,), suggested rank (L,), and ‖ΔW‖_F / ‖W‖_F (L,) with W decoded inside the program."""
    leaves = dict(lora_targets.flatten_with_paths(params))
    out = {}
    for path, ad in adapters.items():
        def one(a, b, ad=ad):
            r = spectral.adapter_report(None, a=a, b=b, scale=ad.scale, top_k=top_k)
            return r.singular_values, r.effective_rank, r.stable_rank, r.suggested_rank

        s, eff, stable, suggested = jax.vmap(one)(ad.a, ad.b)
        w = leaves[path]
        w = quant.dequantize(w) if quant.is_qarray(w) else w
        w_norm = jnp.sqrt(jnp.sum(jnp.square(w.astype(jnp.float32)), axis=(-2, -1)))
        rel = jnp.sqrt(jnp.sum(s * s, axis=-1)) / jnp.maximum(w_norm, 1e-30)
        out[path] = {"singular_values": s, "effective_rank": eff, "stable_rank": stable,
                     "suggested_rank": suggested, "relative_norm": rel}
    return out


def _short(path: str) -> str:
    return path.removeprefix("layers/").removesuffix("/w")


# ----------------------------------------------------------------------------------------------
# The run.


def run(ctx: _runner.RunContext) -> dict[str, Any]:
    """Zero-shot evaluation, QLoRA training (resumable), evaluation, generations, report, outputs."""
    cfg = ctx.config
    sc = cfg.smollm2_sentiment
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    model_file, data_file = _model_file(cfg), _data_file(cfg)
    try:
        model = models.load(model_file, keep_quantized=True)
    except ValueError as e:
        raise ConfigError(f"config key smollm2_sentiment.model: {e}") from None
    config, params, tokenizer = model.config, model.params, model.tokenizer
    if not isinstance(config, models.LlamaConfig) or tokenizer is None:
        raise ConfigError(f"config key smollm2_sentiment.model = {sc.model!r}: expected a "
                          "Llama-family decoder GGUF with tokenizer metadata.")
    adapters_shape = jax.eval_shape(lambda: lora.init(
        jax.random.key(0), params, rank=cfg.lora.rank, alpha=cfg.lora.alpha,
        targets=_targets(cfg), stack_axes=1))
    leaves = dict(lora_targets.flatten_with_paths(params))
    plain = sorted(p for p in adapters_shape if not quant.is_qarray(leaves[p]))
    if plain:
        raise ConfigError(f"config key smollm2_sentiment.model = {sc.model!r}: the kernels "
                          f"{plain[:3]} are not quantized in {model_file.name}: this QLoRA demo "
                          "needs a GGUF whose adapted kernels are Q4/Q8 blocks (e.g. Q4_1).")
    head, tail = check_prompt(sc.prompt)
    label_ids = label_token_ids(tokenizer, tail, (sc.positive, sc.negative))

    texts_all, valence_all = _data.vader_sentiment(data_file.parent, corpus=sc.corpus)
    keep = np.flatnonzero(np.abs(valence_all) > sc.min_abs_valence)
    texts = [texts_all[i] for i in keep]
    y_all = (valence_all[keep] < 0).astype(np.int32)  # 0 positive, 1 negative
    n = len(texts)
    if n < 2 or sc.held_out >= n:
        raise ConfigError(f"config key smollm2_sentiment.held_out = {sc.held_out} leaves no training "
                          f"data: {n} snippets have |valence| > {sc.min_abs_valence}; expected "
                          f"held_out <= {n - 1}.")
    train, held = _text.split(n, seed=cfg.run.seed, held_out=sc.held_out)
    model_sha = _text.sha256_file(model_file)
    data_sha = _text.sha256_file(data_file)
    tok_sha = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()
    prompts = _tokenize_prompts(ctx, tokenizer, texts, sc,
                                f"{data_sha}|{tok_sha}|{sc.corpus}|{sc.min_abs_valence!r}|{head}",
                                config.vocab_size)
    lengths = _text.fit_bucket_lengths([prompts.seqs[i].size for i in train], sc.buckets)
    if max(prompts.seqs[i].size for i in held) > lengths[-1]:
        lengths = _text.fit_bucket_lengths([s.size for s in prompts.seqs], sc.buckets)
    bt = _text.bucketize([prompts.seqs[i] for i in train], lengths, pad_side="left")
    bh = _text.bucketize([prompts.seqs[i] for i in held], lengths, pad_side="left")
    y_train, y_held = y_all[train], y_all[held]
    # The subset scored during training: the first eval_subset held-out prompts in a seeded order.
    sub = np.sort(np.random.default_rng([cfg.run.seed, 0x5AB5]).permutation(held.size)[
        :min(sc.eval_subset, held.size)])
    bs = _text.bucketize([prompts.seqs[held[i]] for i in sub], lengths, pad_side="left")
    y_sub = y_held[sub]
    times["load model, data, tokenize"] = time.perf_counter() - t0

    adapters0 = ctx.jit(lambda p: lora.init(
        _steps.stream_key(cfg.run.seed, "adapter"), p, rank=cfg.lora.rank, alpha=cfg.lora.alpha,
        targets=_targets(cfg), init=cfg.lora.init, rslora=cfg.lora.rslora, stack_axes=1))(params)
    score_fn = ctx.jit(lambda p, ads, x, m: _scores(config, label_ids, p, ads, x, m))
    # The initial adapters have b = 0: the frozen model's scores exactly.
    zero = _evaluate(score_fn, params, adapters0, bh, y_held, sc.eval_batch)
    times["zero-shot held-out eval (compile included)"] = zero.seconds

    # Training: one lax.switch branch per non-empty bucket; the held-out subset every eval_every.
    live = [b for b in range(len(lengths)) if bt.ids[b].shape[0]]
    sched = _text.batch_schedule([bt.ids[b].shape[0] for b in live], steps=cfg.train.steps,
                                 batch_size=cfg.train.batch_size, seed=cfg.run.seed)
    sub_live = [b for b in range(len(lengths)) if bs.ids[b].shape[0]]
    frozen = jax.device_put({
        "params": params,
        "ids": tuple(bt.ids[b] for b in live), "mask": tuple(bt.mask[b] for b in live),
        "y": tuple(y_train[bt.index[b]] for b in live),
        "bucket": sched.bucket, "rows": sched.rows, "weight": sched.weight,
        "sub_ids": tuple(bs.ids[b] for b in sub_live), "sub_mask": tuple(bs.mask[b] for b in sub_live),
        "sub_y": tuple(y_sub[bs.index[b]] for b in sub_live),
    })
    optimizer, schedule = _steps.make_optimizer(cfg.optim, steps=cfg.train.steps)
    optimizer = _steps.adapter_optimizer(optimizer, cfg.lora)

    def init_state(adapters):
        return {"params": adapters, "opt": optimizer.init(adapters),
                "eval": {"step": jnp.int32(-1), "accuracy": jnp.float32(0.0)}}

    def batch_fn(frozen, step):
        return frozen["bucket"][step], frozen["rows"][step], frozen["weight"][step]

    def loss_fn(frozen, adapters, batch):
        which, rows, weight = batch

        def branch(j):
            def f(adapters):
                return _label_loss(config, label_ids, sc.loss, frozen["params"], adapters,
                                   _mesh.constrain_batch(frozen["ids"][j][rows], ctx.mesh),
                                   _mesh.constrain_batch(frozen["mask"][j][rows], ctx.mesh),
                                   frozen["y"][j][rows], weight)
            return f

        return jax.lax.switch(which, [branch(j) for j in range(len(live))], adapters)

    def subset_accuracy(frozen, adapters):
        correct = jnp.float32(0.0)
        for j in range(len(sub_live)):
            pair, _, _ = _scores(config, label_ids, frozen["params"], adapters,
                                 frozen["sub_ids"][j], frozen["sub_mask"][j])
            pred = (pair[:, 1] > pair[:, 0]).astype(jnp.int32)
            correct = correct + jnp.sum((pred == frozen["sub_y"][j]).astype(jnp.float32))
        return correct / sub.size

    inner = _steps.make_step(loss_fn, optimizer, schedule, batch_fn)

    def step_fn(state, frozen, step):
        # The subset accuracy of the adapters *before* this step's update, carried in the state
        # so every step reports the latest measurement (and a resumed run the same ones).
        if sc.eval_every:
            due = step % sc.eval_every == 0
            accuracy = jax.lax.cond(due, lambda: subset_accuracy(frozen, state["params"]),
                                    lambda: state["eval"]["accuracy"])
            measured = jnp.where(due, step, state["eval"]["step"])
        else:
            accuracy, measured = state["eval"]["accuracy"], state["eval"]["step"]
        new, metrics = inner({"params": state["params"], "opt": state["opt"]}, frozen, step)
        metrics = {**metrics, "subset_accuracy": accuracy,
                   "subset_accuracy_step": measured.astype(jnp.float32)}
        return {**new, "eval": {"step": measured, "accuracy": accuracy}}, metrics

    res = _runner.train_phase(
        ctx, phase="adapt", init_state=init_state, init_args=(adapters0,), frozen=frozen,
        step_fn=step_fn, steps=cfg.train.steps, items_per_step=cfg.train.batch_size,
        rules=_mesh.model_rules(config, cfg.mesh))
    title = (f"smollm2_sentiment: {model_file.name} (quantized base) + LoRA r={cfg.lora.rank} "
             f"on {sc.corpus} sentiment")
    if res.interrupted:
        return _runner.interrupted_summary(ctx, title, res)
    times["training step compile"] = res.compile_s
    times["training steps"] = res.run_s

    trained = _checkpoints.to_host(res.state["params"])
    final = _evaluate(score_fn, params, trained, bh, y_held, sc.eval_batch)
    times["final held-out eval"] = final.seconds

    t1 = time.perf_counter()
    gen_rows: list[dict[str, Any]] = []
    if sc.generations:
        picked = list(range(min(sc.generations, held.size)))
        before, after = _generate(config, params, tokenizer, [adapters0, trained],
                                       [prompts.seqs[held[i]] for i in picked], sc.generation_tokens)
        for k, i in enumerate(picked):
            gen_rows.append({"text": texts[held[i]], "label": LABELS[int(y_held[i])],
                             "before": before[k], "after": after[k]})
    times["generations (compile included)"] = time.perf_counter() - t1

    t1 = time.perf_counter()
    report = jax.device_get(ctx.jit(lambda ads, p: _delta_report(ads, p, top_k=cfg.lora.rank))(
        trained, params))
    times["ΔW report"] = time.perf_counter() - t1

    t1 = time.perf_counter()
    lora.save(ctx.out / "adapter.safetensors", trained,
              config={"demo": "smollm2_sentiment", "model": sc.model, "model_sha256": model_sha})
    models.save_peft(model, trained, ctx.out / "peft", base_model="HuggingFaceTB/SmolLM2-135M-Instruct"
                     if model_file.name.startswith("SmolLM2-135M-Instruct") else None)
    curve = _subset_curve(ctx, cfg.train.steps, final, y_held, sub)
    plots = _write_plots(ctx, report, curve, config.num_layers) if cfg.run.plots else []
    times["outputs"] = time.perf_counter() - t1

    count = lora.count_params(params, trained)
    total_params = count.frozen + count.trainable
    packed = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(params))
    acc0 = float(np.mean(zero.pred == y_held))
    acc1 = float(np.mean(final.pred == y_held))
    train_tokens = int(sum(lengths[live[b]] for b in sched.bucket[res.start_step:res.end_step])
                       * cfg.train.batch_size)
    real_train_tokens = int(sum(
        bt.mask[live[b]][r[w > 0]].sum()
        for b, r, w in zip(sched.bucket[res.start_step:res.end_step],
                           sched.rows[res.start_step:res.end_step],
                           sched.weight[res.start_step:res.end_step], strict=True)))
    tok_s_train = train_tokens / res.run_s if res.run_s > 0 else float("nan")
    tok_s_eval = final.tokens / final.seconds if final.seconds > 0 else float("nan")
    moved = sorted(((float(r), _short(p), layer) for p, rep in report.items()
                    for layer, r in enumerate(rep["relative_norm"])), reverse=True)
    per_module = {_short(p): {"relative_norm_mean": float(np.mean(rep["relative_norm"])),
                              "relative_norm_max_layer": int(np.argmax(rep["relative_norm"])),
                              "effective_rank_mean": float(np.mean(rep["effective_rank"])),
                              "stable_rank_mean": float(np.mean(rep["stable_rank"])),
                              "suggested_rank_mean": float(np.mean(rep["suggested_rank"]))}
                  for p, rep in report.items()}
    by_layer = np.zeros(config.num_layers)
    for rep in report.values():
        by_layer += np.asarray(rep["relative_norm"], np.float64) ** 2
    by_layer = np.sqrt(by_layer / len(report))
    sizes = {"corpus": len(texts_all), "labelled": n, "train": int(train.size),
             "held_out": int(held.size), "eval_subset": int(sub.size),
             "positive_fraction_held_out": float(np.mean(y_held == 0))}
    total_s = sum(times.values())
    metrics = {
        "accuracy_zero_shot": acc0, "accuracy_adapted": acc1,
        "confusion_zero_shot": _confusion(y_held, zero.pred),
        "confusion_adapted": _confusion(y_held, final.pred),
        "label_loss_zero_shot": zero.loss, "label_loss_adapted": final.loss,
        "label_top1_zero_shot": zero.label_top1, "label_top1_adapted": final.label_top1,
        "label_mass_zero_shot": zero.label_mass, "label_mass_adapted": final.label_mass,
        "subset_accuracy_curve": {"steps": curve[0], "accuracy": curve[1]},
        "generations": gen_rows,
        "label_tokens": {"positive": [sc.positive, label_ids[0]],
                         "negative": [sc.negative, label_ids[1]]},
        "loss": sc.loss, "split": sizes, "bucket_lengths": list(lengths),
        "bucket_sizes_train": [int(x.shape[0]) for x in bt.ids],
        "prompts_truncated": prompts.truncated, "prompt_tokens": prompts.tokens,
        "epochs": sched.epochs,
        "files": {"model": str(model_file), "model_sha256": model_sha, "data": str(data_file),
                  "data_sha256": data_sha},
        "base_bytes": int(packed), "base_float32_bytes": int(4 * count.frozen),
        "trainable_params": count.trainable, "frozen_params": count.frozen,
        "trainable_fraction": count.trainable / total_params,
        "adapter": _steps.describe_lora(cfg.lora),
        "delta_w": {"per_module": per_module, "per_layer_relative_norm": by_layer.tolist(),
                    "top": [{"module": m, "layer": layer, "relative_norm": r}
                            for r, m, layer in moved[:10]]},
        "final_train_loss": res.last_loss, "steps": res.end_step,
        "train_tokens_per_s": tok_s_train, "train_real_tokens": real_train_tokens,
        "eval_tokens_per_s": tok_s_eval, "times_s": times,
        "compile_s": res.compile_s, "run_s": res.run_s, "steps_per_s": res.steps_per_s,
    }

    def conf(c):
        return f"[[{c[0][0]}, {c[0][1]}], [{c[1][0]}, {c[1][1]}]]"

    rows = [
        ("model", f"{model_file} (sha256 {model_sha[:16]}…), base kept quantized: "
                  f"{packed / 2**20:.1f} MiB packed"),
        ("data", f"{data_file} (sha256 {data_sha[:16]}…)"),
        ("split", f"{len(texts_all):,} snippets, {n:,} with |valence| > {sc.min_abs_valence:g}: "
                  f"{held.size:,} held out (seed {cfg.run.seed}, "
                  f"{100 * sizes['positive_fraction_held_out']:.1f}% positive), "
                  f"{train.size:,} for training"),
        ("prompt", f"{sc.prompt!r} + label {sc.positive!r} (id {label_ids[0]}) / {sc.negative!r} "
                   f"(id {label_ids[1]}); {prompts.truncated} prompt(s) cut to {sc.max_length} tokens"),
        ("buckets", f"left-padded lengths {list(lengths)}; training rows "
                    f"{[int(x.shape[0]) for x in bt.ids]}"),
        ("adapter", _steps.describe_lora(cfg.lora) + f" on {len(trained)} kernels × "
                    f"{config.num_layers} layers"),
        ("trainable params", f"{count.trainable:,} vs {count.frozen:,} frozen "
                             f"({100 * metrics['trainable_fraction']:.3f}%)"),
        ("loss", f"{sc.loss}: cross entropy of the label token at the last position"
                 + (" over the whole vocabulary" if sc.loss == "full_vocab" else
                    " over the two label tokens")),
        ("steps", f"{res.end_step}/{cfg.train.steps} ({sched.epochs} epoch(s) started), final "
                  f"train loss {res.last_loss:.4f}"),
        ("held-out accuracy", f"adapted {acc1:.4f} vs zero-shot {acc0:.4f} "
                              f"({held.size:,} snippets; argmax over the two label tokens)"),
        ("confusion (rows true +/-)", f"zero-shot {conf(metrics['confusion_zero_shot'])}, adapted "
                                      f"{conf(metrics['confusion_adapted'])}"),
        ("label token is top-1", f"adapted {final.label_top1:.3f} vs zero-shot "
                                 f"{zero.label_top1:.3f} (mass {final.label_mass:.3f} vs "
                                 f"{zero.label_mass:.3f})"),
        ("held-out label CE", f"adapted {final.loss:.4f} vs zero-shot {zero.loss:.4f}"),
        ("subset accuracy", " ".join(f"{s}:{a:.3f}" for s, a in zip(*curve, strict=True))),
    ]
    for k, g in enumerate(gen_rows):
        rows.append((f"generation {k + 1} ({g['label']})",
                     f"{g['text'][:50]!r}… → before {g['before']!r}, after {g['after']!r}"))
    rows += [
        ("ΔW moved most", ", ".join(f"{m} L{layer} {r:.2e}" for r, m, layer in moved[:5])
         + " (‖ΔW‖/‖W‖)"),
        ("ΔW per module", ", ".join(f"{m} {v['relative_norm_mean']:.2e} (eff. rank "
                                    f"{v['effective_rank_mean']:.2f})" for m, v in per_module.items())),
        ("ΔW by layer", f"first {by_layer[0]:.2e}, middle {by_layer[len(by_layer) // 2]:.2e}, "
                        f"last {by_layer[-1]:.2e} (rms over modules of ‖ΔW‖/‖W‖)"),
        ("tokens/s", f"training {tok_s_train:,.0f} (padded; {real_train_tokens:,} real tokens "
                     f"in {res.run_s:.1f} s), evaluation {tok_s_eval:,.0f}"),
        ("time", ", ".join(f"{k} {v:.1f} s" for k, v in times.items()) + f"; total {total_s:.1f} s"),
        ("outputs", f"{ctx.out} (peft/, adapter.safetensors, tokens.npz, metrics.jsonl"
                    + "".join(", " + p for p in plots) + ")"),
    ]
    return {"title": title, "rows": rows, "metrics": metrics, "interrupted": False}


def _subset_curve(ctx, steps: int, final: _Eval, y_held: np.ndarray, sub: np.ndarray
                  ) -> tuple[list[int], list[float]]:
    """(steps, subset accuracy) measured during training, then the final adapters' on the subset."""
    seen: dict[int, float] = {}
    for r in ctx.metrics.records():
        if r.get("phase") == "adapt" and r.get("subset_accuracy_step", -1) >= 0:
            seen[int(r["subset_accuracy_step"])] = float(r["subset_accuracy"])
    seen[steps] = float(np.mean(final.pred[sub] == y_held[sub]))
    keys = sorted(seen)
    return keys, [seen[k] for k in keys]


def _write_plots(ctx, report, curve, num_layers: int) -> list[str]:
    """``loss.png``, ``accuracy.png`` and ``singular_values_<module>.png`` (none without
    matplotlib); the spectra of ΔW of about six evenly spaced layers per module."""
    try:
        _runner.plot_losses(ctx, ctx.out / "loss.png")
        spectral.plot_training_curves({"held-out subset": (np.asarray(curve[0]),
                                                            np.asarray(curve[1]))},
                                      path=ctx.out / "accuracy.png", log=False,
                                      ylabel="accuracy", title="Held-out subset accuracy")
        names = ["loss.png", "accuracy.png"]
        layers = sorted(set(np.linspace(0, num_layers - 1, min(6, num_layers)).round().astype(int)))
        for path, rep in report.items():
            name = f"singular_values_{_short(path).replace('/', '_')}.png"
            s = np.asarray(rep["singular_values"], np.float64)
            spectral.plot_singular_values({f"layer {i}": s[i] for i in layers},
                                          path=ctx.out / name,
                                          title=f"Singular values of ΔW, {_short(path)}")
            names.append(name)
    except ImportError:
        return []
    return names


DEMO = Demo(
    name="smollm2_sentiment",
    section=SmolLM2SentimentConfig,
    run=run,
    validate=validate,
    preflight=preflight,
    memory=memory,
)
