"""Import and export of Hugging Face PEFT LoRA adapters, given a jaxla path ↔ module name mapping.

PEFT's directory holds ``adapter_model.safetensors`` with ``base_model.model.<module>.lora_A.weight``
``(r, d_in)`` and ``...lora_B.weight`` ``(d_out, r)`` — exactly jaxla's ``a`` and ``b`` — and
``adapter_config.json`` with ``r``, ``lora_alpha``, ``target_modules``, ``use_rslora`` and optional
``rank_pattern`` / ``alpha_pattern``. DoRA adapters (``"use_dora": true``) add
``...<module>.lora_magnitude_vector`` ``(d_out,)``, jaxla's ``m``. Stacked adapters map to one
module per stack entry: their module name contains one ``{}`` placeholder per stacking axis, e.g.
``"model.layers.{}.mlp.up_proj"``.

Both files are untrusted. Every config field jaxla reads is checked for type and range, and the
``rank_pattern`` / ``alpha_pattern`` keys, which PEFT treats as regular expressions, are run by RE2
(the ``google-re2`` package), whose matching time is linear in the module name: a key such as
``"(a+)+b"`` cannot make the loader backtrack for minutes as Python's ``re`` would.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import string
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from jaxla import _checks
from jaxla.lora import _targets
from jaxla.lora._adapter import Adapter, Adapters, check_pair
from jaxla.lora._io import (
    check_alpha_field,
    check_finite_tensor,
    host_adapters,
    host_magnitudes,
    parse_json,
    read_safetensors,
    short_repr,
    write_atomic,
    write_safetensors,
)

__all__ = ["load_peft", "save_peft"]

WEIGHTS, CONFIG, PREFIX = "adapter_model.safetensors", "adapter_config.json", "base_model.model."


def _n_placeholders(template: str) -> int:
    return sum(1 for _, field, _, _ in string.Formatter().parse(template) if field is not None)


def _modules(path: str, template: Any, stack_shape: tuple[int, ...]) -> list[tuple[tuple, str]]:
    if not isinstance(template, str):
        raise TypeError(f"module_names[{path!r}] must be a str, got {template!r}")
    if _n_placeholders(template) != len(stack_shape):
        raise ValueError(
            f"module_names[{path!r}] = {template!r} has {_n_placeholders(template)} '{{}}' "
            f"placeholders but the adapter has {len(stack_shape)} stacking axes {stack_shape}"
        )
    return [(idx, template.format(*idx)) for idx in itertools.product(*map(range, stack_shape))]


MAX_CONFIG_BYTES = 16 * 1024 * 1024
MAX_PATTERN_CHARS = 1000


def _pattern_value(patterns: list[tuple[str, Callable[[str], bool], Any]], module: str,
                   default: Any) -> Any:
    """PEFT's rule: the first key (in file order) that matches a trailing run of whole "."-parts of
    the module name, i.e. ``re.match(rf"(.*\\.)?({key})$", module)``, gives the value."""
    for _key, matches, value in patterns:
        if matches(module):
            return value
    return default


def _re2():
    try:
        import re2
    except ImportError:
        raise ImportError(
            "adapter_config.json has rank_pattern/alpha_pattern keys, which are regular expressions "
            "from a file; jaxla matches them with RE2 (linear time, no catastrophic backtracking). "
            "Install it with `pip install google-re2`."
        ) from None
    return re2


def _compile_patterns(config: Mapping[str, Any], field: str, where: str,
                      check_value: Callable[[Any, str], Any]) -> list[tuple[str, Callable, Any]]:
    """``[(key, matches(module) -> bool, value)]`` for ``config[field]``, every key and value checked."""
    patterns = config.get(field)
    if patterns is None:
        return []
    if not isinstance(patterns, dict):
        raise ValueError(f"{where}: {field} must be a JSON object {{module pattern: value}}, got "
                         f"{short_repr(patterns)}")
    if not patterns:
        return []
    re2 = _re2()
    options = re2.Options()
    options.log_errors = False  # the error is raised with the file and key instead
    out = []
    for key, value in patterns.items():
        what = f"{where}: {field}[{_clip(key)!r}]"
        if not key or len(key) > MAX_PATTERN_CHARS:
            raise ValueError(f"{what}: a pattern must have 1 to {MAX_PATTERN_CHARS} characters, "
                             f"got {len(key)}")
        value = check_value(value, what)
        try:
            re2.compile(key, options)  # the key alone must be a whole regex, as in _targets
            compiled = re2.compile(rf"(?:.*\.)?(?:{key})", options)
        except re2.error as e:
            msg = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) \
                else str(e)
            raise ValueError(f"{what}: the key is not a regular expression RE2 accepts ({msg}); "
                             "RE2 has no backreferences or lookaround") from None
        out.append((key, lambda module, rx=compiled: rx.fullmatch(module) is not None, value))
    return out


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _check_rank(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be an integer rank >= 1, got {short_repr(value)}")
    return value


def save_peft(directory: str | os.PathLike, adapters: Adapters, module_names: Mapping[str, str],
              *, base_model: str | None = None) -> None:
    """Writes adapters in PEFT's LoRA format (each file written atomically, weights first).

    Args:
      directory: created if missing; receives ``adapter_model.safetensors`` and
        ``adapter_config.json``.
      adapters: ``{path: Adapter}``; all must agree on ``rslora`` and on DoRA (PEFT has one
        ``use_rslora`` and one ``use_dora`` flag).
      module_names: ``{jaxla path: PEFT module name}`` for every adapter, with ``{}`` placeholders
        for stacking axes.
      base_model: recorded as ``base_model_name_or_path``.
    """
    arrays = host_adapters(adapters)
    mags = host_magnitudes(adapters)
    if mags and len(mags) != len(adapters):
        raise ValueError("PEFT stores one use_dora flag; these adapters mix DoRA "
                         f"({sorted(mags)}) and plain LoRA "
                         f"({sorted(set(adapters) - set(mags))})")
    missing = [k for k in adapters if k not in module_names]
    if missing:
        raise ValueError(f"module_names lacks entries for adapter paths {missing}")
    rs = {ad.rslora for ad in adapters.values()}
    if len(rs) > 1:
        raise ValueError("PEFT stores one use_rslora flag; these adapters mix rslora True and False")
    tensors, ranks, alphas = {}, {}, {}
    for path, ad in adapters.items():
        a, b = arrays[path]
        for idx, module in _modules(path, module_names[path], ad.stack_shape):
            tensors[f"{PREFIX}{module}.lora_A.weight"] = a[idx]
            tensors[f"{PREFIX}{module}.lora_B.weight"] = b[idx]
            if path in mags:
                tensors[f"{PREFIX}{module}.lora_magnitude_vector"] = mags[path][idx]
            ranks[module], alphas[module] = ad.rank, float(ad.alpha)
    r = collections.Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0] if alphas else 8.0
    config = {
        "peft_type": "LORA", "base_model_name_or_path": base_model, "task_type": None,
        "r": r, "lora_alpha": alpha, "use_rslora": bool(rs and rs.pop()),
        "target_modules": sorted(ranks), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "use_dora": bool(mags),
        "rank_pattern": {m: v for m, v in ranks.items() if v != r},
        "alpha_pattern": {m: v for m, v in alphas.items() if v != alpha},
    }
    os.makedirs(directory, exist_ok=True)
    write_safetensors(os.path.join(directory, WEIGHTS), tensors, {"format": "pt"})
    write_atomic(os.path.join(directory, CONFIG), json.dumps(config, indent=2).encode())


class _PeftConfig:
    """The fields of adapter_config.json that jaxla reads, each checked for type and range."""

    def __init__(self, config: dict[str, Any], where: str):
        self.r = _check_rank(config["r"], f"{where}: 'r'")
        self.alpha = check_alpha_field(config["lora_alpha"], f"{where}: 'lora_alpha'")
        rslora = config.get("use_rslora", False)
        if rslora is None:
            rslora = False
        if not isinstance(rslora, bool):
            raise ValueError(f"{where}: 'use_rslora' must be true or false, got {short_repr(rslora)}")
        self.rslora = rslora
        dora = config.get("use_dora", False)
        if dora is None:
            dora = False
        if not isinstance(dora, bool):
            raise ValueError(f"{where}: 'use_dora' must be true or false, got {short_repr(dora)}")
        self.dora = dora
        self.ranks = _compile_patterns(config, "rank_pattern", where, _check_rank)
        self.alphas = _compile_patterns(config, "alpha_pattern", where, check_alpha_field)


def _read_config(directory: str) -> _PeftConfig:
    path = os.path.join(directory, CONFIG)
    where = repr(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no PEFT config at {where}")
    size = os.path.getsize(path)
    if size > MAX_CONFIG_BYTES:
        raise ValueError(f"{where} has {size} bytes; a PEFT config is at most {MAX_CONFIG_BYTES}")
    with open(path, "rb") as f:
        config = parse_json(f.read(), where)
    if not isinstance(config, dict):
        raise ValueError(f"{where} is not a PEFT LoRA config: expected a JSON object, got "
                         f"{short_repr(config)}")
    missing = [k for k in ("r", "lora_alpha") if k not in config]
    if missing:
        raise ValueError(f"{where} is not a PEFT LoRA config: it lacks {missing}")
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise ValueError(f"{where} has peft_type {short_repr(peft_type)}; only 'LORA' is supported")
    return _PeftConfig(config, where)


def load_peft(directory: str | os.PathLike, params: Any, module_names: Mapping[str, str], *,
              out_in: _targets.TargetSpec | None = None, dtype: DTypeLike | None = None,
              strict: bool = True) -> Adapters:
    """Reads PEFT LoRA adapters for ``params``.

    Args:
      directory: holds ``adapter_model.safetensors`` and ``adapter_config.json``.
      params: the base parameters; every mapped path must be a leaf whose shape fits its tensors.
      module_names: ``{jaxla path: PEFT module name}`` (``{}`` placeholders for stacking axes).
      out_in: paths whose weights are stored ``(..., d_out, d_in)`` (as :func:`jaxla.lora.init`).
      dtype: adapter dtype; the file's dtype by default.
      strict: raise if the file holds LoRA modules that ``module_names`` does not mention.

    Returns:
      ``{path: Adapter}``; with ``"use_dora": true`` each adapter's ``m`` is the module's
      ``lora_magnitude_vector`` (required, ``(d_out,)``, finite).

    Raises:
      FileNotFoundError: a missing file. ValueError: corrupt files, missing keys, or shapes that do
        not fit ``params`` (naming the key and both shapes).
    """
    directory = os.fspath(directory)
    if dtype is not None:
        dtype = _checks.check_floating_dtype(dtype, "dtype")
    if not isinstance(module_names, Mapping):
        raise TypeError("module_names must be a mapping {jaxla path: PEFT module name}, got "
                        f"{type(module_names).__name__}")
    config = _read_config(directory)
    weights = os.path.join(directory, WEIGHTS)
    tensors, _ = read_safetensors(weights)
    leaves = dict(_targets.flatten_with_paths(params))
    flip = None if out_in is None else _targets.predicate(out_in, "out_in")
    used, adapters = set(), {}
    for path, template in module_names.items():
        if path not in leaves:
            raise ValueError(f"module_names key {path!r} is not a path of params; available:\n"
                             + _targets.describe_paths(list(leaves.items())))
        n = _n_placeholders(template) if isinstance(template, str) else 0
        shape = tuple(np.shape(leaves[path]))
        if len(shape) != n + 2:
            raise ValueError(
                f"module_names[{path!r}] = {template!r} has {n} '{{}}' placeholders, but the weight "
                f"has shape {shape}: a weight with k stacking axes needs k placeholders"
            )
        a_list, b_list, m_list, alphas = [], [], [], set()
        for _idx, module in _modules(path, template, shape[:n]):
            ka, kb = f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"
            for k in (ka, kb):
                if k not in tensors:
                    raise ValueError(f"{WEIGHTS} has no tensor {k!r} (for jaxla path {path!r})")
            a, b = tensors[ka], tensors[kb]
            declared = _pattern_value(config.ranks, module, config.r)
            if a.ndim != 2 or a.shape[0] != declared:
                raise ValueError(f"{ka!r} has shape {a.shape}; adapter_config.json declares rank "
                                 f"{declared} for {module!r}, so ({declared}, d_in) was expected")
            if b.ndim != 2 or b.shape[1] != declared:
                raise ValueError(f"{kb!r} has shape {b.shape}; adapter_config.json declares rank "
                                 f"{declared} for {module!r}, so (d_out, {declared}) was expected")
            for k, arr in ((ka, a), (kb, b)):
                if not jnp.issubdtype(arr.dtype, jnp.floating):
                    raise ValueError(f"{weights!r}: tensor {k!r} must be floating, got {arr.dtype}")
                check_finite_tensor(arr, f"{weights!r}: tensor {k!r}")
            if config.dora:
                km = f"{PREFIX}{module}.lora_magnitude_vector"
                if km not in tensors:
                    raise ValueError(f"adapter_config.json has use_dora true but {WEIGHTS} has no "
                                     f"tensor {km!r} (for jaxla path {path!r})")
                mv = tensors[km]
                if mv.shape != (b.shape[0],):
                    raise ValueError(f"{km!r} has shape {mv.shape}; expected (d_out,) = "
                                     f"({b.shape[0]},) to match {kb!r} {b.shape}")
                if not jnp.issubdtype(mv.dtype, jnp.floating):
                    raise ValueError(f"{weights!r}: tensor {km!r} must be floating, got {mv.dtype}")
                check_finite_tensor(mv, f"{weights!r}: tensor {km!r}")
                m_list.append(mv)
                used.add(km)
            a_list.append(a)
            b_list.append(b)
            alphas.add(_pattern_value(config.alphas, module, config.alpha))
            used.update((ka, kb))
        if len(alphas) != 1:
            raise ValueError(f"modules stacked into {path!r} have different alphas {sorted(alphas)}")
        for what, arrs in (("lora_A", a_list), ("lora_B", b_list)):
            if len({x.shape for x in arrs}) != 1:
                raise ValueError(f"{what} shapes differ across the modules stacked into {path!r}: "
                                 f"{sorted({x.shape for x in arrs})}")
        a = np.stack(a_list).reshape(*shape[:n], *a_list[0].shape)
        b = np.stack(b_list).reshape(*shape[:n], *b_list[0].shape)
        dt = dtype if dtype is not None else a.dtype
        m = (jnp.asarray(np.stack(m_list).reshape(*shape[:n], *m_list[0].shape), dt)
             if config.dora else None)
        ad = Adapter(jnp.asarray(a, dt), jnp.asarray(b, dt), alphas.pop(), config.rslora,
                     bool(flip(path, leaves[path])) if flip else False, m=m)
        check_pair(path, leaves[path], ad)
        adapters[path] = ad
    unused = sorted(k for k in tensors if k not in used and ".lora_" in k)
    if strict and unused:
        raise ValueError(f"{WEIGHTS} holds LoRA tensors that module_names does not map: {unused[:8]}"
                         + (f" and {len(unused) - 8} more" if len(unused) > 8 else ""))
    return adapters
