"""Scaled dot-product attention, multi-head attention and rotary position embeddings.

The public names are re-exported flat from ``jaxla``; this package holds the implementations:

* ``_args.py``: the canonical argument record ``AttentionArgs`` and every argument check;
* ``_base.py``: the backend protocol (``unsupported_reason`` + ``attend``) and the one output
  normalisation (dtype, empty rows, empty shapes) every backend goes through;
* ``_api.py``: the public functions and the choice of backend (its docstring says how to add one);
* one module per backend: ``_reference.py`` ("xla", the definition), ``_chunked.py`` ("chunked",
  plain-JAX flash attention), ``_cpu.py`` + ``_cpu_ext.cc`` ("cpu", compiled kernels through XLA's
  FFI), ``_pallas*.py`` ("pallas", Triton/Mosaic kernels);
* ``_partition.py``: the compiled backends run per batch/head shard on explicitly sharded inputs;
* ``_ring.py``: ring attention (the sequence split over a ``shard_map`` mesh axis) and its layouts;
* ``_masks.py``: the visibility rule (causal and window folded into one band), shared by all;
* ``_mha.py``, ``_rope.py``: the multi-head attention block and rotary embeddings.

``pallas_attention`` and ``PallasBlockSizes`` import the Pallas modules on first use, so importing
jaxla does not.
"""

from jaxla.attention._api import (
    IMPLEMENTATIONS,
    attention_weights,
    dot_product_attention,
    select_implementation,
)
from jaxla.attention._chunked import ChunkedBlockSizes
from jaxla.attention._mha import (
    init_kv_cache,
    init_mha,
    multi_head_attention,
    multi_head_attention_decode,
)
from jaxla.attention._reference import EMPTY_ROW_LSE
from jaxla.attention._ring import from_ring_layout, ring_attention, to_ring_layout
from jaxla.attention._rope import apply_rope, rope_frequencies

_LAZY = {"pallas_attention": "pallas_attention", "PallasBlockSizes": "BlockSizes"}


def __getattr__(name):
    if name in _LAZY:
        from jaxla.attention import _pallas

        return getattr(_pallas, _LAZY[name])
    raise AttributeError(f"module 'jaxla.attention' has no attribute {name!r}")


__all__ = [
    "EMPTY_ROW_LSE",
    "IMPLEMENTATIONS",
    "ChunkedBlockSizes",
    "PallasBlockSizes",
    "apply_rope",
    "attention_weights",
    "dot_product_attention",
    "from_ring_layout",
    "init_kv_cache",
    "init_mha",
    "multi_head_attention",
    "multi_head_attention_decode",
    "pallas_attention",
    "ring_attention",
    "rope_frequencies",
    "select_implementation",
    "to_ring_layout",
]
