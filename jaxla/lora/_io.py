"""Adapter files: one safetensors file with the adapters' settings as JSON in its header, written atomically.

A jaxla adapter file holds tensors ``"<path>/a"`` and ``"<path>/b"`` (and ``"<path>/m"`` for DoRA)
and, in the safetensors ``__metadata__``, the key ``"jaxla_lora"`` with JSON ``{"format":
"jaxla.lora", "version": 1, "adapters": {path: {"alpha", "rslora", "out_in"[, "dora": true]}},
"config": ...}``. A single file is replaced in one
``os.replace``, so a reader never sees a half-written adapter.
"""

from __future__ import annotations

import json
import math
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

__all__ = [
    "check_alpha_field",
    "check_factor_shapes",
    "check_finite_tensor",
    "host_adapters",
    "host_magnitudes",
    "load",
    "parse_json",
    "read_safetensors",
    "save",
    "short_repr",
    "write_atomic",
    "write_safetensors",
]

_FORMAT, _VERSION, _META_KEY = "jaxla.lora", 1, "jaxla_lora"
_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}


# Bounds on what an untrusted file can make the loader do. safetensors itself caps its header at
# 100 MB; JSON nested deeper than this is no adapter and would exhaust Python's recursion limit.
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_JSON_DEPTH = 64
_SCAN_CHUNK = 1 << 20  # bytes per NumPy pass, so a 100 MB header needs ~10 MB per temporary


