"""Scaled dot-product attention, multi-head attention and rotary position embeddings.

The public names are re-exported flat from ``jaxla``; this package holds the implementations.
"""

from jaxla.attention._api import attention_weights, dot_product_attention
from jaxla.attention._chunked import ChunkedBlockSizes

__all__ = ["ChunkedBlockSizes", "attention_weights", "dot_product_attention"]
