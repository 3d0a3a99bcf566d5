"""LoRA as pure functions: adapters for any parameter pytree, exact merge, Optax training, PEFT files.

Conventions (used by every function in this namespace)
-------------------------------------------------------
Dimension legend: I ``d_in``, O ``d_out``, r rank, ``...`` stacking axes (layers, experts), B batch,
E stacked adapter sets.

* jaxla stores a weight as ``W: (I, O)`` so that ``y = x @ W``. Its adapter is
  ``Adapter(a: (r, I), b: (O, r))`` — the paper's and PEFT's ``lora_A.weight`` / ``lora_B.weight``
  shapes — with ``b = 0`` at initialisation so a fresh adapter changes nothing.
* The update in jaxla's layout is ``ΔW = scale · (b @ a)ᵀ = scale · aᵀ bᵀ``, shape ``(I, O)``, with
  ``scale = alpha / r``, or ``alpha / √r`` for rank-stabilised LoRA (``rslora=True``).
* Stacked weights ``(..., I, O)`` get adapters with the same leading axes: a ``(..., r, I)``,
  b ``(..., O, r)``. Weights stored ``(..., O, I)`` (Equinox, PyTorch) are marked ``out_in``; their
  update is ``scale · b @ a``.
* The adapters of a model are a plain dict ``{path: Adapter}`` keyed by the "/"-joined key path of
  each adapted leaf (``"params/Dense_0/kernel"``, ``"layers/0/kernel/value"``, ...). ``Adapter`` is a
  registered pytree whose children are ``a`` and ``b`` (and, when set, DoRA's magnitude ``m`` and the
  array scale ``gain``; a plain adapter has neither, so its leaves are exactly ``a`` and ``b``);
  ``alpha``, ``rslora`` and ``out_in`` are static treedef data, so jit, grad, vmap, Optax and
  safetensors see only the arrays and the scale is never traced, trained or weight-decayed.
  (Changing alpha therefore recompiles; switching between adapters of the same shapes does not, and
  :func:`pad_rank` makes adapters of any rank and alpha share one compiled program.)
* Products accumulate in float32 (float64 for float64 inputs). :func:`linear` computes
  ``x·W + b + scale·((x·aᵀ)·bᵀ)`` without forming an (I, O) update; :func:`merge` accumulates
  ``W + ΔW`` in float32 and rounds to W's dtype once; :func:`unmerge` subtracts; both return the
  largest absolute rounding error.

Beyond plain LoRA: DoRA (``init(..., dora=True)``: a trainable magnitude ``m`` per output column),
LoRA dropout (``linear(..., dropout=p, dropout_key=k)``), OLoRA beside PiSSA (``init_olora``) and
:func:`to_lora_delta` for both, adapter arithmetic with PEFT's rules (:func:`combine`), and
hot-swapping adapters of any rank and alpha into one compiled function (:func:`pad_rank`).

Typical use::

    adapters = lora.init(key, params, rank=8, alpha=16, targets=r"(q|v)_proj/kernel")
    loss_fn = lambda p, ad, x, y: loss(lora.wrap(model.apply)(p, ad, x), y)
    step = lora.train_step(loss_fn, optax.adamw(1e-4))
    opt_state = optax.adamw(1e-4).init(adapters)
    adapters, opt_state, loss = step(params, adapters, opt_state, x, y)
    lora.save("adapter.safetensors", adapters)
    merged, err = lora.merge(params, adapters)
"""

from jaxla.lora._adapter import Adapter, delta, scale_of
from jaxla.lora._batched import linear_batched, stack, wrap_batched
from jaxla.lora._combine import METHODS, combine
from jaxla.lora._core import (
    ParamCount,
    check_compatible,
    count_params,
    dora_norms,
    linear,
    merge,
    unmerge,
    wrap,
)
from jaxla.lora._init import init, init_olora, init_pissa, to_lora_delta
from jaxla.lora._io import load, save
from jaxla.lora._peft import load_peft, save_peft
from jaxla.lora._swap import pad_rank
from jaxla.lora._train import loraplus, scale_b, train_step

__all__ = [
    "METHODS",
    "Adapter",
    "ParamCount",
    "check_compatible",
    "combine",
    "count_params",
    "delta",
    "dora_norms",
    "init",
    "init_olora",
    "init_pissa",
    "linear",
    "linear_batched",
    "load",
    "load_peft",
    "loraplus",
    "merge",
    "pad_rank",
    "save",
    "save_peft",
    "scale_b",
    "scale_of",
    "stack",
    "to_lora_delta",
    "train_step",
    "unmerge",
    "wrap",
    "wrap_batched",
]
