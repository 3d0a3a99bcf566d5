"""Eager calls of public functions run as one compiled program per signature, not op by op.

Outside ``jit`` every ``jnp`` operation is dispatched, and the first time for each shape compiled, on
its own: an eager :func:`jaxla.multi_head_attention_decode` compiled about 70 one-operation programs
(~3 s on a 2-core CPU) before this module, :func:`jaxla.top_k_similar` ~50. :func:`compiled` wraps
a function so that an eager call goes through ``jax.jit`` instead, once per argument signature
(shapes, dtypes and option values), as ``jax.nn``'s functions do.

The wrapped function is the same function: its trace-time checks raise the same errors while it is
traced, and Python values (ints, floats, strings, dtypes, None) reach it unchanged as
static arguments, so ``jaxla.dot(3.0, ...)`` sees exactly what an eager call sees (NumPy scalars
too). Arguments whose leaves are all arrays become the compiled program's inputs. The wrapper
steps aside, calling the function directly, when

- any argument holds a tracer (the caller is already inside ``jit``, ``grad`` or ``vmap``: the
  function is traced into the caller's program as before, with no nested call in its jaxpr);
- an argument mixes arrays with other leaves, or a Python value cannot be hashed (a list of floats):
  the eager call converts it exactly as before;
- an option is a function (``kernel_init``, ``activation``): typical code makes a new one per call
  (``jax.nn.initializers.normal(0.02)``), which as a static argument would compile every time;
- the arguments do not bind to the signature (Python's own TypeError is raised by the direct call).

Only functions whose checks read shapes and dtypes, never array values, are wrapped: a check that
looks at concrete values (token ids in range, NaN in an operator) would be skipped under ``jit``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np

F = TypeVar("F", bound=Callable[..., Any])

# NumPy scalars (np.float32(1e-6)) count as Python values: options given that way keep their checks.
_ARRAY = (jax.Array, np.ndarray)
try:  # public in jax 0.10 and 0.11
    from jax.core import Tracer as _Tracer
except ImportError:  # pragma: no cover - a later jax that moves it
    from jax._src.core import Tracer as _Tracer


def _classify(value: Any) -> str:
    """``"array"`` (all leaves concrete arrays), ``"static"`` (no array leaf, hashable), ``"tracer"``
    (a leaf is traced) or ``"mixed"`` (anything else: the call runs eagerly as written)."""
    if callable(value) and not isinstance(value, type):
        # A function option (kernel_init=jax.nn.initializers.normal(0.02), activation=...) is a new
        # object at every call in typical code: as a static argument it would compile again each
        # time, where op by op the per-shape programs are reused.
        return "mixed"
    leaves = jax.tree.leaves(value)
    if any(isinstance(leaf, _Tracer) for leaf in leaves):
        return "tracer"
    arrays = [isinstance(leaf, _ARRAY) for leaf in leaves]
    if arrays and all(arrays):
        return "array"
    if any(arrays):
        return "mixed"
    try:
        hash(value)
    except TypeError:
        return "mixed"
    return "static"


def compiled(fn: F) -> F:
    """``fn`` with eager calls compiled whole by ``jax.jit`` (see the module docstring)."""
    signature = inspect.signature(fn)
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY)
           for p in signature.parameters.values()):
        raise TypeError(f"compiled() needs named parameters only, {fn.__name__} has {signature}")

    @functools.cache
    def jitted(static_names: tuple[str, ...]):
        return jax.jit(fn, static_argnames=static_names)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return fn(*args, **kwargs)
        kinds = {name: _classify(value) for name, value in bound.arguments.items()}
        if any(kind in ("tracer", "mixed") for kind in kinds.values()):
            return fn(*args, **kwargs)
        static = tuple(sorted(name for name, kind in kinds.items() if kind == "static"))
        return jitted(static)(**bound.arguments)

    call.__wrapped__ = fn
    return call  # type: ignore[return-value]
