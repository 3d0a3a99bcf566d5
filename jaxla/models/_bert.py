"""The BERT family: post-LN encoders with absolute positions and token types (all-MiniLM-L6-v2, ...).

Dimension legend: B batch, T tokens, D model width (``hidden_size``), N heads, H head dim (D / N),
F feed-forward width (``intermediate_size``), L layers, V vocabulary, P max positions, Y token types.

Params (the layers stacked on a leading L axis, read by :func:`params_from_hf`)::

    {"embeddings": {"word": (V, D), "position": (P, D), "token_type": (Y, D),
                    "norm": {"scale": (D,), "bias": (D,)}},
     "layers": {"attn": {"q" | "k" | "v" | "o": {"w": (L, D, D), "b": (L, D)}},
                "attn_norm": {"scale": (L, D), "bias": (L, D)},
                "mlp": {"up": {"w": (L, D, F), "b": (L, F)}, "down": {"w": (L, F, D), "b": (L, D)}},
                "mlp_norm": {"scale": (L, D), "bias": (L, D)}}}

Each layer is ``x = LN(x + Attn(x)); x = LN(x + Down(act(Up(x))))`` as Hugging Face's ``BertModel``;
the pooler is not read (sentence embeddings pool the hidden states, see :func:`jaxla.models.embed`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxla import _checks, _norms
from jaxla.attention import dot_product_attention
from jaxla.models._family import Family, TensorSource, take
from jaxla.models._layers import dense, layer_adapters

__all__ = ["FAMILY", "BertConfig", "config_from_hf", "forward", "params_from_hf",
           "peft_module_names"]

ACTIVATIONS = ("gelu", "gelu_new", "relu")


@dataclass(frozen=True)
class BertConfig:
    """A BERT-style encoder's architecture (Hugging Face ``config.json`` names in brackets).

    Attributes:
      vocab_size: V (``vocab_size``).
      hidden_size: D (``hidden_size``).
      num_layers: L (``num_hidden_layers``).
      num_heads: N (``num_attention_heads``); D must be a multiple of N.
      intermediate_size: F (``intermediate_size``).
      max_position_embeddings: P, the longest input (``max_position_embeddings``).
      type_vocab_size: Y, the number of token types (``type_vocab_size``).
      layer_norm_eps: (``layer_norm_eps``).
      hidden_act: ``"gelu"`` (exact, erf), ``"gelu_new"`` (tanh approximation) or ``"relu"``.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BertConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"BertConfig.hidden_size={self.hidden_size} must be a multiple of "
                             f"num_heads={self.num_heads}")
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not (
                math.isfinite(eps) and eps > 0):
            raise ValueError(f"BertConfig.layer_norm_eps must be a finite number > 0, got {eps!r}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"BertConfig.hidden_act must be one of {ACTIVATIONS}, got "
                             f"{self.hidden_act!r}")

    @property
    def head_dim(self) -> int:
        """H = D / N."""
        return self.hidden_size // self.num_heads


# config.json key -> BertConfig field; the keys without defaults must be present.
_HF_KEYS = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads", "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings", "type_vocab_size": "type_vocab_size",
    "layer_norm_eps": "layer_norm_eps", "hidden_act": "hidden_act",
}
_HF_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size")


