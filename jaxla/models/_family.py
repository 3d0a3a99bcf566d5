"""What a model family provides: one :class:`Family` record per family module, and :class:`Model`.

A family (``jaxla/models/_llama.py``, ``jaxla/models/_bert.py``, ...) is one module that defines its
config (a frozen dataclass), how to read it and its weights from a Hugging Face checkpoint, its
pure forward, and the Hugging Face module names of its LoRA-adaptable kernels; it ends with a
module-level ``FAMILY = Family(...)``. :mod:`jaxla.models._registry` lists the family modules.

Parameter layout shared by every family: a plain dict pytree of jaxla layer params
(``{"w": (d_in, d_out), "b": (d_out,)}`` for a linear layer, as :func:`jaxla.linear` takes), with the
transformer layers stacked on a leading axis L under ``params["layers"]`` so the forward runs them
under ``lax.scan``. LoRA adapters over ``params`` are the usual ``jaxla.lora`` dict
``{"/"-joined param path: Adapter}`` (e.g. ``"layers/attn/q/w"``, with stacked ``a`` (L, r, d_in) and
``b`` (L, d_out, r)); :mod:`jaxla.models._layers` applies them inside the scan.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Family", "Model", "TensorSource", "take"]


class TensorSource:
    """Tensors of a checkpoint by name, read on demand (host NumPy arrays).

    ``where`` names the checkpoint in error messages. ``read(name)`` returns the array stored under
    ``name`` (any dtype; families cast), ``names`` lists what is stored.
    """

    def __init__(self, where: str, names: frozenset[str], read: Callable[[str], np.ndarray]):
        self.where = where
        self.names = names
        self._read = read

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def read(self, name: str) -> np.ndarray:
        if name not in self.names:
            raise ValueError(f"{self.where}: missing tensor {name!r}")
        return self._read(name)


def take(source: TensorSource, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """``source.read(name)`` checked to have ``shape``; the error names the tensor and both shapes."""
    x = source.read(name)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(
            f"{source.where}: tensor {name!r} has shape {tuple(x.shape)}, expected {tuple(shape)} "
            "from the model's config"
        )
    return x


@dataclass(frozen=True)
class Family:
    """A registered model family.

    Attributes:
      name: the family's name (``"llama"``, ``"bert"``).
      kind: ``"decoder"`` (forward returns logits (B, T, V); :func:`jaxla.models.generate` works) or
        ``"encoder"`` (forward returns the last hidden states (B, T, D);
        :func:`jaxla.models.embed` works).
      config_type: the family's frozen config dataclass.
      hf_model_types: the ``model_type`` values of a Hugging Face ``config.json`` it reads.
      gguf_architectures: the ``general.architecture`` values of a GGUF file it reads.
      config_from_hf: ``config.json`` dict -> config; ValueError naming the key for unsupported
        options.
      params_from_hf: ``(config, TensorSource, dtype) -> params`` from Hugging Face tensor names.
      forward: ``forward(config, params, input_ids, *, attention_mask, positions, adapters)``.
      peft_module_names: ``config -> {jaxla adapter path: Hugging Face module path with "{i}"
        for the layer index}``, e.g. ``{"layers/attn/q/w": "model.layers.{i}.self_attn.q_proj"}``.
    """

    name: str
    kind: str
    config_type: type
    hf_model_types: tuple[str, ...]
    gguf_architectures: tuple[str, ...]
    config_from_hf: Callable[[Mapping[str, Any]], Any]
    params_from_hf: Callable[[Any, TensorSource, Any], Any]
    forward: Callable[..., Any]
    peft_module_names: Callable[[Any], dict[str, str]]


@dataclass(frozen=True)
class Model:
    """A loaded pretrained model.

    Attributes:
      config: the family's frozen config dataclass.
      params: a plain pytree of jaxla layer params, the layers stacked on a leading axis.
      tokenizer: a ``tokenizers.Tokenizer`` (None when the checkpoint has none).
      chat_template: the model's Jinja chat template text, when the checkpoint has one.
      source: the file or directory the model was read from.
    """

    config: Any
    params: Any
    tokenizer: Any = None
    chat_template: str | None = None
    source: str = ""
