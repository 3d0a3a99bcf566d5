"""The public model API: load a checkpoint, run its forward, pool sentence embeddings.

Dimension legend: B batch, T tokens, V vocabulary, D model width.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxla import _checks
from jaxla.models import _download, _gguf, _hf, _registry
from jaxla.models._family import Model

__all__ = ["embed", "forward", "load"]


def load(path: str | Path, *, dtype: Any = jnp.float32) -> Model:
    """Loads a pretrained checkpoint into a :class:`Model`.

    Args:
      path: a ``.gguf`` file, a Hugging Face directory (``config.json`` + ``model.safetensors`` or
        a sharded index; ``tokenizer.json`` when present), or the name of a known model fetched
        with ``jaxla download NAME`` (e.g. ``"smollm2-135m-instruct"``).
      dtype: floating dtype of the parameters (quantized GGUF tensors are dequantized to it).

    Returns:
      A :class:`Model` with ``config``, ``params`` (layers stacked), ``tokenizer`` and
      ``chat_template``.

    Raises:
      FileNotFoundError: nothing at ``path`` (and not a known model name).
      ValueError: an unsupported architecture or config option, a malformed file, or a missing or
        mis-shaped tensor (each message names the file, the key or tensor and what was expected).
    """
    _checks.check_floating_dtype(dtype, "dtype")
    resolved = _download.resolve(path)
    if resolved.is_dir():
        return _hf.load_hf(resolved, dtype=dtype)
    if resolved.is_file():
        return _gguf.load_gguf(resolved, dtype=dtype)
    raise FileNotFoundError(f"no model at {str(path)!r}: expected a .gguf file, a Hugging Face "
                            f"directory, or one of the known names {_download.known_models()}")


def forward(config: Any, params: Any, input_ids: ArrayLike, *, attention_mask: ArrayLike | None = None,
            positions: ArrayLike | None = None, adapters: Any = None) -> jax.Array:
    """The model's forward pass.

    Args:
      config: the model's config (``Model.config``).
      params: its params (``Model.params``), or a pytree of the same structure.
      input_ids: int (B, T) token ids, each in ``[0, V)``.
      attention_mask: bool (B, T), True at real tokens (left or right padding); all True by default.
      positions: int (B, T) position ids; by default the count of real tokens before each token.
      adapters: ``jaxla.lora`` adapters over ``params`` (applied factored inside the forward).

    Returns:
      Decoders: logits (B, T, V) in float32. Encoders: the last hidden states (B, T, D).
    """
    family = _registry.family_of(config)
    return family.forward(config, params, input_ids, attention_mask=attention_mask,
                          positions=positions, adapters=adapters)


def embed(config: Any, params: Any, input_ids: ArrayLike, *, attention_mask: ArrayLike,
          adapters: Any = None) -> jax.Array:
    """Sentence embeddings of an encoder: the mean of the last hidden states over the real tokens,
    L2-normalised (as sentence-transformers does for all-MiniLM-L6-v2).

    Args:
      config, params, adapters: as for :func:`forward` (an encoder family).
      input_ids: int (B, T).
      attention_mask: bool (B, T), True at real tokens; a row with none gives zeros.

    Returns:
      (B, D) float32, unit norm per row.
    """
    family = _registry.family_of(config)
    if family.kind != "encoder":
        raise ValueError(f"embed needs an encoder model; {type(config).__name__} is a {family.kind} "
                         "(use forward for its logits)")
    mask = jnp.asarray(attention_mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"attention_mask must be boolean (True = real token), got {mask.dtype}")
    hidden = family.forward(config, params, input_ids, attention_mask=mask, positions=None,
                            adapters=adapters).astype(jnp.float32)
    if mask.shape != hidden.shape[:2]:
        raise ValueError(f"attention_mask must have shape (B, T) = {hidden.shape[:2]}, got {mask.shape}")
    weights = mask.astype(jnp.float32)[..., None]
    summed = jnp.sum(hidden * weights, axis=1)
    count = jnp.maximum(jnp.sum(weights, axis=1), 1.0)
    mean = summed / count
    norm = jnp.sqrt(jnp.sum(mean * mean, axis=-1, keepdims=True))
    return mean / jnp.maximum(norm, 1e-12)
