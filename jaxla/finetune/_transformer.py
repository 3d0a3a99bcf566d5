"""A tiny decoder-only transformer built only from jaxla parts, and the sequence tasks it learns.

Model: token embedding → ``n_layers`` pre-norm blocks (layer norm → causal multi-head attention with
RoPE → residual; layer norm → GELU MLP → residual) → final layer norm → linear head over the
vocabulary. Every piece is a jaxla function (:func:`jaxla.embed`, :func:`jaxla.layer_norm`,
:func:`jaxla.multi_head_attention`, :func:`jaxla.mlp`, :func:`jaxla.linear`); parameters are a plain
nested dict, so ``jaxla.lora`` finds its targets by path (e.g. ``layers/0/attn/q/w``).

Tasks: a sequence is ``x₁ … xₙ SEP y₁ … yₙ`` over the digits ``0 … V−1`` with ``SEP = V``, where y is x
copied, reversed, sorted, or shifted by one (mod V). The model reads the sequence without its last
token and is scored only on predicting y (teacher forcing); generation prompts with ``x SEP`` and
decodes n tokens greedily with a KV cache (:func:`jaxla.multi_head_attention_decode`).

Dimension legend: B batch, T sequence length (2n), n task length, D model width, V digits,
L cache capacity.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxla

__all__ = [
    "apply",
    "decode_greedy",
    "init",
    "loss_and_accuracy",
    "make_sequences",
    "task_answer",
]

ROPE_THETA = 10000.0
# Sequences are a dozen tokens: the materialised-scores path is the fastest to compile and run.
ATTENTION = "xla"


def init(key: jax.Array, *, vocab: int, d_model: int, n_heads: int, n_layers: int, d_ff: int):
    """Parameters: ``{"embed", "layers": [{"ln1", "attn", "ln2", "mlp"}, ...], "ln_f", "head"}``."""
    keys = jax.random.split(key, n_layers + 2)
    layers = []
    for i in range(n_layers):
        k_attn, k_mlp = jax.random.split(keys[i])
        layers.append({
            "ln1": jaxla.init_layer_norm(d_model),
            "attn": jaxla.init_mha(k_attn, d_model, n_heads),
            "ln2": jaxla.init_layer_norm(d_model),
            "mlp": jaxla.init_mlp(k_mlp, d_model, d_ff),
        })
    return {
        "embed": jaxla.init_embedding(keys[-2], vocab, d_model),
        "layers": layers,
        "ln_f": jaxla.init_layer_norm(d_model),
        "head": jaxla.init_linear(keys[-1], d_model, vocab),
    }


def apply(params: Any, tokens: jax.Array, *, n_heads: int) -> jax.Array:
    """Logits ``(B, T, vocab)`` (float32) for tokens ``(B, T)``, causal over T."""
    h = jaxla.embed(params["embed"], tokens)
    for layer in params["layers"]:
        a = jaxla.multi_head_attention(
            layer["attn"], jaxla.layer_norm(layer["ln1"], h), num_heads=n_heads, is_causal=True,
            rope_theta=ROPE_THETA, implementation=ATTENTION,
        )
        h = h + a
        h = h + jaxla.mlp(layer["mlp"], jaxla.layer_norm(layer["ln2"], h))
    return jaxla.linear(params["head"], jaxla.layer_norm(params["ln_f"], h),
                        preferred_element_type=jnp.float32)


def task_answer(x, task: str, digits: int):
    """The answer y for digits ``x (B, n)`` under ``task``; works on NumPy and JAX arrays alike."""
    if task == "copy":
        return x
    if task == "reverse":
        return x[:, ::-1]
    if task == "sort":
        return jnp.sort(x, axis=1) if isinstance(x, jax.Array) else np.sort(x, axis=1)
    if task == "shift":
        return (x + 1) % digits
    raise ValueError(f"unknown task {task!r}; expected copy, reverse, sort or shift")


def make_sequences(key: jax.Array, task: str, *, batch: int, length: int, digits: int):
    """``(B, 2n + 1)`` int32 sequences ``x SEP y`` for ``task``, drawn from ``key``."""
    x = jax.random.randint(key, (batch, length), 0, digits, dtype=jnp.int32)
    y = task_answer(x, task, digits).astype(jnp.int32)
    sep = jnp.full((batch, 1), digits, jnp.int32)
    return jnp.concatenate([x, sep, y], axis=1)


def loss_and_accuracy(logits: jax.Array, seqs: jax.Array, length: int):
    """Mean cross-entropy over the answer tokens, their accuracy, and whole-answer exact match.

    Args:
      logits: ``(B, 2n, vocab)`` from :func:`apply` on ``seqs[:, :-1]``.
      seqs: ``(B, 2n + 1)``.
      length: n.
    """
    answer_logits = logits[:, length:, :].astype(jnp.float32)  # predictions of y₁ … yₙ
    answer = seqs[:, length + 1:]
    logp = jax.nn.log_softmax(answer_logits, axis=-1)
    nll = -jnp.take_along_axis(logp, answer[..., None], axis=-1)[..., 0]
    correct = jnp.argmax(answer_logits, axis=-1) == answer
    token_acc = jnp.mean(correct.astype(jnp.float32))
    exact = jnp.mean(jnp.all(correct, axis=1).astype(jnp.float32))
    return jnp.mean(nll), token_acc, exact


def decode_greedy(params: Any, prompts: jax.Array, n_new: int, *, n_heads: int) -> jax.Array:
    """Greedy generation with a per-layer KV cache: prefill ``prompts (B, P)``, then one token a step.

    Returns:
      ``(B, n_new)`` int32 generated tokens.
    """
    b, p = prompts.shape
    d_model = params["embed"]["table"].shape[1]
    head_dim = d_model // n_heads
    caches = [jaxla.init_kv_cache(b, p + n_new, n_heads, head_dim) for _ in params["layers"]]

    def forward(tokens, caches):
        h = jaxla.embed(params["embed"], tokens)
        new_caches = []
        for layer, cache in zip(params["layers"], caches, strict=True):
            a, cache = jaxla.multi_head_attention_decode(
                layer["attn"], jaxla.layer_norm(layer["ln1"], h), cache, num_heads=n_heads,
                rope_theta=ROPE_THETA, implementation=ATTENTION,
            )
            h = h + a
            h = h + jaxla.mlp(layer["mlp"], jaxla.layer_norm(layer["ln2"], h))
            new_caches.append(cache)
        logits = jaxla.linear(params["head"], jaxla.layer_norm(params["ln_f"], h[:, -1:, :]))
        return jnp.argmax(logits[:, 0, :], axis=-1).astype(jnp.int32), new_caches

    token, caches = forward(prompts, caches)

    def body(carry, _):
        token, caches = carry
        nxt, caches = forward(token[:, None], caches)
        return (nxt, caches), nxt

    # A scan keeps the program (and its compile time) the size of one decode step.
    _, rest = jax.lax.scan(body, (token, caches), None, length=n_new - 1)
    return jnp.concatenate([token[:, None], rest.T], axis=1)
