"""LoRA adapters of a pretrained model as Hugging Face PEFT files, with the model's own module names.

A loaded model's adapters are the usual ``jaxla.lora`` dict over ``Model.params``, keyed by jaxla paths
such as ``"layers/attn/q/w"`` with the layers stacked: a ``(L, r, d_in)``, b ``(L, d_out, r)``. PEFT
stores one pair per layer under the Hugging Face module path of the adapted Linear, prefixed with
``"base_model.model."``: for a Llama model
``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` ``(r, d_in)`` and
``...lora_B.weight`` ``(d_out, r)``; for BERT ``base_model.model.encoder.layer.{i}.attention.self.query``.
PyTorch's Linear computes ``x·Wᵀ`` with W ``(d_out, d_in)`` and PEFT adds ``scale·(x·Aᵀ)·Bᵀ``,
which is jaxla's ``scale·((x·aᵀ)·bᵀ)`` with ``a = A`` and ``b = B`` unchanged (jaxla's W ``(d_in, d_out)``
is the transpose, its adapter is not), so the per-layer slices are written as they are.

The module names come from each family's ``Family.peft_module_names``; the file format and all
validation (ranks, alphas, rsLoRA, rank/alpha patterns, finite floating tensors, shapes against the
params) are :func:`jaxla.lora.save_peft` / :func:`jaxla.lora.load_peft`. Added here: PEFT options
jaxla cannot reproduce (DoRA, trained biases, ``modules_to_save``, ``fan_in_fan_out``, adapters on
only some layers) are refused with the key named, instead of being silently dropped.
"""

from __future__ import annotations

import json
import os
from typing import Any

from jaxla import lora
from jaxla.lora import _peft as lora_peft
from jaxla.lora import _targets
from jaxla.lora._io import parse_json, read_safetensors, short_repr, write_atomic
from jaxla.models import _registry
from jaxla.models._family import Model

__all__ = ["load_peft", "module_names", "save_peft"]

TASK_TYPES = {"decoder": "CAUSAL_LM", "encoder": "FEATURE_EXTRACTION"}


def _check_model(model: Any) -> Model:
    if not isinstance(model, Model):
        raise TypeError(f"model must be a jaxla.models.Model (from jaxla.models.load), got "
                        f"{type(model).__name__}")
    return model


def module_names(model: Model) -> dict[str, str]:
    """``{jaxla adapter path: PEFT module name with one "{}" for the layer}`` of ``model``."""
    names = _registry.family_of(model.config).peft_module_names(model.config)
    return {path: template.replace("{i}", "{}") for path, template in names.items()}


def save_peft(model: Model, adapters: lora.Adapters, directory: str | os.PathLike, *,
              base_model: str | None = None) -> None:
    """Writes ``adapters`` of ``model`` as a PEFT LoRA directory.

    Args:
      model: the :class:`~jaxla.models.Model` the adapters were trained on.
      adapters: ``{jaxla path: Adapter}`` over ``model.params`` (stacked over the layers), paths
        from the family's adaptable kernels (e.g. ``"layers/attn/q/w"``).
      directory: created if missing; receives ``adapter_model.safetensors`` (written first) and
        ``adapter_config.json`` (``r``, ``lora_alpha``, ``target_modules``, ``use_rslora``,
        ``peft_type`` "LORA", ``base_model_name_or_path``, ``task_type``), each atomically.
      base_model: recorded as ``base_model_name_or_path``; ``model.source`` by default.

    Raises:
      ValueError: an adapter path the family cannot name, or adapters that do not fit the params.
    """
    model = _check_model(model)
    names = module_names(model)
    if not isinstance(adapters, dict):
        raise TypeError(f"adapters must be a dict {{path: jaxla.lora.Adapter}}, got "
                        f"{type(adapters).__name__}")
    unknown = [k for k in adapters if k not in names]
    if unknown:
        raise ValueError(f"adapters {unknown} are not adaptable modules of this "
                         f"{type(model.config).__name__}; PEFT names exist for {sorted(names)}")
    lora.check_compatible(model.params, adapters)
    family = _registry.family_of(model.config)
    base = base_model if base_model is not None else (model.source or None)
    lora.save_peft(directory, adapters, {k: names[k] for k in adapters}, base_model=base)
    path = os.path.join(directory, lora_peft.CONFIG)
    with open(path, "rb") as f:
        config = json.loads(f.read())
    config["task_type"] = TASK_TYPES.get(family.kind)
    write_atomic(path, json.dumps(config, indent=2).encode())