def config_from_hf(hf: Mapping[str, Any]) -> BertConfig:
    """A :class:`BertConfig` from a Hugging Face BERT ``config.json`` dict.

    Raises:
      ValueError: a missing key, a value of the wrong type, or an option jaxla does not implement
        (``position_embedding_type`` other than ``"absolute"``, ``hidden_act`` other than
        gelu/gelu_new/relu, ``is_decoder`` or ``add_cross_attention`` true); the message names
        the key.
    """
    if hf.get("model_type") != "bert":
        raise ValueError(f"config.json: model_type must be 'bert' for the BERT family, got "
                         f"{hf.get('model_type')!r}")
    missing = [k for k in _HF_REQUIRED if k not in hf]
    if missing:
        raise ValueError(f"config.json: missing keys {missing} of a BERT config")
    position = hf.get("position_embedding_type", "absolute")
    if position != "absolute":
        raise ValueError(f"config.json: position_embedding_type {position!r} is not supported; "
                         "jaxla's BERT family implements 'absolute'")
    for flag in ("is_decoder", "add_cross_attention"):
        if hf.get(flag, False) not in (False, None):
            raise ValueError(f"config.json: {flag}={hf[flag]!r} is not supported; the BERT family "
                             "is an encoder (set it to false)")
    act = hf.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise ValueError(f"config.json: hidden_act {act!r} is not supported; supported: "
                         f"{', '.join(ACTIVATIONS)}")
    fields = {field: hf[key] for key, field in _HF_KEYS.items() if key in hf}
    for key, field in _HF_KEYS.items():
        if field == "hidden_act" or key not in hf:
            continue
        value = hf[key]
        if field == "layer_norm_eps":
            ok = not isinstance(value, bool) and isinstance(value, int | float) and (
                math.isfinite(value) and value > 0)
            what = "a finite number > 0"
        else:
            ok = not isinstance(value, bool) and isinstance(value, int) and value >= 1
            what = "a positive integer"
        if not ok:
            raise ValueError(f"config.json: {key} must be {what}, got {value!r}")
    if fields["hidden_size"] % fields["num_heads"]:
        raise ValueError(f"config.json: hidden_size={fields['hidden_size']} must be a multiple of "
                         f"num_attention_heads={fields['num_heads']}")
    fields["layer_norm_eps"] = float(fields.get("layer_norm_eps", 1e-12))
    return BertConfig(**fields)


def _prefix(source: TensorSource) -> str:
    """``""`` for a ``BertModel`` checkpoint, ``"bert."`` for a task model (``BertFor...``)."""
    for prefix in ("", "bert."):
        if f"{prefix}embeddings.word_embeddings.weight" in source:
            return prefix
    raise ValueError(f"{source.where}: missing tensor 'embeddings.word_embeddings.weight' (nor "
                     "'bert.embeddings.word_embeddings.weight'): not a BERT checkpoint")


def _floating(source: TensorSource, name: str, shape: tuple[int, ...]) -> np.ndarray:
    x = take(source, name, shape)
    if not np.issubdtype(x.dtype, np.floating) and x.dtype.name != "bfloat16":
        raise ValueError(f"{source.where}: tensor {name!r} must be floating, got {x.dtype}")
    return x


def params_from_hf(config: BertConfig, source: TensorSource, dtype: Any) -> dict[str, Any]:
    """The params (see the module docstring) from a Hugging Face BERT checkpoint's tensors.

    Tensor names as ``BertModel`` saves them, with or without a ``"bert."`` prefix; PyTorch Linear
    weights ``(out, in)`` are transposed to jaxla's ``(in, out)``. Each tensor's shape is checked
    against ``config`` (the error names the tensor and both shapes).
    """
    c = config
    d, f = c.hidden_size, c.intermediate_size
    p = _prefix(source)

    def arr(name, shape, transpose=False):
        x = _floating(source, p + name, shape)
        x = np.asarray(x, np.float32) if x.dtype.name == "bfloat16" else x
        return x.T if transpose else x

    def norm(name, stack=None):
        names = [name] if stack is None else [name.format(i) for i in stack]
        return {"scale": np.stack([arr(f"{n}.weight", (d,)) for n in names]),
                "bias": np.stack([arr(f"{n}.bias", (d,)) for n in names])}

    def linear(name, d_in, d_out):
        names = [name.format(i) for i in range(c.num_layers)]
        return {"w": np.stack([arr(f"{n}.weight", (d_out, d_in), transpose=True) for n in names]),
                "b": np.stack([arr(f"{n}.bias", (d_out,)) for n in names])}

    emb_norm = norm("embeddings.LayerNorm")
    layer = "encoder.layer.{}."
    params = {
        "embeddings": {
            "word": arr("embeddings.word_embeddings.weight", (c.vocab_size, d)),
            "position": arr("embeddings.position_embeddings.weight",
                            (c.max_position_embeddings, d)),
            "token_type": arr("embeddings.token_type_embeddings.weight", (c.type_vocab_size, d)),
            "norm": {k: v[0] for k, v in emb_norm.items()},
        },
        "layers": {
            "attn": {short: linear(layer + f"attention.self.{long}", d, d)
                     for short, long in (("q", "query"), ("k", "key"), ("v", "value"))}
                    | {"o": linear(layer + "attention.output.dense", d, d)},
            "attn_norm": norm(layer + "attention.output.LayerNorm", range(c.num_layers)),
            "mlp": {"up": linear(layer + "intermediate.dense", d, f),
                    "down": linear(layer + "output.dense", f, d)},
            "mlp_norm": norm(layer + "output.LayerNorm", range(c.num_layers)),
        },
    }
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), params)


