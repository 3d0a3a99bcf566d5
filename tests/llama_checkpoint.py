"""Test helpers for the Llama family: tiny random checkpoints written as Hugging Face directories
and as GGUF files (F32/F16/Q8_0/Q4_1 tensors, llama.cpp's Q/K permutation, BPE tokenizer metadata),
shared by the models tests and the demo tests (test modules do not import each other)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

# D=32 keeps every GGUF row a whole number of 32-wide quantization blocks.
TINY = dict(vocab_size=67, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500.0,
            max_position_embeddings=64)


def _gguf():
    import gguf

    return gguf


def random_weights(hf, rng):
    d, f, v = hf["hidden_size"], hf["intermediate_size"], hf["vocab_size"]
    nh = hf["num_attention_heads"] * (d // hf["num_attention_heads"])
    kh = hf["num_key_value_heads"] * (d // hf["num_attention_heads"])
    bias = hf["model_type"] == "qwen2"

    def mat(o, i):
        return (rng.standard_normal((o, i)) / math.sqrt(i)).astype(np.float32)

    w = {"model.embed_tokens.weight": rng.standard_normal((v, d)).astype(np.float32),
         "model.norm.weight": (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)}
    if not hf["tie_word_embeddings"]:
        w["lm_head.weight"] = mat(v, d)
    for layer in range(hf["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        for name, (o, i) in {"self_attn.q_proj": (nh, d), "self_attn.k_proj": (kh, d),
                             "self_attn.v_proj": (kh, d), "self_attn.o_proj": (d, nh),
                             "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d),
                             "mlp.down_proj": (d, f)}.items():
            w[p + name + ".weight"] = mat(o, i)
            if bias and name[-6:] in ("q_proj", "k_proj", "v_proj"):
                w[p + name + ".bias"] = (0.1 * rng.standard_normal(o)).astype(np.float32)
        for name in ("input_layernorm", "post_attention_layernorm"):
            w[p + name + ".weight"] = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
    return w


def write_hf(directory: Path, hf, w):
    import safetensors.numpy as safetensors_numpy

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({**hf, "hidden_act": "silu"}))
    safetensors_numpy.save_file(w, str(directory / "model.safetensors"))
    return directory


def llama_cpp_permute(x, heads):
    """llama.cpp's converter: each head's rotate-half pairs (k, k + H/2) stored as rows 2k, 2k+1."""
    return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


GGUF_NAMES = {"input_layernorm.weight": "attn_norm.weight",
              "post_attention_layernorm.weight": "ffn_norm.weight",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def gguf_name(hf_name):
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf_name in top:
        return top[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    for key, value in GGUF_NAMES.items():
        if rest.startswith(key):
            return f"blk.{layer}.{value}{rest[len(key):]}"
    raise KeyError(hf_name)


def write_gguf(path: Path, hf, w, *, types=None, arch="llama", tokenizer=None, template=None,
               skip=()):
    """A GGUF file of the HF weights ``w``; ``types`` maps a GGUF-name suffix to its tensor type.
    Returns the weights as the loader should see them (quantized and dequantized, HF layout)."""
    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    types = types or {}
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_uint32(f"{arch}.context_length", hf["max_position_embeddings"])
    writer.add_uint32(f"{arch}.embedding_length", hf["hidden_size"])
    writer.add_uint32(f"{arch}.block_count", hf["num_hidden_layers"])
    writer.add_uint32(f"{arch}.feed_forward_length", hf["intermediate_size"])
    writer.add_uint32(f"{arch}.attention.head_count", hf["num_attention_heads"])
    writer.add_uint32(f"{arch}.attention.head_count_kv", hf["num_key_value_heads"])
    writer.add_float32(f"{arch}.rope.freq_base", hf["rope_theta"])
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", hf["rms_norm_eps"])
    if tokenizer is None:
        writer.add_uint32(f"{arch}.vocab_size", hf["vocab_size"])
    else:
        vocab, merges, token_types, pre = tokenizer
        writer.add_string("tokenizer.ggml.model", "gpt2")
        writer.add_string("tokenizer.ggml.pre", pre)
        writer.add_array("tokenizer.ggml.tokens", vocab)
        writer.add_array("tokenizer.ggml.merges", merges)
        writer.add_array("tokenizer.ggml.token_type", token_types)
        writer.add_uint32("tokenizer.ggml.eos_token_id", 0)
    if template is not None:
        writer.add_chat_template(template)
    seen = {}
    for name, x in w.items():
        g = gguf_name(name)
        if g in skip:
            continue
        x = np.asarray(x, np.float32)
        if arch == "llama" and (".attn_q." in g or ".attn_k." in g):
            x = llama_cpp_permute(x, hf["num_attention_heads"] if ".attn_q." in g
                                  else hf["num_key_value_heads"])
        kind = next((t for suffix, t in types.items() if g.endswith(suffix)), Q.F32)
        if x.ndim == 1:
            kind = Q.F32  # llama.cpp keeps norms and biases in F32
        if kind == Q.F32:
            stored, seen_as = x, x
        elif kind == Q.F16:
            stored = x.astype(np.float16)
            seen_as = stored.astype(np.float32)
        else:
            stored = gguf.quants.quantize(x, kind)
            seen_as = gguf.quants.dequantize(stored, kind)
        writer.add_tensor(g, stored, raw_dtype=None if kind in (Q.F32, Q.F16) else kind)
        if arch == "llama" and (".attn_q." in g or ".attn_k." in g):
            heads = hf["num_attention_heads"] if ".attn_q." in g else hf["num_key_value_heads"]
            h = seen_as.shape[0] // heads
            seen_as = seen_as.reshape(heads, h // 2, 2, *seen_as.shape[1:]).swapaxes(1, 2).reshape(
                seen_as.shape)
        seen[name] = seen_as
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return seen


def tiny_tokenizer(sentences=("the cat sat on the mat", "hello world, the end", "ünïcödé 123"),
                   vocab_size=TINY["vocab_size"] + 300):
    """A byte-level BPE trained on a few sentences (the reference), and its GGUF metadata."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tok_models

    ref = Tokenizer(tok_models.BPE())
    ref.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    ref.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    ref.train_from_iterator(list(sentences) * 5, trainer)
    state = json.loads(ref.to_str())["model"]
    vocab = sorted(state["vocab"], key=state["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["merges"]]
    types = [3] + [1] * (len(vocab) - 1)
    return ref, (vocab, merges, types, "gpt2")
