"""Scaled dot-product attention, multi-head attention and rotary position embeddings.

The public names are re-exported flat from ``jaxla``; this package holds the implementations.
"""

from jaxla.attention._api import attention_weights, dot_product_attention
from jaxla.attention._chunked import ChunkedBlockSizes
from jaxla.attention._mha import (
    init_kv_cache,
    init_mha,
    multi_head_attention,
    multi_head_attention_decode,
)
from jaxla.attention._rope import apply_rope, rope_frequencies

__all__ = [
    "ChunkedBlockSizes",
    "apply_rope",
    "attention_weights",
    "dot_product_attention",
    "init_kv_cache",
    "init_mha",
    "multi_head_attention",
    "multi_head_attention_decode",
    "rope_frequencies",
]
