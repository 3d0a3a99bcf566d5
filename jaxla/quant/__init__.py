"""Quantized frozen bases (QLoRA): 8- and 4-bit matrices that ``jaxla.linear`` and
``jaxla.lora.linear`` use in place of a float kernel ``w``.

Dimension legend: ``...`` stacking axes (layers), I ``d_in``, O ``d_out``.

* :func:`quantize` / :func:`dequantize` / :class:`QArray`: the formats ``int8`` (per output channel),
  ``nf4`` (QLoRA's NormalFloat, optional double quantization), ``int4`` (asymmetric blockwise) and
  GGUF's ``q8_0``, ``q4_0``, ``q4_1`` kept as the file's bytes (:func:`from_gguf_blocks`).
* :func:`kernel`: the decoded kernel for a matmul, cut off from autodiff (a frozen base gets no
  gradient); :func:`tree_nbytes`: resident parameter bytes of any pytree.
* :func:`rows_product`: ``x · Rowsᵀ`` of a QArray's stored rows in the fused dequantize-and-multiply
  CPU kernel (what ``jaxla.linear``, ``lora.linear`` and the tied head use on CPU for up to
  :data:`MAX_FUSED_ROWS` rows; :func:`fused_reason` says when it cannot), :func:`decoded_product`
  the jnp path; :func:`fused_path` / :func:`fused_paths`: the kernel's code path and those this CPU
  runs.
"""

from jaxla.quant._fused import MAX_FUSED_ROWS, decoded_product, fused_reason, rows_product
from jaxla.quant._fused import kernel_path as fused_path
from jaxla.quant._fused import supported_paths as fused_paths
from jaxla.quant._qarray import (
    FORMATS,
    GGUF_FORMATS,
    NF4_TABLE,
    QArray,
    dequantize,
    from_gguf_blocks,
    is_qarray,
    quantize,
    take_rows,
)
from jaxla.quant._use import kernel, tree_nbytes

__all__ = ["FORMATS", "GGUF_FORMATS", "MAX_FUSED_ROWS", "NF4_TABLE", "QArray", "decoded_product",
           "dequantize", "from_gguf_blocks", "fused_path", "fused_paths", "fused_reason",
           "is_qarray", "kernel", "quantize", "rows_product", "take_rows", "tree_nbytes"]
