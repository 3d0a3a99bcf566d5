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

__all__ = ["embed", "forward", "load", "quantize"]


def load(path: str | Path, *, dtype: Any = jnp.float32, keep_quantized: bool = False) -> Model:
    """Loads a pretrained checkpoint into a :class:`Model`.

    Args:
      path: a ``.gguf`` file, a Hugging Face directory (``config.json`` + ``model.safetensors`` or
        a sharded index; ``tokenizer.json`` when present), or the name of a known model fetched
        with ``jaxla download NAME`` (e.g. ``"smollm2-135m-instruct"``).
      dtype: floating dtype of the parameters (quantized GGUF tensors are dequantized to it).
      keep_quantized: GGUF only: keep Q8_0/Q4_0/Q4_1/Q4_K/Q6_K kernels and the embedding packed as
        :class:`jaxla.quant.QArray` (the file's bytes; ``dtype`` is their logical dtype).

    Returns:
      A :class:`Model` with ``config``, ``params`` (layers stacked), ``tokenizer`` and
      ``chat_template``.

    Raises:
      FileNotFoundError: nothing at ``path`` (and not a known model name).
      ValueError: an unsupported architecture or config option, a malformed file, or a missing or
        mis-shaped tensor (each message names the file, the key or tensor and what was expected).
    """
    _checks.check_floating_dtype(dtype, "dtype")
    if not isinstance(keep_quantized, bool):
        raise TypeError(f"keep_quantized must be a bool, got {keep_quantized!r}")
    resolved = _download.resolve(path)
    if resolved.is_dir():
        if keep_quantized:
            raise ValueError(f"keep_quantized=True is for GGUF files; {resolved} is a Hugging Face "
                             "directory (use jaxla.models.quantize on the loaded model)")
        return _hf.load_hf(resolved, dtype=dtype)
    if resolved.is_file():
        return _gguf.load_gguf(resolved, dtype=dtype, keep_quantized=keep_quantized)
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


def quantize(model: Model, *, format: str, targets: Any = None, block_size: int | None = None,
             double_quant: bool = False) -> Model:
    """Quantizes a model's linear kernels (the adaptable ones by default) to ``format``.

    Args:
      model: a loaded :class:`Model` with float kernels.
      format: a :data:`jaxla.quant.FORMATS` name (``"nf4"``, ``"int8"``, ``"int4"``, ``"q4_1"``, …).
      targets: which kernels, as for ``jaxla.lora.init`` (paths such as ``"layers/attn/q/w"``,
        regexes or a predicate); by default the family's adaptable kernels (``peft_module_names``).
        An embedding table (a path ending in ``table``, e.g. ``"embed/table"``) is blocked along
        its rows (D), as GGUF stores it; the Llama forward looks rows up without decoding it all.
      block_size, double_quant: as :func:`jaxla.quant.quantize`.

    Returns:
      The model with each targeted kernel a :class:`jaxla.quant.QArray` (stacked kernels keep their
      leading L axis); everything else unchanged.
    """
    import dataclasses

    from jaxla import quant
    from jaxla.lora import _targets

    if not isinstance(model, Model):
        raise TypeError(f"model must be a jaxla.models.Model, got {type(model).__name__}")
    family = _registry.family_of(model.config)
    if targets is None:
        targets = sorted(family.peft_module_names(model.config))
    choose = _targets.predicate(targets, "targets")
    named = _targets.flatten_with_paths(model.params)
    chosen = {name for name, leaf in named if choose(name, leaf)}
    if not chosen:
        raise ValueError(f"targets {targets!r} match no parameter; available paths (shape):\n"
                         + _targets.describe_paths(named))

    def visit(key_path, leaf):
        name = _targets.path_str(key_path)
        if name not in chosen:
            return leaf
        if quant.is_qarray(leaf):
            raise ValueError(f"parameter {name!r} is already quantized ({leaf!r})")
        table = name.endswith("table")  # an embedding (V, D): blocks along its rows, as GGUF
        return quant.quantize(leaf, format=format, block_size=block_size, double_quant=double_quant,
                              stack_axes=max(len(leaf.shape) - 2, 0), axis=-1 if table else -2)

    params = jax.tree_util.tree_map_with_path(visit, model.params, is_leaf=quant.is_qarray)
    return dataclasses.replace(model, params=params)
