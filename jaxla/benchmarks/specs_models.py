"""Shapes and files shared by the models benchmark and tests: SmolLM2-135M with an 84-token prompt
(the issue's measurement), and tiny random Llama configs for ``--quick`` and the compile-time-vs-
depth check."""

from __future__ import annotations

import os
from pathlib import Path

PROMPT_TOKENS = 84
DECODE_TOKENS = 32
QUICK_DECODE_TOKENS = 8
SMOLLM2 = "smollm2-135m-instruct"

# Keyword arguments of jaxla.models.LlamaConfig (SmolLM2's shape, shrunk).
TINY_CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=512,
                   tie_word_embeddings=True)
DEPTHS = (2, 30)

# The figures for SmolLM2-135M on this 2-core CPU (84-token prompt, separate runs).
REFERENCE_TOKENS_PER_S = {
    "transformers f32 (issue)": {"prefill": (300.0, 460.0), "decode": (15.0, 22.0)},
    "llama.cpp Q4_1 (issue)": {"prefill": (260.0, 370.0), "decode": (117.0, 149.0)},
}


def cache_dir() -> Path:
    """``$JAXLA_CACHE`` or ``~/.cache/jaxla``."""
    return Path(os.environ.get("JAXLA_CACHE", Path.home() / ".cache" / "jaxla"))


def smollm2_file() -> Path | None:
    """The cached SmolLM2 GGUF file (``jaxla download smollm2-135m-instruct``), or None."""
    found = sorted((cache_dir() / SMOLLM2).glob("**/*.gguf"))
    return found[0] if found else None
