"""Text generation with a decoder: one jitted loop over a preallocated key/value cache, and chat
formatting with the model's template.

The cache holds every layer's rotated keys and values, ``{"k": (L, B, S, K, H), "v": (L, B, S, K,
H)}``, beside a (B, S) record of which slots hold real tokens. The prompt is prefilled by the
family's forward (its per-layer keys/values written to slots ``0 .. T - 1``); each decode step then
runs the L layers under ``lax.scan`` for one token per row, writing slot ``T + i`` for all rows.
Prompts of different lengths are left-padded (``attention_mask``), so every row's newest token
sits in the same slot; padding slots are never attended to.

Dimension legend: B batch, T prompt tokens, M new tokens, S = T + M cache slots, L layers,
K kv heads, H head dim, V vocabulary.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxla.attention._api import dot_product_attention
from jaxla.models import _llama
from jaxla.models._family import Model
from jaxla.models._layers import join_layer, layer_adapters, split_in_place

__all__ = ["format_chat", "generate"]


def _decode_step(config, params, adapters, token, position, cache, valid, slot, *, in_place=True):
    """Logits (B, V) for one new token per row at cache ``slot``, and the updated cache.
    ``in_place=False`` scans sliced quantized kernels (the old layout, for the benchmark's probe)."""
    per_layer = layer_adapters(adapters)
    x = _llama.embed_tokens(config, params, token[:, None]).astype(
        params["layers"]["attn_norm"]["scale"].dtype)
    s = cache["k"].shape[2]
    key_slot = jnp.arange(s, dtype=jnp.int32)
    visible = valid & (key_slot <= slot)[None, :]  # (B, S)
    if config.sliding_window is not None:
        # Left padding is contiguous, so slot distance equals position distance among real tokens.
        visible = visible & (key_slot > slot - config.sliding_window)[None, :]
    mask = visible[:, None, None, :]  # (B, 1, 1, S)

    # The fused kernel reads stacked quantized kernels in place (a scanned slice would be copied).
    scanned, kept = (split_in_place(params["layers"], token.shape[0]) if in_place
                     else (params["layers"], {}))

    def step(carry, xs):
        x, ck, cv = carry
        layer, layer_ad, index = xs
        layer = join_layer(layer, kept, index)
        q, k, v = _llama.qkv(config, layer, layer_ad, x, position[:, None])
        ck = jax.lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), (index, 0, slot, 0, 0))
        cv = jax.lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), (index, 0, slot, 0, 0))
        keys = jax.lax.dynamic_index_in_dim(ck, index, 0, keepdims=False).astype(q.dtype)
        values = jax.lax.dynamic_index_in_dim(cv, index, 0, keepdims=False).astype(q.dtype)
        attended = dot_product_attention(q, keys, values, mask=mask)
        return (_llama.finish_layer(config, layer, layer_ad, x, attended), ck, cv), None

    indices = jnp.arange(config.num_layers, dtype=jnp.int32)
    (x, ck, cv), _ = jax.lax.scan(step, (x, cache["k"], cache["v"]),
                                  (scanned, per_layer, indices))
    logits = _llama.logits_of(config, params, adapters, x)[:, 0]
    return logits, {"k": ck, "v": cv}


