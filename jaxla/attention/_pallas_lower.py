"""Lowering the Pallas kernels for GPU (Triton) and TPU (Mosaic) on a machine that has neither.

Used by ``tests/test_pallas_lowering.py`` (the offline proof that every kernel lowers for both
backends over a grid of features) and ``jaxla/benchmarks/triton_compile.py`` (which compiles the
Triton IR for sm_90a). Lowering runs inside ``jax.sharding.use_abstract_mesh`` with an abstract
device of the target kind, as jax's own deviceless-AOT Pallas tests do: jax 0.11's Triton
registration asks the current device for its compute capability, and an abstract "NVIDIA H100"
answers for a GPU that is not there.

Dimension legend: B batch, T query length, S key length, N query heads, K kv heads, H query/key
head dim, Hv value head dim.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import unittest.mock
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxla.attention import _pallas
from jaxla.attention import _pallas_common as c

# platform name for jaxla's routing -> (lowering platform, abstract device kind, its platform)
TARGETS = {
    "gpu": ("cuda", "NVIDIA H100 80GB HBM3", "cuda"),
    "tpu": ("tpu", "TPU v5 lite", "tpu"),
}

_CUSTOM_CALL = re.compile(r"custom_call @([^\s(]+)\(")


class Case(NamedTuple):
    """One lowering: shapes, dtype and the visibility features of ``pallas_attention``."""

    name: str
    dtype: str = "bfloat16"
    b: int = 2
    t: int = 300
    s: int = 260
    n: int = 8
    k: int = 2
    h: int = 128
    hv: int | None = None  # None: Hv = H
    causal: bool = False
    window: tuple[int, int] | None = None
    softcap: float | None = None
    segments: bool = False
    lengths: bool = False


def abstract_mesh(platform: str) -> jax.sharding.AbstractMesh:
    """A one-device abstract mesh whose device is an H100 ("gpu") or a TPU v5e ("tpu")."""
    _, kind, device_platform = TARGETS[platform]
    device = jax.sharding.AbstractDevice(kind, 1, device_platform)
    return jax.sharding.AbstractMesh((), (), abstract_device=device)


@contextlib.contextmanager
def as_platform(platform: str):
    """jaxla's Pallas backend sees ``platform`` (it asks ``jax.default_backend()`` otherwise)."""
    with unittest.mock.patch.object(_pallas, "_platform", lambda: platform):
        yield


def lower_text(platform: str, fn: Callable, *shapes) -> str:
    """StableHLO text of ``jit(fn)`` lowered for ``platform`` ("gpu" or "tpu") from any host."""
    lowering_platform = TARGETS[platform][0]
    with as_platform(platform), jax.sharding.use_abstract_mesh(abstract_mesh(platform)):
        traced = jax.jit(fn).trace(*shapes)
        return traced.lower(lowering_platforms=(lowering_platform,)).as_text()


def _copy_kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...]


@functools.cache
def pallas_target(platform: str) -> str:
    """The custom-call target a Pallas kernel lowers to on ``platform``, read from a lowered module.

    A one-line copy kernel is lowered with the compiler parameters jaxla's kernels use (Triton's on
    GPU, Mosaic's on TPU), so the answer follows the installed jax instead of a hard-coded name.
    """
    params = (c.triton_compiler_params(4, 1) if platform == "gpu"
              else c.mosaic_compiler_params(("parallel",)))
    shape = jax.ShapeDtypeStruct((16, 128), jnp.float32)

    def copy(x):
        return pl.pallas_call(_copy_kernel, out_shape=shape, grid=(1,),
                              compiler_params=params)(x)

    targets = custom_call_targets(lower_text(platform, copy, shape))
    if len(targets) != 1:
        raise RuntimeError(f"a one-kernel module lowered to custom calls {targets} on {platform}")
    return targets[0]


def custom_call_targets(text: str) -> list[str]:
    """Every custom-call target in a lowered module, in order."""
    return _CUSTOM_CALL.findall(text)


