"""The Llama family: Llama 2/3, SmolLM, Qwen2 and Mistral decoders as one config-driven forward.

Pre-norm decoder blocks: ``x += o(attn(rope(q(n1(x))), rope(k(n1(x))), v(n1(x))))`` then
``x += down(silu(gate(n2(x))) * up(n2(x)))`` with RMSNorm ``n1``, ``n2``; grouped-query attention;
rotary embeddings in the rotate-half layout of Hugging Face's Llama (GGUF files, stored permuted by
llama.cpp, are un-permuted by :mod:`jaxla.models._gguf`). The variants differ only by config:
q/k/v biases (Qwen2), a sliding attention window (Mistral), tied input/output embeddings (SmolLM),
Llama 3's RoPE frequency scaling.

Parameters (``D`` model width, ``F`` MLP width, ``N``/``K`` query/kv heads of ``H``, ``V``
vocabulary, ``L`` layers; ``"b"`` entries only where the config has biases)::

    {"embed": {"table": (V, D)},
     "layers": {"attn_norm": {"scale": (L, D)},
                "attn": {"q": {"w": (L, D, N·H), "b": (L, N·H)}, "k": {"w": (L, D, K·H)},
                         "v": {"w": (L, D, K·H)}, "o": {"w": (L, N·H, D)}},
                "mlp_norm": {"scale": (L, D)},
                "mlp": {"gate": {"w": (L, D, F)}, "up": {"w": (L, D, F)}, "down": {"w": (L, F, D)}}},
     "norm": {"scale": (D,)},
     "lm_head": {"w": (D, V)}}          # absent when the embeddings are tied

Dimension legend: B batch, T tokens, S cache capacity, V vocabulary, D model width, L layers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxla import _norms
from jaxla.attention._api import dot_product_attention
from jaxla.attention._rope import apply_rope
from jaxla.models._family import Family, TensorSource, take
from jaxla.models._layers import dense, join_layer, layer_adapters, split_in_place
from jaxla.quant import _fused, _qarray

__all__ = ["FAMILY", "LlamaConfig", "RopeScaling", "config_from_hf", "forward", "params_from_hf",
           "peft_module_names"]

HF_MODEL_TYPES = ("llama", "mistral", "qwen2")
ROPE_SCALING_TYPES = ("default", "linear", "llama3")
_MAX_DIM = 1 << 20  # bounds on sizes read from untrusted configs
_MAX_LAYERS = 1024


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: ``"linear"`` divides positions by ``factor``; ``"llama3"`` rescales
    low frequencies by ``factor`` with a smooth band between ``low_freq_factor`` and
    ``high_freq_factor`` of ``original_max_position_embeddings`` (Llama 3.1)."""

    type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class LlamaConfig:
    """A Llama-family decoder (hashable: usable as a static jit argument).

    Attributes:
      vocab_size: V.
      hidden_size: D.
      intermediate_size: F, the SwiGLU MLP width.
      num_layers: L.
      num_heads: N query heads.
      num_kv_heads: K key/value heads (N a multiple of K).
      head_dim: H (even).
      rms_norm_eps: RMSNorm epsilon.
      rope_theta: RoPE base.
      max_position_embeddings: the model's context length.
      tie_word_embeddings: logits use the embedding table (no ``lm_head``).
      qkv_bias: the q, k, v projections have biases (Qwen2; Llama's ``attention_bias``).
      o_bias: the output projection has a bias (Llama's ``attention_bias``).
      mlp_bias: the MLP projections have biases.
      sliding_window: a token sees itself and the ``sliding_window - 1`` tokens before it (Mistral);
        None for full causal attention.
      rope_scaling: a :class:`RopeScaling`, or None.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    rope_scaling: RopeScaling | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads",
                     "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _MAX_DIM:
                raise ValueError(f"LlamaConfig.{name} must be an int in [1, {_MAX_DIM}], got {value!r}")
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int) or not (
                0 < self.num_layers <= _MAX_LAYERS):
            raise ValueError(f"LlamaConfig.num_layers must be an int in [1, {_MAX_LAYERS}], "
                             f"got {self.num_layers!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"LlamaConfig.num_heads={self.num_heads} must be a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim={self.head_dim} must be even for RoPE")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise ValueError(f"LlamaConfig.rope_theta must be > 0, got {self.rope_theta!r}")
        if not (isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0):
            raise ValueError(f"LlamaConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if self.sliding_window is not None and (
                isinstance(self.sliding_window, bool) or not isinstance(self.sliding_window, int)
                or self.sliding_window < 1):
            raise ValueError(f"LlamaConfig.sliding_window must be a positive int or None, "
                             f"got {self.sliding_window!r}")


def _get(hf: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    value = hf.get(key)
    if value is None:  # absent or null: the default, if the key has one
        if default is None:
            raise ValueError(f"config.json: missing key {key!r}")
        return default
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ValueError(f"config.json: {key!r} must be {kind}, got {value!r}")
    if not isinstance(value, kind):
        raise ValueError(f"config.json: {key!r} must be {kind}, got {value!r}")
    return value


def _rope_scaling(hf: Mapping[str, Any]) -> RopeScaling | None:
    raw = hf.get("rope_scaling")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError(f"config.json: 'rope_scaling' must be an object or null, got {raw!r}")
    kind = raw.get("rope_type", raw.get("type"))
    if kind not in ROPE_SCALING_TYPES:
        raise ValueError(f"config.json: unsupported rope_scaling type {kind!r} (key 'rope_scaling'); "
                         f"supported: {ROPE_SCALING_TYPES}")
    if kind == "default":
        return None
    factor = raw.get("factor")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
        raise ValueError(f"config.json: rope_scaling.factor must be > 0, got {factor!r}")
    if kind == "linear":
        return RopeScaling("linear", float(factor))
    fields = {}
    for name, default in (("low_freq_factor", 1.0), ("high_freq_factor", 4.0),
                          ("original_max_position_embeddings", 8192)):
        value = raw.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"config.json: rope_scaling.{name} must be > 0, got {value!r}")
        fields[name] = value
    if not fields["high_freq_factor"] > fields["low_freq_factor"]:
        raise ValueError("config.json: rope_scaling.high_freq_factor must exceed low_freq_factor, "
                         f"got {fields}")
    return RopeScaling("llama3", float(factor), float(fields["low_freq_factor"]),
                       float(fields["high_freq_factor"]),
                       int(fields["original_max_position_embeddings"]))


def config_from_hf(hf: Mapping[str, Any]) -> LlamaConfig:
    """A :class:`LlamaConfig` from a Hugging Face ``config.json`` dict (llama, mistral, qwen2);
    ValueError naming the key for anything unsupported."""
    model_type = hf.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(f"config.json: model_type {model_type!r} is not a Llama-family model "
                         f"({HF_MODEL_TYPES})")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json: unsupported hidden_act {act!r}; the Llama family uses 'silu'")
    d = _get(hf, "hidden_size", int)
    n = _get(hf, "num_attention_heads", int)
    kv = _get(hf, "num_key_value_heads", int, n)
    head_dim = hf.get("head_dim") or (d // n if n > 0 and d % n == 0 else None)
    if not isinstance(head_dim, int):
        raise ValueError(f"config.json: hidden_size={d} is not a multiple of num_attention_heads={n}; "
                         "give 'head_dim'")
    window = None
    if model_type == "mistral":
        window = hf.get("sliding_window")
    elif model_type == "qwen2" and hf.get("use_sliding_window"):
        raise ValueError("config.json: use_sliding_window=true (per-layer windows of Qwen2) is not "
                         "supported; supported: false")
    attention_bias = bool(_get(hf, "attention_bias", bool, False))
    return LlamaConfig(
        vocab_size=_get(hf, "vocab_size", int),
        hidden_size=d,
        intermediate_size=_get(hf, "intermediate_size", int),
        num_layers=_get(hf, "num_hidden_layers", int),
        num_heads=n,
        num_kv_heads=kv,
        head_dim=head_dim,
        rms_norm_eps=float(_get(hf, "rms_norm_eps", (int, float), 1e-6)),
        rope_theta=float(_get(hf, "rope_theta", (int, float), 10000.0)),
        max_position_embeddings=_get(hf, "max_position_embeddings", int, 2048),
        tie_word_embeddings=bool(_get(hf, "tie_word_embeddings", bool, False)),
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=attention_bias,
        mlp_bias=bool(_get(hf, "mlp_bias", bool, False)),
        sliding_window=window,
        rope_scaling=_rope_scaling(hf),
    )


_PROJECTIONS = (  # (jaxla path, HF module below model.layers.{i}, d_in, d_out, has-bias field)
    ("attn/q", "self_attn.q_proj", "d", "nh", "qkv_bias"),
    ("attn/k", "self_attn.k_proj", "d", "kh", "qkv_bias"),
    ("attn/v", "self_attn.v_proj", "d", "kh", "qkv_bias"),
    ("attn/o", "self_attn.o_proj", "nh", "d", "o_bias"),
    ("mlp/gate", "mlp.gate_proj", "d", "f", "mlp_bias"),
    ("mlp/up", "mlp.up_proj", "d", "f", "mlp_bias"),
    ("mlp/down", "mlp.down_proj", "f", "d", "mlp_bias"),
)


def _dims(config: LlamaConfig) -> dict[str, int]:
    return {"d": config.hidden_size, "f": config.intermediate_size,
            "nh": config.num_heads * config.head_dim, "kh": config.num_kv_heads * config.head_dim}


def params_from_hf(config: LlamaConfig, source: TensorSource, dtype: Any) -> dict[str, Any]:
    """Params (see the module docstring) from Hugging Face tensor names (weights stored (out, in),
    transposed here); every tensor's shape is checked against ``config``."""
    dims = _dims(config)
    d, v = config.hidden_size, config.vocab_size

    def cast(x):
        return jnp.asarray(np.asarray(x, np.float32), dtype)

    def stacked_of(name: str, shape: tuple[int, ...], transpose: bool) -> jax.Array:
        # One preallocated (L, ...) f32 stack filled a layer at a time: only one decoded tensor is
        # ever alive beside it (decoding every layer and then np.stack-ing held the model twice).
        out = np.empty((config.num_layers, *shape), np.float32)
        for i in range(config.num_layers):
            got = take(source, name.format(i=i), shape[::-1] if transpose else shape)
            out[i] = got.T if transpose else got
            del got
        return cast(out)

    prefix = "model.layers.{i}."
    stacked: dict[str, Any] = {
        "attn_norm": {"scale": stacked_of(prefix + "input_layernorm.weight", (d,), False)},
        "mlp_norm": {"scale": stacked_of(prefix + "post_attention_layernorm.weight", (d,), False)},
        "attn": {}, "mlp": {}}
    for path, module, din, dout, bias in _PROJECTIONS:
        group, name = path.split("/")
        entry = {"w": stacked_of(f"{prefix}{module}.weight", (dims[din], dims[dout]), True)}
        if getattr(config, bias):
            entry["b"] = stacked_of(f"{prefix}{module}.bias", (dims[dout],), False)
        stacked[group][name] = entry
    params = {"embed": {"table": cast(take(source, "model.embed_tokens.weight", (v, d)))},
              "layers": stacked,
              "norm": {"scale": cast(take(source, "model.norm.weight", (d,)))}}
    if not config.tie_word_embeddings:
        params["lm_head"] = {"w": cast(take(source, "lm_head.weight", (v, d)).T)}
    return params