def _sample(logits, key, temperature, top_p):
    """Greedy at temperature 0; otherwise nucleus sampling from the smallest set of tokens whose
    probability reaches ``top_p`` (always at least the most likely one)."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits.astype(jnp.float32) / temperature
    if top_p < 1.0:
        order = jnp.argsort(-scaled, axis=-1)
        sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)
        choice = jax.random.categorical(key, sorted_logits, axis=-1)
        return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "temperature", "top_p",
                                             "eos_id"))
def _generate(params, adapters, inputs, key, *, config, max_new_tokens, temperature, top_p, eos_id):
    b, t = inputs.input_ids.shape
    logits, (ks, vs) = _llama.run(config, params, inputs, adapters=adapters, return_kv=True,
                                   last_only=True)
    dtype = params["layers"]["attn_norm"]["scale"].dtype
    pad = ((0, 0), (0, 0), (0, max_new_tokens), (0, 0), (0, 0))
    cache = {"k": jnp.pad(ks.astype(dtype), pad), "v": jnp.pad(vs.astype(dtype), pad)}
    mask = inputs.attention_mask
    if mask is None:
        mask = jnp.ones((b, t), bool)
    valid = jnp.pad(mask, ((0, 0), (0, max_new_tokens)), constant_values=True)
    fill = 0 if eos_id is None else eos_id
    first = _sample(logits[:, -1], jax.random.fold_in(key, 0), temperature, top_p)
    out = jnp.full((b, max_new_tokens), fill, jnp.int32).at[:, 0].set(first)
    done = jnp.zeros((b,), bool) if eos_id is None else first == eos_id
    next_position = inputs.positions[:, -1] + 1

    def cond(state):
        i, _, _, done, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, out, cache, done, position = state
        token = out[:, i - 1]
        logits, cache = _decode_step(config, params, adapters, token, position, cache, valid,
                                     t + i - 1)
        new = _sample(logits, jax.random.fold_in(key, i), temperature, top_p)
        new = jnp.where(done, fill, new)
        out = out.at[:, i].set(new)
        if eos_id is not None:
            done = done | (new == eos_id)
        return i + 1, out, cache, done, position + 1

    _, out, _, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), out, cache, done, next_position))
    return out


def generate(config: Any, params: Any, prompt_ids: ArrayLike, *, max_new_tokens: int,
             attention_mask: ArrayLike | None = None, temperature: float = 0.0, top_p: float = 1.0,
             key: jax.Array | None = None, eos_id: int | None = None,
             adapters: Mapping[str, Any] | None = None) -> jax.Array:
    """Continues a batch of prompts with a decoder (one compiled loop per shape and options).

    Dimension legend: B batch, T prompt tokens, M = ``max_new_tokens``.

    Args:
      config, params: a decoder's (``Model.config``, ``Model.params``).
      prompt_ids: int (B, T); prompts of different lengths left-padded.
      max_new_tokens: M >= 1; T + M must not exceed the model's context.
      attention_mask: bool (B, T), True at real tokens; padding must be on the left (the last
        column real in every row). All True by default.
      temperature: 0 for greedy decoding; > 0 samples from ``softmax(logits / temperature)``.
      top_p: nucleus sampling: keep the most likely tokens up to this total probability (0, 1].
      key: a PRNG key, required when ``temperature > 0``.
      eos_id: a row stops after emitting it and emits it from then on; the loop ends when every
        row has stopped. None: always M tokens.
      adapters: ``jaxla.lora`` adapters over ``params``.

    Returns:
      (B, M) int32 new token ids.
    """
    if not isinstance(config, _llama.LlamaConfig):
        raise TypeError(f"generate needs a decoder config (LlamaConfig), got {type(config).__name__}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    inputs = _llama.check_inputs(config, prompt_ids, attention_mask, None)
    t = inputs.input_ids.shape[1]
    if t < 1:
        raise ValueError("prompt_ids must hold at least one token per row")
    if t + max_new_tokens > config.max_position_embeddings:
        raise ValueError(f"the prompt's T={t} tokens plus max_new_tokens={max_new_tokens} exceed the "
                         f"model's context max_position_embeddings={config.max_position_embeddings}")
    mask = None if inputs.attention_mask is None else _llama.concrete(inputs.attention_mask)
    if mask is not None:
        if not bool(np.all(mask[:, -1])):
            raise ValueError("attention_mask must be left-padded for generate: the last column must be "
                             "True in every row")
    temperature = float(temperature)
    top_p = float(top_p)
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature > 0.0 and key is None:
        raise ValueError("sampling (temperature > 0) needs an explicit PRNG key=")
    if eos_id is not None:
        if isinstance(eos_id, bool) or not isinstance(eos_id, (int, np.integer)) or not (
                0 <= eos_id < config.vocab_size):
            raise ValueError(f"eos_id must be a token id in [0, {config.vocab_size}), got {eos_id!r}")
        eos_id = int(eos_id)
    if key is None:
        key = jax.random.key(0)  # unused by greedy decoding
    return _generate(params, adapters or {}, inputs, key, config=config,
                     max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                     eos_id=eos_id)


# ----------------------------------------------------------------------------------------------
# Chat templates.

_DEFAULT_SYSTEM = re.compile(
    r"\{%-?\s*if\s+loop\.first\s+and\s+messages\[0\]\[['\"]role['\"]\]\s*!=\s*['\"]system['\"]\s*-?%\}"
    r"\s*\{\{-?\s*['\"]<\|im_start\|>system(?:\\n|\n)(.*?)<\|im_end\|>(?:\\n|\n)['\"]\s*-?\}\}", re.S)


def _render_jinja(template: str, messages, add_generation_prompt: bool) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages,
                                            add_generation_prompt=add_generation_prompt)


def _render_chatml(template: str, messages, add_generation_prompt: bool) -> str:
    if "<|im_start|>" not in template or "<|im_end|>" not in template:
        raise ValueError("this chat template is not ChatML (<|im_start|>role ... <|im_end|>) and "
                         "jinja2 is not installed to render it; `pip install jinja2`")
    parts = []
    default = _DEFAULT_SYSTEM.search(template)
    if default and messages and messages[0]["role"] != "system":
        system = default.group(1).replace("\\n", "\n")
        parts.append(f"<|im_start|>system\n{system}<|im_end|>\n")
    for m in messages:
        parts.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def format_chat(model_or_template: Model | str, messages: Sequence[Mapping[str, str]], *,
                add_generation_prompt: bool = True) -> str:
    """Renders chat ``messages`` (``[{"role": ..., "content": ...}, ...]``) with a model's chat
    template, as Hugging Face's ``apply_chat_template(..., tokenize=False)`` does.

    With jinja2 installed any template renders (in a sandbox); without it, ChatML templates (SmolLM2,
    Qwen2), including a default system message the template inserts, and a ValueError for others.

    Args:
      model_or_template: a :class:`Model` (its ``chat_template``) or the template text.
      messages: a sequence of dicts with string ``role`` and ``content``.
      add_generation_prompt: end with the assistant's turn header.

    Returns:
      The prompt text (tokenize it with ``model.tokenizer``).
    """
    template = model_or_template.chat_template if isinstance(model_or_template, Model) else (
        model_or_template)
    if not isinstance(template, str):
        raise ValueError("the model has no chat template (Model.chat_template is None)")
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(
                m.get("content"), str):
            raise ValueError(f"messages[{i}] must be a dict with string 'role' and 'content', got {m!r}")
        checked.append({"role": m["role"], "content": m["content"]})
    try:
        import jinja2  # noqa: F401
    except ImportError:
        return _render_chatml(template, checked, add_generation_prompt)
    return _render_jinja(template, checked, add_generation_prompt)
