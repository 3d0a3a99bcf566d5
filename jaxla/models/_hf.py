"""Hugging Face checkpoint directories: ``config.json`` + ``model.safetensors`` (or a sharded
``model.safetensors.index.json``), with ``tokenizer.json`` / ``tokenizer_config.json`` when present.

The files are untrusted: sizes are bounded before parsing, JSON must be an object, every shard named
by an index must sit in the directory, and the family checks each tensor's shape against the config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from jaxla.models import _registry
from jaxla.models._family import Model, TensorSource

__all__ = ["load_hf", "read_json", "read_tokenizer"]

MAX_JSON_BYTES = 16 << 20  # config.json, the shard index and tokenizer_config.json
MAX_TOKENIZER_BYTES = 256 << 20


def read_json(path: Path, *, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """A JSON object from ``path``; ValueError naming the file if it is too large or not an object."""
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"{path}: {size} bytes is larger than the {max_bytes}-byte limit for this file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_tokenizer(directory: Path):
    """``(tokenizers.Tokenizer or None, chat template or None)`` from a checkpoint directory."""
    from tokenizers import Tokenizer

    tokenizer = None
    path = directory / "tokenizer.json"
    if path.is_file():
        if path.stat().st_size > MAX_TOKENIZER_BYTES:
            raise ValueError(f"{path}: larger than the {MAX_TOKENIZER_BYTES}-byte limit")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises its own Exception subclass
            raise ValueError(f"{path}: not a tokenizers file ({e})") from None
    template = None
    config_path = directory / "tokenizer_config.json"
    if config_path.is_file():
        template = read_json(config_path).get("chat_template")
        if template is not None and not isinstance(template, str):
            template = None  # a list of named templates: not used by jaxla's chat helper
    return tokenizer, template


def _tensor_source(directory: Path) -> TensorSource:
    from safetensors import safe_open

    single = directory / "model.safetensors"
    index_path = directory / "model.safetensors.index.json"
    if single.is_file():
        files = {None: single}
    elif index_path.is_file():
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise ValueError(f"{index_path}: 'weight_map' must map tensor names to file names")
        files = {}
        for name, file in weight_map.items():
            shard = directory / file
            if Path(file).name != file or not shard.is_file():
                raise ValueError(f"{index_path}: tensor {name!r} names the shard {file!r}, which is "
                                 f"not a file in {directory}")
            files[name] = shard
    else:
        raise ValueError(f"{directory}: no model.safetensors or model.safetensors.index.json")

    handles: dict[Path, Any] = {}

    def handle(path: Path):
        if path not in handles:
            try:
                handles[path] = safe_open(str(path), framework="np")
            except Exception as e:  # safetensors raises SafetensorError for malformed headers
                raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
        return handles[path]

    if None in files:
        names = frozenset(handle(single).keys())
        where = {n: single for n in names}
    else:
        where = files
        names = frozenset(files)
        for shard in set(files.values()):
            missing = {n for n, f in files.items() if f == shard} - set(handle(shard).keys())
            if missing:
                raise ValueError(f"{shard}: the index lists tensors it does not hold: {sorted(missing)[:5]}")

    def read(name: str):
        return handle(where[name]).get_tensor(name)

    return TensorSource(str(directory), names, read)


def load_hf(directory: str | Path, *, dtype: Any = jnp.float32) -> Model:
    """Reads a Hugging Face checkpoint directory into a :class:`Model` (see the module docstring)."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{directory}: not a Hugging Face checkpoint directory (no config.json)")
    hf_config = read_json(config_path)
    family = _registry.for_hf_model_type(hf_config.get("model_type"), str(config_path))
    config = family.config_from_hf(hf_config)
    params = family.params_from_hf(config, _tensor_source(directory), dtype)
    tokenizer, template = read_tokenizer(directory)
    return Model(config=config, params=params, tokenizer=tokenizer, chat_template=template,
                 source=str(directory))