def peft_module_names(config: LlamaConfig) -> dict[str, str]:
    """``{jaxla adapter path: Hugging Face module path}`` of the adaptable kernels."""
    del config
    return {f"layers/{path}/w": f"model.layers.{{i}}.{module}" for path, module, *_ in _PROJECTIONS}


# ----------------------------------------------------------------------------------------------
# The forward pass.


def _inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """(H/2,) float64 RoPE frequencies with Llama 3's scaling (a host constant)."""
    s = config.rope_scaling
    # The same frequencies as rope_frequencies, on the host: a constant folded into the program.
    freqs = float(config.rope_theta) ** -(np.arange(0, config.head_dim, 2) / config.head_dim)
    wavelength = 2 * math.pi / freqs
    low_wavelength = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelength = s.original_max_position_embeddings / s.high_freq_factor
    scaled = np.where(wavelength > low_wavelength, freqs / s.factor, freqs)
    smooth = (s.original_max_position_embeddings / wavelength - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelength >= high_wavelength) & (wavelength <= low_wavelength)
    return np.where(medium, blended, scaled)


def rope(config: LlamaConfig, x: jax.Array, positions: jax.Array) -> jax.Array:
    """Rotates BTNH queries or keys by (B, T) positions (rotate-half layout, HF Llama's)."""
    s = config.rope_scaling
    if s is None:
        return apply_rope(x, positions, theta=config.rope_theta)
    if s.type == "linear":
        return apply_rope(x, positions.astype(jnp.float32) / s.factor, theta=config.rope_theta)
    freqs = jnp.asarray(_inverse_frequencies(config), jnp.float32)
    angles = positions.astype(jnp.float32)[..., None, None] * freqs.reshape(1, 1, 1, -1)  # (B, T, 1, H/2)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    half = config.head_dim // 2
    x32 = x.astype(jnp.float32)
    first, second = x32[..., :half], x32[..., half:]
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin],
                           axis=-1).astype(x.dtype)