# adapter_config.json options whose effect jaxla's forward does not reproduce: {key: what is allowed}.
_REFUSED = {
    "use_dora": (False, None),
    "fan_in_fan_out": (False, None),
    "lora_bias": (False, None),
    "bias": ("none", None),
    "modules_to_save": (None, []),
    "layers_to_transform": (None,),
}


def _check_options(directory: str) -> None:
    path = os.path.join(directory, lora_peft.CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no PEFT config at {path!r}")
    size = os.path.getsize(path)
    if size > lora_peft.MAX_CONFIG_BYTES:
        raise ValueError(f"{path!r} has {size} bytes; a PEFT config is at most "
                         f"{lora_peft.MAX_CONFIG_BYTES}")
    with open(path, "rb") as f:
        config = parse_json(f.read(), repr(path))
    if not isinstance(config, dict):
        raise ValueError(f"{path!r} is not a PEFT LoRA config: expected a JSON object, got "
                         f"{short_repr(config)}")
    for key, allowed in _REFUSED.items():
        if key in config and not any(config[key] == a and type(config[key]) is type(a)
                                     for a in allowed):
            raise ValueError(f"{path!r}: {key} = {short_repr(config[key])} is not supported by "
                             f"jaxla's LoRA (expected {' or '.join(map(json.dumps, allowed))})")


def load_peft(model: Model, directory: str | os.PathLike, *, dtype: Any = None) -> lora.Adapters:
    """Reads a PEFT LoRA directory written for ``model``'s architecture (by PEFT or :func:`save_peft`).

    Args:
      model: the :class:`~jaxla.models.Model` to adapt.
      directory: holds ``adapter_model.safetensors`` and ``adapter_config.json``.
      dtype: adapter dtype; the file's by default.

    Returns:
      ``{jaxla path: Adapter}`` over ``model.params``, stacked over the layers, for
      :func:`jaxla.models.forward`'s ``adapters``.

    Raises:
      FileNotFoundError: a missing file.
      ValueError: corrupt files; unsupported PEFT options (naming the key); tensors for modules
        this model does not have, for only some layers, or of shapes that do not fit (naming the
        tensor and both shapes).
    """
    model = _check_model(model)
    directory = os.fspath(directory)
    _check_options(directory)
    names = module_names(model)
    weights = os.path.join(directory, lora_peft.WEIGHTS)
    tensors, _ = read_safetensors(weights)
    leaves = dict(_targets.flatten_with_paths(model.params))
    per_path = {path: {f"{lora_peft.PREFIX}{module}.lora_{ab}.weight"
                       for module in _modules(leaves, path, template) for ab in "AB"}
                for path, template in names.items()}
    present = {path: names[path] for path, keys in per_path.items() if keys & set(tensors)}
    expected = set().union(*(per_path[path] for path in present))
    extra = sorted(set(tensors) - expected)
    missing = sorted(expected - set(tensors))
    if not present or extra or missing:
        example = min(min(keys) for keys in per_path.values())
        detail = []
        if not present:
            detail.append(f"it holds no LoRA tensor of this model's modules (names like {example!r})")
        if missing:
            detail.append(f"it lacks {missing[:4]}" + (f" and {len(missing) - 4} more"
                                                       if len(missing) > 4 else "")
                          + " (jaxla adapts a module in every layer or in none)")
        if extra:
            detail.append(f"it holds tensors that are not LoRA factors of this "
                          f"{type(model.config).__name__}: {extra[:4]}"
                          + (f" and {len(extra) - 4} more" if len(extra) > 4 else ""))
        raise ValueError(f"{weights!r}: " + "; ".join(detail))
    return lora.load_peft(directory, model.params, present, dtype=dtype, strict=True)


def _modules(leaves: dict[str, Any], path: str, template: str) -> list[str]:
    """The per-layer module names of ``path`` (one "{}" per stacking axis; 0 or 1 here)."""
    if path not in leaves:
        raise ValueError(f"the family names {path!r}, which is not a path of model.params")
    n = template.count("{}")
    if n == 0:
        return [template]
    if n != 1:
        raise ValueError(f"module name {template!r} of {path!r} must have at most one layer index")
    return [template.format(i) for i in range(int(leaves[path].shape[0]))]
