"""GGUF files (llama.cpp's format) into a :class:`~jaxla.models.Model`: metadata to a config,
tensors dequantized with the ``gguf`` package, the tokenizer rebuilt from the embedded vocabulary.

A GGUF file is untrusted: the magic is checked first, a truncated or malformed file is a ValueError
naming it, metadata values are type- and range-checked, and every tensor's type and shape is checked
before use. Tensors are mapped to Hugging Face names so the family's ``params_from_hf`` reads them
(one shape check, one layout); llama.cpp's converter stores Llama's Q and K rows permuted for its
interleaved RoPE, and that permutation is undone here for the rotate-half layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxla._host_memory import release_freed_memory
from jaxla.models import _registry
from jaxla.models._family import Model, TensorSource, take

__all__ = ["load_gguf", "tokenizer_from_metadata"]

MAX_VOCAB = 1 << 21
_TOKENIZER_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")

# GGUF tensor names (``{i}`` the layer) -> Hugging Face names.
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight", "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight",
                   "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def _supported_types():
    from gguf import GGMLQuantizationType as Q

    return frozenset({Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K,
                      Q.Q4_K, Q.Q5_K, Q.Q6_K})


def _open(path: Path):
    from gguf import GGUFReader

    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        return GGUFReader(path, "r")
    except Exception as e:  # gguf raises ValueError/IndexError/struct errors on truncated data
        raise ValueError(f"{path}: truncated or malformed GGUF file ({type(e).__name__}: {e})") from None


class _Metadata:
    """Typed access to a reader's key/value fields; errors name the file and key."""

    def __init__(self, reader, where: str):
        self.fields = reader.fields
        self.where = where

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        field = self.fields.get(key)
        if field is None:
            if default is ...:
                raise ValueError(f"{self.where}: missing metadata key {key!r}")
            return default
        try:
            value = field.contents()
        except Exception as e:
            raise ValueError(f"{self.where}: unreadable metadata {key!r} ({e})") from None
        if isinstance(value, bool) and kind is not bool:
            raise ValueError(f"{self.where}: metadata {key!r} must be {kind}, got {value!r}")
        if not isinstance(value, kind):
            raise ValueError(f"{self.where}: metadata {key!r} must be {kind}, got {value!r}")
        return value

    def count(self, key: str, default: Any = ...) -> int:
        value = self.get(key, int, default)
        if value is not None and not 0 < value <= MAX_VOCAB:
            raise ValueError(f"{self.where}: metadata {key!r}={value} is out of range [1, {MAX_VOCAB}]")
        return value

    def list_len(self, key: str) -> int:
        field = self.fields.get(key)
        return 0 if field is None else len(field.data)


