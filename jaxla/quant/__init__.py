"""Quantized frozen bases (QLoRA): 8- and 4-bit matrices that ``jaxla.linear`` and
``jaxla.lora.linear`` use in place of a float kernel ``w``.

Dimension legend: ``...`` stacking axes (layers), I ``d_in``, O ``d_out``.

* :func:`quantize` / :func:`dequantize` / :class:`QArray`: the formats ``int8`` (per output channel),
  ``nf4`` (QLoRA's NormalFloat, optional double quantization), ``int4`` (asymmetric blockwise) and
  GGUF's ``q8_0``, ``q4_0``, ``q4_1`` kept as the file's bytes (:func:`from_gguf_blocks`).
* :func:`kernel`: the decoded kernel for a matmul, cut off from autodiff (a frozen base gets no
  gradient); :func:`tree_nbytes`: resident parameter bytes of any pytree.
"""

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

__all__ = ["FORMATS", "GGUF_FORMATS", "NF4_TABLE", "QArray", "dequantize", "from_gguf_blocks",
           "is_qarray", "kernel", "quantize", "take_rows", "tree_nbytes"]