def peft_module_names(config: BertConfig) -> dict[str, str]:
    """``{jaxla adapter path: Hugging Face module path}`` of the adaptable kernels (``{i}`` = layer),
    as PEFT names them on a ``BertModel``."""
    del config  # every BERT layer has the same modules
    base = "encoder.layer.{i}."
    return {
        "layers/attn/q/w": base + "attention.self.query",
        "layers/attn/k/w": base + "attention.self.key",
        "layers/attn/v/w": base + "attention.self.value",
        "layers/attn/o/w": base + "attention.output.dense",
        "layers/mlp/up/w": base + "intermediate.dense",
        "layers/mlp/down/w": base + "output.dense",
    }


def _activation(name: str, x: jax.Array) -> jax.Array:
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name == "gelu_new":
        return jax.nn.gelu(x, approximate=True)
    return jax.nn.relu(x)


def _int_input(x: ArrayLike | None, name: str, shape: tuple[int, ...] | None, limit: int,
               what: str) -> jax.Array | None:
    """An int (B, T) argument; concrete values are checked to lie in ``[0, limit)``."""
    if x is None:
        return None
    x = _checks.as_array(x, name)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must be integer, got dtype {x.dtype} with shape {x.shape}")
    if x.ndim != 2 or (shape is not None and x.shape != shape):
        want = "(B, T)" if shape is None else f"(B, T) = {shape} like input_ids"
        raise ValueError(f"{name} must have shape {want}, got {x.shape}")
    try:
        values = np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return x  # under jit: the embedding lookup turns out-of-range ids into NaN
    if values.size:
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi >= limit:
            raise ValueError(f"{name} must lie in [0, {limit}) ({what}), got values in [{lo}, {hi}]")
    return x