def embed_tokens(config: LlamaConfig, params: Mapping[str, Any], input_ids: jax.Array) -> jax.Array:
    """(B, T, D) embeddings; an id outside [0, V) gives NaN (under jit it cannot raise, and NaN
    logits are never mistaken for a prediction)."""
    del config
    table = params["embed"]["table"]
    if isinstance(table, _qarray.QArray):  # a quantized table: only the looked-up rows are decoded
        return _qarray.take_rows(table, input_ids)
    return jnp.take(table, input_ids, axis=0, mode="fill", fill_value=jnp.nan)


def logits_of(config: LlamaConfig, params: Mapping[str, Any], adapters: Mapping[str, Any] | None,
              x: jax.Array) -> jax.Array:
    """Final norm and output projection: (B, T, D) -> (B, T, V) float32."""
    h = _norms.rms_norm(params["norm"], x, eps=config.rms_norm_eps)
    if config.tie_word_embeddings:
        table = params["embed"]["table"]
        if isinstance(table, _qarray.QArray):
            # h · Eᵀ is the product of the table's stored rows: the fused CPU kernel reads its
            # blocks once; elsewhere, or for many rows, they are decoded inside the program (and
            # again in the backward pass, not kept for it).
            return _fused.product(h, table, compute=h.dtype, acc=jnp.float32)
        return jnp.einsum("btd,vd->btv", h, table.astype(h.dtype),
                          preferred_element_type=jnp.float32)
    # In the params' dtype with f32 accumulation, as Hugging Face's lm_head runs.
    return dense(params["lm_head"], adapters or {}, "lm_head/w", h).astype(jnp.float32)