def parse_json(data: bytes | str, where: str) -> Any:
    """``json.loads`` for untrusted text: bounded nesting, so no RecursionError; ValueError on junk.

    ``where`` names the file (and key) for the error message.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    depth = json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"{where} nests JSON {depth} levels deep; at most {MAX_JSON_DEPTH} are "
                         "accepted")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{where} is not valid JSON: {e}") from None


def json_depth(raw: bytes) -> int:
    """The deepest ``[``/``{`` nesting of ``raw`` outside JSON strings, in one linear NumPy pass.

    A quote opens or closes a string unless an odd run of backslashes precedes it. For invalid JSON
    the count may differ from any parse, but up to the first syntax error (where a parser stops) it
    is exact, so it bounds the recursion ``json.loads`` would need.
    """
    depth = best = bs_run = 0
    in_string = 0
    for start in range(0, len(raw), _SCAN_CHUNK):
        c = np.frombuffer(raw, np.uint8, count=min(_SCAN_CHUNK, len(raw) - start), offset=start)
        idx = np.arange(c.size, dtype=np.int64)
        is_bs = c == ord("\\")
        last_other = np.maximum.accumulate(np.where(is_bs, -1, idx))
        run_to = np.where(last_other < 0, idx + 1 + bs_run, idx - last_other)  # run ending at i
        run_before = np.concatenate([[bs_run], run_to[:-1]])
        quote = (c == ord('"')) & (run_before % 2 == 0)
        inside = (in_string + np.cumsum(quote)) % 2
        opens = (c == ord("[")) | (c == ord("{"))
        closes = (c == ord("]")) | (c == ord("}"))
        step = np.where(inside == 0, opens.astype(np.int64) - closes.astype(np.int64), 0)
        level = depth + np.cumsum(step)
        best = max(best, int(level.max()))
        depth, in_string, bs_run = int(level[-1]), int(inside[-1]), int(run_to[-1])
    return best


def check_finite_tensor(arr: np.ndarray, where: str) -> None:
    """Raises ValueError if a floating tensor read from a file holds NaN or inf."""
    if np.issubdtype(arr.dtype, np.floating) or arr.dtype == ml_dtypes.bfloat16:
        values = np.asarray(arr, np.float32) if arr.dtype == ml_dtypes.bfloat16 else arr
        if not np.all(np.isfinite(values)):
            bad = int(values.size - np.count_nonzero(np.isfinite(values)))
            raise ValueError(f"{where} holds {bad} NaN or inf value(s) (shape {arr.shape})")


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
        if n > MAX_HEADER_BYTES:
            raise ValueError(f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
        header = parse_json(data[8:8 + n], "the header")
        if not isinstance(header, dict):
            raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
        metadata = header.get("__metadata__") or {}
        if not isinstance(metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("__metadata__ must map strings to strings")
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
      adapters: ``{path: Adapter}``; what :func:`load` would reject (alpha not finite and > 0,
        non-finite or non-floating tensors, ranks that disagree) is refused before anything is
        written, so a saved file always loads.
      config: any JSON-serialisable mapping (training settings, base model name, ...), returned by
        :func:`load`.
    """
    arrays = host_adapters(adapters)
    mags = host_magnitudes(adapters)

    def entry(k, ad):
        e = {"alpha": float(ad.alpha), "rslora": bool(ad.rslora), "out_in": bool(ad.out_in)}
        return {**e, "dora": True} if k in mags else e

    try:
        meta = json.dumps({
            "format": _FORMAT, "version": _VERSION,
            "adapters": {k: entry(k, ad) for k, ad in adapters.items()},
            "config": dict(config) if config is not None else None,
        })
    except (TypeError, ValueError) as e:
        raise TypeError(f"config must be a JSON-serialisable mapping: {e}") from None
    tensors = {}
    for k, (a, b) in arrays.items():
        tensors[f"{k}/a"], tensors[f"{k}/b"] = a, b
    for k, m in mags.items():
        tensors[f"{k}/m"] = m
    write_safetensors(path, tensors, {_META_KEY: meta})


def host_magnitudes(adapters: Any) -> dict[str, np.ndarray]:
    """``{path: m}`` as host arrays for the DoRA adapters of a set checked by :func:`host_adapters`
    (finite, floating, shaped ``(..., d_out)``)."""
    out = {}
    for k, ad in adapters.items():
        if ad.m is None:
            continue
        m = np.asarray(jax.device_get(ad.m))
        if not (np.issubdtype(m.dtype, np.floating) or m.dtype == ml_dtypes.bfloat16):
            raise TypeError(f"adapters[{k!r}].m must be floating, got {m.dtype}")
        check_finite_tensor(m, f"adapters[{k!r}].m")
        want = (*np.shape(ad.a)[:-2], np.shape(ad.b)[-2])
        if m.shape != want:
            raise ValueError(f"adapters[{k!r}].m has shape {m.shape}; expected (..., d_out) = {want}")
        out[k] = np.ascontiguousarray(m)
    return out


def host_adapters(adapters: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{path: (a, b)}`` as host arrays, after the checks :func:`load` applies to a file's adapters.

    Shared by :func:`save` and ``save_peft``: refusing here means no file is written that its
    loader would reject.
    """
    if not isinstance(adapters, dict):
        raise TypeError(f"adapters must be a dict {{path: jaxla.lora.Adapter}}, got "
                        f"{type(adapters).__name__}")
    out = {}
    for k, ad in adapters.items():
        if not isinstance(k, str) or not k:
            raise TypeError(f"adapter keys must be non-empty strings (parameter paths), got {k!r}")
        if not isinstance(ad, Adapter):
            raise TypeError(f"adapters[{k!r}] must be a jaxla.lora.Adapter, got {type(ad).__name__}")
        if ad.gain is not None:
            raise ValueError(f"adapters[{k!r}] carries its scale as an array (jaxla.lora.pad_rank); "
                             "save the unpadded adapters and pad them again after loading")
        alpha = ad.alpha
        if isinstance(alpha, np.number):
            alpha = alpha.item()
        check_alpha_field(alpha, f"adapters[{k!r}].alpha")
        a, b = (np.asarray(jax.device_get(t)) for t in (ad.a, ad.b))
        for name, arr in (("a", a), ("b", b)):
            if not (np.issubdtype(arr.dtype, np.floating) or arr.dtype == ml_dtypes.bfloat16):
                raise TypeError(f"adapters[{k!r}].{name} must be floating, got {arr.dtype}")
            check_finite_tensor(arr, f"adapters[{k!r}].{name}")
        check_factor_shapes(a.shape, b.shape, f"adapter {k!r}")
        out[k] = (np.ascontiguousarray(a), np.ascontiguousarray(b))
    return out


def check_factor_shapes(a_shape: tuple[int, ...], b_shape: tuple[int, ...], what: str) -> None:
    """a ``(..., r, d_in)`` and b ``(..., d_out, r)``: same leading axes, same r, no empty axis."""
    if (len(a_shape) < 2 or len(b_shape) != len(a_shape) or a_shape[:-2] != b_shape[:-2]
            or a_shape[-2] != b_shape[-1] or 0 in a_shape or 0 in b_shape):
        raise ValueError(
            f"{what} has a {tuple(a_shape)} and b {tuple(b_shape)}; expected a (..., r, d_in) and "
            "b (..., d_out, r) with the same leading axes, the same r and no empty axis"
        )


def load(path: str | os.PathLike, *, params: Any = None) -> tuple[Adapters, dict[str, Any] | None]:
    """Loads a file written by :func:`save`.

    The file is untrusted: every field of its metadata is checked for type and range (alpha a
    finite number > 0, ``rslora``/``out_in`` JSON booleans, a known integer version), the tensors
    must be finite floating ``a (..., r, I)`` / ``b (..., O, r)`` pairs whose ranks and stacking
    axes agree, and the JSON is parsed with bounded nesting. Errors name the file and the key.

    Args:
      path: the adapter file.
      params: if given, the adapters are checked against it (keys exist, shapes fit).

    Returns:
      ``(adapters, config)``.

    Raises:
      FileNotFoundError: no such file.
      ValueError: a corrupt or foreign file, a field of the wrong type or range, or adapters that do
        not fit ``params`` (the message names the key and both shapes).
    """
    tensors, metadata = read_safetensors(path)
    where = repr(os.fspath(path))
    if _META_KEY not in metadata:
        raise ValueError(f"{where} is a safetensors file but not a jaxla adapter file "
                         f"(no {_META_KEY!r} metadata); PEFT files load with jaxla.lora.load_peft")
    meta = parse_json(metadata[_META_KEY], f"{where}: metadata {_META_KEY!r}")
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise ValueError(f"{where} has corrupt jaxla adapter metadata: expected a JSON object with "
                         f'"format": {_FORMAT!r}, got {short_repr(meta)}')
    version = meta.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{where}: metadata key 'version' must be an integer >= 1, got "
                         f"{short_repr(version)}")
    if version > _VERSION:
        raise ValueError(f"{where} has format version {version}; this jaxla reads up to {_VERSION}")
    entries = meta.get("adapters")
    if not isinstance(entries, dict):
        raise ValueError(f"{where}: metadata key 'adapters' must be a JSON object "
                         f"{{path: {{alpha, rslora, out_in}}}}, got {short_repr(entries)}")
    config = meta.get("config")
    if config is not None and not isinstance(config, dict):
        raise ValueError(f"{where}: metadata key 'config' must be a JSON object or null, got "
                         f"{short_repr(config)}")
    adapters = {k: _read_adapter(where, k, info, tensors) for k, info in entries.items()}
    listed = {f"{k}/{t}" for k in entries for t in ("a", "b")}
    listed |= {f"{k}/m" for k, info in entries.items() if isinstance(info, dict) and info.get("dora")}
    extra = sorted(set(tensors) - listed)
    if extra:
        raise ValueError(f"{where} holds tensors that no adapter lists: {extra[:8]}"
                         + (f" and {len(extra) - 8} more" if len(extra) > 8 else ""))
    if params is not None:
        check_compatible(params, adapters)
    return adapters, config


def short_repr(value: Any, limit: int = 80) -> str:
    """``"<type> <repr>"`` of a value read from a file, clipped for error messages."""
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= limit else text[:limit] + '...'}"


def check_alpha_field(value: Any, what: str) -> float:
    """A LoRA alpha read from a file: a JSON number (not a bool), finite and > 0."""
    if (isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
            or value <= 0):
        raise ValueError(f"{what} must be a finite number > 0, got {short_repr(value)}")
    return float(value)


def _read_adapter(where: str, name: str, info: Any, tensors: Mapping[str, np.ndarray]) -> Adapter:
    """One entry of the metadata's "adapters" object and its two tensors, checked field by field."""
    if not isinstance(info, dict):
        raise ValueError(f"{where}: adapters[{name!r}] must be a JSON object with alpha, rslora "
                         f"and out_in, got {short_repr(info)}")
    fields = ("alpha", "rslora", "out_in")
    unknown = sorted(set(info) - set(fields) - {"dora"})
    missing = [f for f in fields if f not in info]
    if unknown or missing:
        raise ValueError(f"{where}: adapters[{name!r}] must have exactly the keys {list(fields)}"
                         + (f"; missing {missing}" if missing else "")
                         + (f"; unknown {unknown}" if unknown else "")
                         + " (and optionally 'dora')")
    alpha = check_alpha_field(info["alpha"], f"{where}: adapters[{name!r}].alpha")
    for flag in ("rslora", "out_in") + (("dora",) if "dora" in info else ()):
        if not isinstance(info[flag], bool):
            raise ValueError(f"{where}: adapters[{name!r}].{flag} must be true or false, got "
                             f"{short_repr(info[flag])}")
    arrays = []
    dora = bool(info.get("dora", False))
    for t in ("a", "b") + (("m",) if dora else ()):
        key = f"{name}/{t}"
        if key not in tensors:
            raise ValueError(f"{where} lists adapter {name!r} but lacks tensor {key!r}")
        arr = tensors[key]
        if not (np.issubdtype(arr.dtype, np.floating) or arr.dtype == ml_dtypes.bfloat16):
            raise ValueError(f"{where}: tensor {key!r} must be floating, got {arr.dtype}")
        check_finite_tensor(arr, f"{where}: tensor {key!r}")
        arrays.append(arr)
    a, b = arrays[:2]
    check_factor_shapes(a.shape, b.shape, f"{where}: adapter {name!r}")
    m = None
    if dora:
        m = arrays[2]
        if m.shape != (*a.shape[:-2], b.shape[-2]):
            raise ValueError(f"{where}: tensor {name + '/m'!r} has shape {m.shape}; expected "
                             f"(..., d_out) = {(*a.shape[:-2], b.shape[-2])}")
        m = jnp.asarray(m)
    return Adapter(jnp.asarray(a), jnp.asarray(b), alpha, info["rslora"], info["out_in"], m=m)
