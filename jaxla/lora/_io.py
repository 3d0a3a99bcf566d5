"""Adapter files: one safetensors file with the adapters' settings as JSON in its header, written atomically.

A jaxla adapter file holds tensors ``"<path>/a"`` and ``"<path>/b"`` and, in the safetensors
``__metadata__``, the key ``"jaxla_lora"`` with JSON ``{"format": "jaxla.lora", "version": 1,
"adapters": {path: {"alpha", "rslora", "out_in"}}, "config": ...}``. A single file is replaced in one
``os.replace``, so a reader never sees a half-written adapter.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from jaxla._files import write_atomic
from jaxla.lora._adapter import Adapter, Adapters
from jaxla.lora._core import check_compatible

__all__ = ["load", "read_safetensors", "save", "write_atomic", "write_safetensors"]

_FORMAT, _VERSION, _META_KEY = "jaxla.lora", 1, "jaxla_lora"
_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}


def write_safetensors(path, tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> None:
    """Serialises ``{name: array}`` (bfloat16 included) and writes it atomically."""
    host = {k: np.ascontiguousarray(np.asarray(jax.device_get(v))) for k, v in tensors.items()}
    write_atomic(path, safetensors.numpy.save(host, metadata=dict(metadata)))


def read_safetensors(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Reads ``({name: array}, metadata)``, with clear errors for missing or corrupt files."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no adapter file at {path!r}")
    with open(path, "rb") as f:
        data = f.read()
    try:
        (n,) = struct.unpack("<Q", data[:8])
        if n > len(data) - 8:
            raise ValueError(f"header length {n} exceeds the file size {len(data)}")
        header = json.loads(data[8:8 + n])
        metadata = header.get("__metadata__") or {}
        tensors = {}
        for name, info in safetensors.deserialize(data):
            if info["dtype"] not in _DTYPES:
                raise ValueError(f"tensor {name!r} has unsupported dtype {info['dtype']}")
            arr = np.frombuffer(bytes(info["data"]), _DTYPES[info["dtype"]])
            tensors[name] = arr.reshape(info["shape"])
    except (struct.error, ValueError, UnicodeDecodeError, safetensors.SafetensorError,
            AttributeError, TypeError) as e:
        raise ValueError(f"{path!r} is not a valid safetensors file (corrupt or truncated): {e}"
                         ) from None
    return tensors, metadata


def save(path: str | os.PathLike, adapters: Adapters, config: Mapping[str, Any] | None = None
         ) -> None:
    """Saves adapters (and optional JSON-serialisable ``config``) to one safetensors file, atomically.

    Args:
      path: the file to write (e.g. ``"adapter.safetensors"``); its directory must exist.
      adapters: ``{path: Adapter}``.
      config: any JSON-serialisable mapping (training settings, base model name, ...), returned by
        :func:`load`.
    """
    if not isinstance(adapters, dict) or not all(isinstance(v, Adapter) for v in adapters.values()):
        raise TypeError("adapters must be a dict {path: jaxla.lora.Adapter}")
    try:
        meta = json.dumps({
            "format": _FORMAT, "version": _VERSION,
            "adapters": {k: {"alpha": ad.alpha, "rslora": ad.rslora, "out_in": ad.out_in}
                         for k, ad in adapters.items()},
            "config": dict(config) if config is not None else None,
        })
    except TypeError as e:
        raise TypeError(f"config must be JSON-serialisable: {e}") from None
    tensors = {}
    for k, ad in adapters.items():
        tensors[f"{k}/a"], tensors[f"{k}/b"] = ad.a, ad.b
    write_safetensors(path, tensors, {_META_KEY: meta})


def load(path: str | os.PathLike, *, params: Any = None) -> tuple[Adapters, dict[str, Any] | None]:
    """Loads a file written by :func:`save`.

    Args:
      path: the adapter file.
      params: if given, the adapters are checked against it (keys exist, shapes fit).

    Returns:
      ``(adapters, config)``.

    Raises:
      FileNotFoundError: no such file.
      ValueError: a corrupt or foreign file, or adapters that do not fit ``params`` (the message names
        the key and both shapes).
    """
    tensors, metadata = read_safetensors(path)
    if _META_KEY not in metadata:
        raise ValueError(f"{os.fspath(path)!r} is a safetensors file but not a jaxla adapter file "
                         f"(no {_META_KEY!r} metadata); PEFT files load with jaxla.lora.load_peft")
    try:
        meta = json.loads(metadata[_META_KEY])
        if meta.get("format") != _FORMAT or not isinstance(meta.get("adapters"), dict):
            raise ValueError("unknown format")
    except ValueError as e:
        raise ValueError(f"{os.fspath(path)!r} has corrupt jaxla adapter metadata: {e}") from None
    if meta.get("version", 0) > _VERSION:
        raise ValueError(f"{os.fspath(path)!r} has format version {meta['version']}; this jaxla "
                         f"reads up to {_VERSION}")
    adapters = {}
    for k, info in meta["adapters"].items():
        missing = [t for t in (f"{k}/a", f"{k}/b") if t not in tensors]
        if missing:
            raise ValueError(f"{os.fspath(path)!r} lists adapter {k!r} but lacks tensors {missing}")
        adapters[k] = Adapter(jnp.asarray(tensors[f"{k}/a"]), jnp.asarray(tensors[f"{k}/b"]),
                              float(info["alpha"]), bool(info["rslora"]), bool(info["out_in"]))
    if params is not None:
        check_compatible(params, adapters)
    return adapters, meta.get("config")