def case_shapes(case: Case) -> tuple[jax.ShapeDtypeStruct, ...]:
    """Abstract (q BTNH, k BSKH, v BSKHv) for ``case``."""
    dtype = jnp.dtype(case.dtype)
    hv = case.h if case.hv is None else case.hv
    return (jax.ShapeDtypeStruct((case.b, case.t, case.n, case.h), dtype),
            jax.ShapeDtypeStruct((case.b, case.s, case.k, case.h), dtype),
            jax.ShapeDtypeStruct((case.b, case.s, case.k, hv), dtype))


def case_loss(case: Case, *, block_sizes: _pallas.BlockSizes | None = None) -> Callable:
    """A scalar function of (q, k, v) through ``pallas_attention`` with the case's features.

    Its gradient runs all three kernels: the forward, dQ and dK/dV (the logsumexp enters the loss,
    so its cotangent path is lowered too).
    """
    kw: dict = {"is_causal": case.causal, "local_window_size": case.window,
                "logits_soft_cap": case.softcap}

    def loss(q, k, v):
        extra = dict(kw)
        if case.segments:
            extra["segment_ids"] = (
                jnp.broadcast_to(jnp.arange(case.t, dtype=jnp.int32) // 97, (case.b, case.t)),
                jnp.broadcast_to(jnp.arange(case.s, dtype=jnp.int32) // 97, (case.b, case.s)))
        if case.lengths:
            extra["query_seq_lengths"] = jnp.full((case.b,), max(1, case.t - 3), jnp.int32)
            extra["key_value_seq_lengths"] = jnp.full((case.b,), max(1, case.s // 2), jnp.int32)
        out, lse = _pallas.pallas_attention(q, k, v, return_residual=True, interpret=False,
                                            block_sizes=block_sizes, **extra)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)

    return loss


def lower_case(platform: str, case: Case, *, block_sizes: _pallas.BlockSizes | None = None,
               grad: bool = True) -> str:
    """Lowered text of the case's forward (``grad=False``) or forward + backward."""
    loss = case_loss(case, block_sizes=block_sizes)
    fn = jax.grad(loss, argnums=(0, 1, 2)) if grad else loss
    return lower_text(platform, fn, *case_shapes(case))


def count_kernels(platform: str, text: str) -> int:
    """How many Pallas kernels a lowered module launches (custom calls to the Pallas target)."""
    target = pallas_target(platform)
    return sum(1 for t in custom_call_targets(text) if t == target)


class KernelLaunch(NamedTuple):
    """What one ``pallas_call`` asks of the device: grid, per-step block bytes, scratch bytes."""

    grid: tuple[int, ...]
    block_bytes: tuple[int, ...]
    scratch_bytes: int
    compiler_params: object


def _size(dim) -> int:
    if dim is None:
        return 1
    if isinstance(dim, int):
        return dim
    return int(getattr(dim, "block_size", 1))  # Blocked(n) -> n; Squeezed() -> 1


def _pallas_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            yield eqn
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                yield from _pallas_eqns(inner)


def kernel_launches(platform: str, case: Case) -> list[KernelLaunch]:
    """Every Pallas kernel of the case's forward + backward, as traced for ``platform``."""
    loss = case_loss(case)
    with as_platform(platform):
        jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(*case_shapes(case))
    launches = []
    for eqn in _pallas_eqns(jaxpr.jaxpr):
        gm = eqn.params["grid_mapping"]
        blocks = tuple(
            math.prod(_size(d) for d in bm.block_shape) * jnp.dtype(bm.array_aval.dtype).itemsize
            for bm in gm.block_mappings)
        scratch = sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize
                      for a in getattr(gm, "scratch_avals", ()))
        launches.append(KernelLaunch(tuple(gm.grid), blocks, scratch,
                                     eqn.params.get("compiler_params")))
    return launches