def forward(config: BertConfig, params: Mapping[str, Any], input_ids: ArrayLike, *,
            attention_mask: ArrayLike | None = None, positions: ArrayLike | None = None,
            adapters: Mapping[str, Any] | None = None,
            token_type_ids: ArrayLike | None = None) -> jax.Array:
    """The encoder's last hidden states.

    Args:
      config: the model's :class:`BertConfig`.
      params: its params (see the module docstring).
      input_ids: int (B, T), each in ``[0, V)``; T at most P when ``positions`` is None.
      attention_mask: bool (B, T), True at real tokens; padded keys are hidden from every query
        (padded rows still get outputs, which callers ignore). All True by default.
      positions: int (B, T) in ``[0, P)``; by default the count of real tokens before each token
        (``0, 1, ...`` for an unpadded row, so left- and right-padded rows match unpadded ones).
      adapters: ``jaxla.lora`` adapters over ``params`` (keys from :func:`peft_module_names`, e.g.
        ``"layers/attn/q/w"``), applied factored inside the layer scan.
      token_type_ids: int (B, T) in ``[0, Y)``; 0 by default.

    Returns:
      (B, T, D) in the dtype of the embeddings. Values checked concretely (outside ``jit``) raise
      ValueError when out of range; under ``jit`` an out-of-range id gives NaN rather than a
      clamped row.
    """
    if not isinstance(config, BertConfig):
        raise TypeError(f"config must be a BertConfig, got {type(config).__name__}")
    c = config
    ids = _int_input(input_ids, "input_ids", None, c.vocab_size, f"the vocabulary size V={c.vocab_size}")
    b, t = ids.shape
    if attention_mask is None:
        mask = jnp.ones((b, t), jnp.bool_)
    else:
        mask = _checks.as_array(attention_mask, "attention_mask")
        if mask.dtype != jnp.bool_:
            raise TypeError(f"attention_mask must be boolean (True = real token), got {mask.dtype}")
        if mask.shape != (b, t):
            raise ValueError(f"attention_mask must have shape (B, T) = {(b, t)} like input_ids, "
                             f"got {mask.shape}")
    if positions is None:
        if t > c.max_position_embeddings:
            raise ValueError(f"input_ids has T={t} tokens; this model has max_position_embeddings="
                             f"{c.max_position_embeddings}")
        positions = jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)
    else:
        positions = _int_input(positions, "positions", (b, t), c.max_position_embeddings,
                               f"max_position_embeddings={c.max_position_embeddings}")
    types = _int_input(token_type_ids, "token_type_ids", (b, t), c.type_vocab_size,
                       f"type_vocab_size={c.type_vocab_size}")
    if types is None:
        types = jnp.zeros((b, t), jnp.int32)

    emb = params["embeddings"]
    dtype = jnp.result_type(emb["word"])

    def lookup(table, index):
        # An out-of-range id (only possible under jit) gives a NaN row, never a clamped or wrapped
        # one: negative ids are moved past the end, where "fill" applies.
        index = jnp.where(index < 0, table.shape[0], index)
        return jnp.take(table, index, axis=0, mode="fill", fill_value=jnp.nan)

    x = (lookup(emb["word"], ids) + lookup(emb["position"], positions)
         + lookup(emb["token_type"], types))
    x = _norms.layer_norm(emb["norm"], x, eps=c.layer_norm_eps)
    key_mask = mask[:, None, None, :]  # (B, 1, 1, S): every query sees the real keys
    n, h = c.num_heads, c.head_dim
    if adapters:
        adaptable = peft_module_names(c)
        unknown = sorted(k for k in adapters if k not in adaptable)
        if unknown:
            raise ValueError(f"adapters {unknown} are not applied by the BERT forward (it would "
                             f"ignore them); adaptable paths: {sorted(adaptable)}")
    layer_ads = layer_adapters(adapters)

    def layer(x, scanned):
        lp, ads = scanned

        def heads(name):
            return dense(lp["attn"][name], ads, f"attn/{name}/w", x).reshape(b, t, n, h)

        att = dot_product_attention(heads("q"), heads("k"), heads("v"), mask=key_mask)
        att = dense(lp["attn"]["o"], ads, "attn/o/w", att.reshape(b, t, n * h))
        x = _norms.layer_norm(lp["attn_norm"], x + att, eps=c.layer_norm_eps)
        up = _activation(c.hidden_act, dense(lp["mlp"]["up"], ads, "mlp/up/w", x))
        down = dense(lp["mlp"]["down"], ads, "mlp/down/w", up)
        x = _norms.layer_norm(lp["mlp_norm"], x + down, eps=c.layer_norm_eps)
        return x, None

    x, _ = jax.lax.scan(layer, x.astype(dtype), (params["layers"], layer_ads))
    return x


FAMILY = Family(
    name="bert",
    kind="encoder",
    config_type=BertConfig,
    hf_model_types=("bert",),
    gguf_architectures=(),
    config_from_hf=config_from_hf,
    params_from_hf=params_from_hf,
    forward=forward,
    peft_module_names=peft_module_names,
)