def _hf_config(meta: _Metadata, arch: str, vocab_size: int, tied: bool) -> dict[str, Any]:
    n = meta.count(f"{arch}.attention.head_count")
    d = meta.count(f"{arch}.embedding_length")
    scaling = meta.get(f"{arch}.rope.scaling.type", str, None)
    rope_scaling = None
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise ValueError(f"{meta.where}: unsupported {arch}.rope.scaling.type {scaling!r}; "
                             "supported: 'none', 'linear'")
        rope_scaling = {"type": "linear",
                        "factor": float(meta.get(f"{arch}.rope.scaling.factor", (int, float)))}
    head_dim = meta.count(f"{arch}.attention.key_length", None)
    config = {
        "model_type": "qwen2" if arch == "qwen2" else "llama",
        "vocab_size": vocab_size,
        "hidden_size": d,
        "intermediate_size": meta.count(f"{arch}.feed_forward_length"),
        "num_hidden_layers": meta.count(f"{arch}.block_count"),
        "num_attention_heads": n,
        "num_key_value_heads": meta.count(f"{arch}.attention.head_count_kv", n),
        "rms_norm_eps": float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", (int, float))),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", (int, float), 10000.0)),
        "max_position_embeddings": meta.count(f"{arch}.context_length"),
        "tie_word_embeddings": tied,
        "rope_scaling": rope_scaling,
    }
    if head_dim is not None:
        config["head_dim"] = head_dim
    return config


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's row permutation of a Q or K weight (out, in) or bias (out,): within each
    head it stored the rotate-half pairs (k, k + H/2) interleaved as rows 2k, 2k + 1."""
    rows = w.shape[0]
    head_dim = rows // heads
    return w.reshape(heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_source(reader, path: Path, arch: str, layers: int, heads: int,
                   kv_heads: int) -> TensorSource:
    from gguf import quants

    supported = _supported_types()
    by_gguf = {t.name: t for t in reader.tensors}
    # Every name the family may ask for, so a missing one is reported under its GGUF name.
    to_gguf = {hf: gguf for gguf, hf in _GLOBAL_TENSORS.items()}
    for i in range(layers):
        to_gguf.update({f"model.layers.{i}.{hf}": f"blk.{i}.{gguf}"
                        for gguf, hf in _LAYER_TENSORS.items()})
    permute = arch == "llama"
    used = set(to_gguf.values())
    for tensor in reader.tensors:  # every type checked before any data is decoded
        if tensor.name in used and tensor.tensor_type not in supported:
            raise ValueError(f"{path}: tensor {tensor.name!r} has the unsupported type "
                             f"{tensor.tensor_type.name}; supported: "
                             f"{sorted(t.name for t in supported)}")

    def read(hf_name: str) -> np.ndarray:
        gguf_name = to_gguf[hf_name]
        if gguf_name not in by_gguf:
            raise ValueError(f"{path}: missing tensor {gguf_name!r}")
        tensor = by_gguf[gguf_name]
        try:
            x = np.asarray(quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
            # An F32 tensor decodes to a view of the memory-mapped file, and an array built on a
            # view (JAX aliases host buffers on CPU) would keep the whole file mapped: copy those
            # only (copying every decoded tensor would leave freed copies resident).
            if np.may_share_memory(x, tensor.data):
                x = x.copy()
        except Exception as e:
            raise ValueError(f"{path}: cannot decode tensor {gguf_name!r} ({e})") from None
        expected = tuple(int(n) for n in reversed(tensor.shape))
        if x.shape != expected:  # a truncated data block
            raise ValueError(f"{path}: tensor {gguf_name!r} decodes to {x.shape}, expected {expected}")
        if permute and ".attn_q." in gguf_name:
            x = _unpermute(x, heads)
        elif permute and ".attn_k." in gguf_name:
            x = _unpermute(x, kv_heads)
        return x

    return TensorSource(f"{path} (GGUF, names as in Hugging Face)", frozenset(to_gguf), read)


_PRE_TOKENIZERS = ("default", "gpt2", "smollm", "starcoder", "refact", "llama-bpe", "llama3",
                   "qwen2")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(pre: str, where: str):
    from tokenizers import Regex, pre_tokenizers

    if pre in ("default", "gpt2"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact"):
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                 use_regex=True)])
    if pre in ("llama-bpe", "llama3", "qwen2"):
        split = _QWEN2_SPLIT if pre == "qwen2" else _LLAMA3_SPLIT
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise ValueError(f"{where}: unsupported tokenizer.ggml.pre {pre!r}; supported: {_PRE_TOKENIZERS}")


def tokenizer_from_metadata(reader, where: str):
    """A ``tokenizers.Tokenizer`` from ``tokenizer.ggml.*`` metadata (byte-level BPE, ``gpt2``
    model), or None when the file has no tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    meta = _Metadata(reader, where)
    kind = meta.get("tokenizer.ggml.model", str, None)
    if kind is None:
        return None
    if kind != "gpt2":
        raise ValueError(f"{where}: unsupported tokenizer.ggml.model {kind!r}; supported: 'gpt2' "
                         "(byte-level BPE)")
    for key in _TOKENIZER_KEYS:
        if meta.list_len(key) > MAX_VOCAB:
            raise ValueError(f"{where}: {key} has more than {MAX_VOCAB} entries")
    tokens = meta.get("tokenizer.ggml.tokens", list)
    merges = meta.get("tokenizer.ggml.merges", list, [])
    types = meta.get("tokenizer.ggml.token_type", list, [1] * len(tokens))
    if not all(isinstance(t, str) for t in tokens) or len(set(tokens)) != len(tokens):
        raise ValueError(f"{where}: tokenizer.ggml.tokens must be distinct strings")
    if len(types) != len(tokens):
        raise ValueError(f"{where}: tokenizer.ggml.token_type has {len(types)} entries for "
                         f"{len(tokens)} tokens")
    pairs = []
    for m in merges:
        parts = m.split(" ") if isinstance(m, str) else []
        if len(parts) != 2:
            raise ValueError(f"{where}: tokenizer.ggml.merges entry {m!r} is not 'left right'")
        pairs.append((parts[0], parts[1]))
    tokenizer = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, pairs, ignore_merges=False))
    tokenizer.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", str, "default"), where)
    tokenizer.decoder = decoders.ByteLevel()
    control = [AddedToken(t, special=True, normalized=False)
               for t, kind in zip(tokens, types, strict=True) if kind == 3]
    user = [AddedToken(t, special=False, normalized=False)
            for t, kind in zip(tokens, types, strict=True) if kind == 4]
    if control:
        tokenizer.add_special_tokens(control)
    if user:
        tokenizer.add_tokens(user)
    bos = meta.get("tokenizer.ggml.bos_token_id", int, None)
    if meta.get("tokenizer.ggml.add_bos_token", bool, False) and bos is not None:
        if not 0 <= bos < len(tokens):
            raise ValueError(f"{where}: tokenizer.ggml.bos_token_id={bos} is not a token id")
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A {tokens[bos]} $B",
            special_tokens=[(tokens[bos], bos)])
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


