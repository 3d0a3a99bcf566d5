"""Test helpers for the BERT family: tiny random Hugging Face checkpoints written with the
safetensors and tokenizers packages, and an independent float64 NumPy BERT forward that reads the
checkpoint's own (PyTorch-layout) tensors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

TINY = {
    "model_type": "bert", "architectures": ["BertModel"], "vocab_size": 40, "hidden_size": 16,
    "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 24,
    "max_position_embeddings": 12, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
    "hidden_act": "gelu", "position_embedding_type": "absolute", "pad_token_id": 0,
}
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "cat", "sat", "on", "mat", "a", "dog", "ran",
         "##s", "##ing", "red", "big", "small", "house", "tree", "bird", ".", ","]


def tiny_tensors(rng: np.random.Generator, hf: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """Random float32 tensors of a BertModel with config ``hf``, named as Hugging Face saves them."""
    d, f, n_layers = hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"]

    def w(*shape, scale=None):
        scale = 1.0 / math.sqrt(shape[-1]) if scale is None else scale
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    t = {
        "embeddings.word_embeddings.weight": w(hf["vocab_size"], d, scale=1.0),
        "embeddings.position_embeddings.weight": w(hf["max_position_embeddings"], d, scale=0.5),
        "embeddings.token_type_embeddings.weight": w(hf["type_vocab_size"], d, scale=0.5),
        "embeddings.LayerNorm.weight": 1 + w(d, scale=0.1), "embeddings.LayerNorm.bias": w(d, scale=0.1),
        "embeddings.position_ids": np.arange(hf["max_position_embeddings"], dtype=np.int64)[None],
        "pooler.dense.weight": w(d, d), "pooler.dense.bias": w(d, scale=0.1),
    }
    for i in range(n_layers):
        p = f"encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.output.dense"):
            t[p + name + ".weight"], t[p + name + ".bias"] = w(d, d), w(d, scale=0.1)
        t[p + "intermediate.dense.weight"], t[p + "intermediate.dense.bias"] = w(f, d), w(f, scale=0.1)
        t[p + "output.dense.weight"], t[p + "output.dense.bias"] = w(d, f), w(d, scale=0.1)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            t[p + name + ".weight"], t[p + name + ".bias"] = 1 + w(d, scale=0.1), w(d, scale=0.1)
    return {prefix + k: v for k, v in t.items()}


def write_tokenizer(directory: Path) -> None:
    """A WordPiece tokenizer.json over :data:`WORDS`, with BERT's normalizer and [CLS]/[SEP]."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = {word: i for i, word in enumerate(WORDS)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(WORDS[:4])
    tok.save(str(directory / "tokenizer.json"))


def write_checkpoint(directory: Path, rng: np.random.Generator, hf: dict | None = None, *,
                     prefix: str = "", tokenizer: bool = True,
                     tensors: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Writes config.json + model.safetensors (+ tokenizer.json); returns the tensors."""
    from safetensors.numpy import save_file

    hf = dict(TINY if hf is None else hf)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = tiny_tensors(rng, hf, prefix) if tensors is None else tensors
    (directory / "config.json").write_text(json.dumps(hf))
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer:
        write_tokenizer(directory)
    return tensors


def _layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def _act(name, x):
    if name == "gelu":
        erf = np.vectorize(math.erf)
        return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))
    if name == "gelu_new":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    return np.maximum(x, 0.0)


def np_bert(tensors, hf, ids, mask=None, token_types=None, positions=None, prefix=""):
    """Float64 BertModel last hidden states (B, T, D) from the checkpoint's own tensors."""
    t = {k[len(prefix):]: np.asarray(v, np.float64) for k, v in tensors.items()
         if k.startswith(prefix)}
    ids = np.asarray(ids)
    b, n_tok = ids.shape
    mask = np.ones((b, n_tok), bool) if mask is None else np.asarray(mask)
    token_types = np.zeros_like(ids) if token_types is None else np.asarray(token_types)
    if positions is None:
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    eps, n = hf["layer_norm_eps"], hf["num_attention_heads"]
    d = hf["hidden_size"]
    h = d // n
    x = (t["embeddings.word_embeddings.weight"][ids]
         + t["embeddings.position_embeddings.weight"][positions]
         + t["embeddings.token_type_embeddings.weight"][token_types])
    x = _layer_norm(x, t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"], eps)

    def lin(name, v):
        return v @ t[name + ".weight"].T + t[name + ".bias"]

    for i in range(hf["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        q, k, v = (lin(p + f"attention.self.{m}", x).reshape(b, n_tok, n, h)
                   for m in ("query", "key", "value"))
        scores = np.einsum("btnh,bsnh->bnts", q, k) / math.sqrt(h)
        scores = np.where(mask[:, None, None, :], scores, -np.inf)
        scores = scores - scores.max(-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(-1, keepdims=True)
        ctx = np.einsum("bnts,bsnh->btnh", probs, v).reshape(b, n_tok, d)
        x = _layer_norm(x + lin(p + "attention.output.dense", ctx),
                        t[p + "attention.output.LayerNorm.weight"],
                        t[p + "attention.output.LayerNorm.bias"], eps)
        up = _act(hf["hidden_act"], lin(p + "intermediate.dense", x))
        x = _layer_norm(x + lin(p + "output.dense", up), t[p + "output.LayerNorm.weight"],
                        t[p + "output.LayerNorm.bias"], eps)
    return x


def np_mean_pool(hidden, mask):
    """sentence-transformers' mean pooling over real tokens, then L2 normalisation."""
    m = np.asarray(mask, np.float64)[..., None]
    mean = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)