def qkv(config: LlamaConfig, layer: Mapping[str, Any], adapters: Mapping[str, Any], x: jax.Array,
        positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One layer's rotated queries BTNH and keys BTKH, and values BTKH, from the residual x."""
    b, t, _ = x.shape
    h = _norms.rms_norm(layer["attn_norm"], x, eps=config.rms_norm_eps)
    q = dense(layer["attn"]["q"], adapters, "attn/q/w", h).reshape(b, t, config.num_heads, -1)
    k = dense(layer["attn"]["k"], adapters, "attn/k/w", h).reshape(b, t, config.num_kv_heads, -1)
    v = dense(layer["attn"]["v"], adapters, "attn/v/w", h).reshape(b, t, config.num_kv_heads, -1)
    return rope(config, q, positions), rope(config, k, positions), v


def finish_layer(config: LlamaConfig, layer: Mapping[str, Any], adapters: Mapping[str, Any],
                 x: jax.Array, attended: jax.Array) -> jax.Array:
    """The residual x after the attention output (attended BTNH) and the SwiGLU MLP."""
    b, t, _ = x.shape
    x = x + dense(layer["attn"]["o"], adapters, "attn/o/w",
                  attended.reshape(b, t, -1)).astype(x.dtype)
    h = _norms.rms_norm(layer["mlp_norm"], x, eps=config.rms_norm_eps)
    gate = dense(layer["mlp"]["gate"], adapters, "mlp/gate/w", h)
    up = dense(layer["mlp"]["up"], adapters, "mlp/up/w", h)
    return x + dense(layer["mlp"]["down"], adapters, "mlp/down/w", jax.nn.silu(gate) * up
                     ).astype(x.dtype)


def concrete(x: jax.Array) -> np.ndarray | None:
    """``x`` on the host when its values are known at trace time (outside jit), else None."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


class Inputs(NamedTuple):
    """Checked forward inputs: int32 ids, bool mask and int32 positions, all (B, T)."""

    input_ids: jax.Array
    attention_mask: jax.Array | None
    positions: jax.Array


def check_inputs(config: LlamaConfig, input_ids: ArrayLike, attention_mask: ArrayLike | None,
                 positions: ArrayLike | None) -> Inputs:
    """Shapes and dtypes at trace time; ids in [0, V) when they are concrete (outside jit)."""
    ids = jnp.asarray(input_ids)
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be integer (B, T), got {ids.dtype} {ids.shape}")
    if ids.shape[1] > config.max_position_embeddings:
        raise ValueError(f"input_ids has T={ids.shape[1]} tokens, more than the model's context "
                         f"max_position_embeddings={config.max_position_embeddings}")
    host = concrete(ids)
    if host is not None:
        if host.size and (host.min() < 0 or host.max() >= config.vocab_size):
            bad = host[(host < 0) | (host >= config.vocab_size)]
            raise ValueError(f"input_ids must lie in [0, vocab_size={config.vocab_size}); got "
                             f"{bad[:5].tolist()}")
    mask = None
    if attention_mask is not None:
        mask = jnp.asarray(attention_mask)
        if mask.dtype != jnp.bool_:
            raise TypeError(f"attention_mask must be boolean (True = real token), got {mask.dtype}")
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {ids.shape}, "
                             f"got {mask.shape}")
    if positions is None:
        if mask is None:
            pos = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
        else:
            pos = jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)
    else:
        pos = jnp.asarray(positions)
        if pos.shape != ids.shape or not jnp.issubdtype(pos.dtype, jnp.integer):
            raise ValueError(f"positions must be integer with the shape of input_ids {ids.shape}, "
                             f"got {pos.dtype} {pos.shape}")
    return Inputs(ids.astype(jnp.int32), mask, pos.astype(jnp.int32))


def window(config: LlamaConfig) -> tuple[int, int] | None:
    """``local_window_size`` of dot_product_attention for the config's sliding window."""
    return None if config.sliding_window is None else (config.sliding_window - 1, 0)


def run(config: LlamaConfig, params: Mapping[str, Any], inputs: Inputs, *,
        adapters: Mapping[str, Any] | None = None, return_kv: bool = False,
        last_only: bool = False, remat: bool = False, head: bool = True):
    """The decoder over checked inputs: logits (B, T, V) float32 ((B, 1, V) of the last token with
    ``last_only``), and with ``return_kv`` the stacked rotated keys and values (L, B, T, K, H) of
    every layer (a generation cache's prefill). ``remat`` recomputes each layer in the backward
    pass (``jax.checkpoint``) instead of keeping its activations; ``head=False`` returns the
    residual stream (B, T, D) before the final norm instead of logits (for a chunked loss that
    applies :func:`logits_of` itself)."""
    per_layer = layer_adapters(adapters)
    x = embed_tokens(config, params, inputs.input_ids).astype(params["layers"]["attn_norm"]["scale"].dtype)
    segments = None if inputs.attention_mask is None else inputs.attention_mask.astype(jnp.int32)

    # Stacked quantized kernels the fused kernel reads in place (a scanned slice would be copied).
    scanned, kept = split_in_place(params["layers"], int(np.prod(inputs.input_ids.shape)))

    def step(x, xs):
        layer, layer_ad, index = xs
        layer = join_layer(layer, kept, index)
        q, k, v = qkv(config, layer, layer_ad, x, inputs.positions)
        # Padding is its own segment: real tokens never see it, and a pad row still sees itself
        # (causal), so no row is empty and no NaN appears.
        attended = dot_product_attention(q, k, v, is_causal=True, segment_ids=segments,
                                         local_window_size=window(config))
        return finish_layer(config, layer, layer_ad, x, attended), ((k, v) if return_kv else None)

    if remat:  # one layer's input is kept per layer; the rest is recomputed in the backward pass
        step = jax.checkpoint(step, prevent_cse=False)
    x, kv = jax.lax.scan(step, x, (scanned, per_layer,
                                   jnp.arange(config.num_layers, dtype=jnp.int32)))
    x = x[:, -1:] if last_only else x
    logits = logits_of(config, params, adapters, x) if head else x
    return (logits, kv) if return_kv else logits


def forward(config: LlamaConfig, params: Mapping[str, Any], input_ids: ArrayLike, *,
            attention_mask: ArrayLike | None = None, positions: ArrayLike | None = None,
            adapters: Mapping[str, Any] | None = None, remat: bool = False) -> jax.Array:
    """Logits of a Llama-family decoder.

    Dimension legend: B batch, T tokens, V vocabulary.

    Args:
      config: a :class:`LlamaConfig`.
      params: as in the module docstring.
      input_ids: int (B, T), each in [0, V) (checked when concrete; under jit an id outside gives
        NaN logits for its row's later tokens).
      attention_mask: bool (B, T), True at real tokens (left or right padding); padding is hidden
        from real tokens and the padded rows' logits are meaningless.
      positions: int (B, T); by default the count of real tokens before each token.
      adapters: ``jaxla.lora`` adapters over ``params`` (applied factored inside the scan).
      remat: recompute each layer in the backward pass (``jax.checkpoint`` per layer) instead of
        keeping its activations: less memory for a training step, the same values.

    Returns:
      (B, T, V) float32 logits.
    """
    if not isinstance(config, LlamaConfig):
        raise TypeError(f"config must be a LlamaConfig, got {type(config).__name__}")
    if not isinstance(remat, bool):
        raise TypeError(f"remat must be a bool, got {remat!r}")
    return run(config, params, check_inputs(config, input_ids, attention_mask, positions),
               adapters=adapters, remat=remat)


FAMILY = Family(
    name="llama",
    kind="decoder",
    config_type=LlamaConfig,
    hf_model_types=HF_MODEL_TYPES,
    gguf_architectures=("llama", "qwen2"),
    config_from_hf=config_from_hf,
    params_from_hf=params_from_hf,
    forward=forward,
    peft_module_names=peft_module_names,
)
