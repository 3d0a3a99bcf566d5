"""jaxla: the linear algebra at the heart of LLMs, as pure JAX functions.

Flat public API. Subpackages with their own namespaces: ``jaxla.lora``, ``jaxla.quant`` and
``jaxla.spectral``.
"""

from jaxla import lora, quant, spectral
from jaxla._linear import init_linear, init_mlp, linear, mlp
from jaxla._norms import embed, init_embedding, init_layer_norm, layer_norm, rms_norm
from jaxla._vectors import (
    cosine_similarity,
    dot,
    normalize,
    pairwise_cosine,
    project,
    top_k_similar,
)

# ---- attention (issue 3) ----
from jaxla.attention import (
    ChunkedBlockSizes,
    apply_rope,
    attention_weights,
    dot_product_attention,
    init_kv_cache,
    init_mha,
    multi_head_attention,
    multi_head_attention_decode,
    ring_attention,
    rope_frequencies,
)

# ---- end attention ----

__version__ = "0.1.0"

__all__ = [
    "ChunkedBlockSizes",
    "__version__",
    "apply_rope",
    "attention_weights",
    "cosine_similarity",
    "dot",
    "dot_product_attention",
    "embed",
    "init_embedding",
    "init_kv_cache",
    "init_layer_norm",
    "init_linear",
    "init_mha",
    "init_mlp",
    "layer_norm",
    "linear",
    "lora",
    "mlp",
    "multi_head_attention",
    "multi_head_attention_decode",
    "normalize",
    "pairwise_cosine",
    "project",
    "quant",
    "ring_attention",
    "rms_norm",
    "rope_frequencies",
    "spectral",
    "top_k_similar",
]