# GGUF types kept packed as QArrays
_KEPT = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1", "Q4_K": "q4_k", "Q6_K": "q6_k"}


def _kept_params(reader, path: Path, config, source: TensorSource, dtype: Any) -> dict[str, Any]:
    """Llama-family params whose Q8_0/Q4_0/Q4_1/Q4_K/Q6_K kernels and embedding stay as the file's blocks
    (:class:`jaxla.quant.QArray`, layers stacked on a leading L axis); every other tensor (norms,
    biases, other types, a projection whose layers mix types) is decoded to ``dtype``."""
    from jaxla.models import _llama
    from jaxla.quant import _qarray

    by_gguf = {t.name: t for t in reader.tensors}
    dims = _llama._dims(config)

    def kept_format(gguf_name: str, rows: int, columns: int) -> str | None:
        """The tensor's kept format, checked against (rows, columns) without reading its data, or
        None when its type is not kept (or it is absent)."""
        tensor = by_gguf.get(gguf_name)
        if tensor is None or tensor.tensor_type.name not in _KEPT:
            return None
        fmt = _KEPT[tensor.tensor_type.name]
        block, nbytes = _qarray.GGUF_FORMATS[fmt]
        data = tuple(np.shape(tensor.data))
        if (tuple(int(n) for n in reversed(tensor.shape)) != (rows, columns) or columns % block
                or data != (rows, columns // block * nbytes)):
            raise ValueError(f"{path}: tensor {gguf_name!r} ({tensor.tensor_type.name}, shape "
                             f"{tuple(reversed(tensor.shape))}, data {data}) does not fit "
                             f"({rows}, {columns}) from the model's config")
        return fmt

    def raw_stack(gguf_names: list[str], rows: int, columns: int, heads: int | None = None):
        """(format, raw blocks (len(names), rows, bytes)) when every tensor has the same kept
        format, else None. The blocks are copied out of the mapping (a view would keep the whole
        file mapped, and resident) straight into one array: no per-tensor copy is made and freed,
        since the freed copies stayed resident in the allocator (measured: 2026-12-02 RESULTS).
        ``heads`` undoes llama.cpp's Q/K row permutation on whole rows of blocks while copying."""
        formats = {kept_format(name, rows, columns) for name in gguf_names}
        if len(formats) != 1 or None in formats:
            return None
        fmt = formats.pop()
        nbytes = columns // _qarray.GGUF_FORMATS[fmt][0] * _qarray.GGUF_FORMATS[fmt][1]
        out = np.empty((len(gguf_names), rows, nbytes), np.uint8)
        for i, name in enumerate(gguf_names):
            data = by_gguf[name].data
            if heads is None:
                out[i] = data
            else:  # as _unpermute, written in place: (heads, 2, half, bytes) <- (heads, half, 2, ...)
                half = rows // heads // 2
                out[i].reshape(heads, 2, half, nbytes)[...] = (
                    np.asarray(data).reshape(heads, half, 2, nbytes).swapaxes(1, 2))
        return fmt, out

    def cast(x):
        return jnp.asarray(np.asarray(x, np.float32), dtype)

    layers: dict[str, Any] = {"attn_norm": {"scale": cast(np.stack([
        take(source, f"model.layers.{i}.input_layernorm.weight", (dims["d"],))
        for i in range(config.num_layers)]))}, "mlp_norm": {"scale": cast(np.stack([
            take(source, f"model.layers.{i}.post_attention_layernorm.weight", (dims["d"],))
            for i in range(config.num_layers)]))}, "attn": {}, "mlp": {}}
    gguf_of = {hf: g for g, hf in _LAYER_TENSORS.items()}
    heads = {"attn/q": config.num_heads, "attn/k": config.num_kv_heads}
    for jpath, module, din, dout, bias in _llama._PROJECTIONS:
        group, name = jpath.split("/")
        rows, columns = dims[dout], dims[din]
        kept = raw_stack([f"blk.{i}.{gguf_of[module + '.weight']}" for i in range(config.num_layers)],
                         rows, columns, heads.get(jpath))                  # (L, O, bytes)
        if kept is not None:
            w = _qarray.from_gguf_blocks(kept[1], kept[0], columns=columns, dtype=dtype)
        else:
            w = cast(np.stack([take(source, f"model.layers.{i}.{module}.weight", (rows, columns)).T
                               for i in range(config.num_layers)]))
        entry = {"w": w}
        if getattr(config, bias):
            entry["b"] = cast(np.stack([take(source, f"model.layers.{i}.{module}.bias", (rows,))
                                        for i in range(config.num_layers)]))
        layers[group][name] = entry
    d, v = config.hidden_size, config.vocab_size
    table = raw_stack(["token_embd.weight"], v, d)
    table = (_qarray.from_gguf_blocks(table[1][0], table[0], columns=d, axis=-1, dtype=dtype)
             if table else cast(take(source, "model.embed_tokens.weight", (v, d))))
    params = {"embed": {"table": table}, "layers": layers,
              "norm": {"scale": cast(take(source, "model.norm.weight", (d,)))}}
    if not config.tie_word_embeddings:
        head = raw_stack(["output.weight"], v, d)
        params["lm_head"] = {"w": _qarray.from_gguf_blocks(head[1][0], head[0], columns=d,
                                                           dtype=dtype)
                             if head else cast(take(source, "lm_head.weight", (v, d)).T)}
    return params


def load_gguf(path: str | Path, *, dtype: Any = jnp.float32, keep_quantized: bool = False) -> Model:
    """Reads a GGUF file into a :class:`Model` (see the module docstring).

    With ``keep_quantized`` the Q8_0/Q4_0/Q4_1/Q4_K/Q6_K kernels and embedding table stay packed as
    :class:`jaxla.quant.QArray` (exactly the file's bytes, stacked per layer); other tensors are
    decoded to ``dtype``.

    Raises:
      ValueError: not GGUF, truncated, an unsupported architecture (the supported ones listed), an
        unsupported tensor type, tokenizer or option, a missing or mis-shaped tensor (named).
    """
    model = _load(Path(path), dtype, keep_quantized)  # the reader and its parsed fields die here
    release_freed_memory()  # the reader's parsed vocabulary and host copies of the tensors
    return model


def _load(path: Path, dtype: Any, keep_quantized: bool) -> Model:
    reader = _open(path)
    where = str(path)
    meta = _Metadata(reader, where)
    arch = meta.get("general.architecture", str)
    family = _registry.for_gguf_architecture(arch, where)
    names = {t.name for t in reader.tensors}
    vocab = meta.list_len("tokenizer.ggml.tokens") or meta.count(f"{arch}.vocab_size", None)
    if not vocab:
        raise ValueError(f"{where}: no tokenizer.ggml.tokens or {arch}.vocab_size to size the vocabulary")
    if f"{arch}.rope.freqs" in meta.fields or "rope_freqs.weight" in names:
        raise ValueError(f"{where}: per-frequency RoPE factors (rope_freqs.weight, Llama 3.1 "
                         "scaling) are not supported in GGUF; load the Hugging Face checkpoint")
    hf_config = _hf_config(meta, arch, vocab, tied="output.weight" not in names)
    config = family.config_from_hf(hf_config)
    source = _tensor_source(reader, path, arch, config.num_layers, config.num_heads,
                            config.num_kv_heads)
    if keep_quantized:
        params = _kept_params(reader, path, config, source, dtype)
    else:
        params = family.params_from_hf(config, source, dtype)
    tokenizer = tokenizer_from_metadata(reader, where)
    template = meta.get("tokenizer.chat_template", str, None)
    return Model(config=config, params=params, tokenizer=tokenizer, chat_template=template,
                 source=where)
