"""The randomized SVD core (Halko, Martinsson & Tropp 2011), shared by ``jaxla.spectral`` and
``jaxla.lora``.

Dimension legend: ``...`` optional leading batch dimensions, m rows, n columns, r target rank,
l sketch size (``r <= l <= min(m, n)``).

It lives outside both packages so that neither imports the other at module load
(``jaxla.spectral.randomized_svd`` is the public, checked entry point; PiSSA initialisation in
``jaxla.lora`` calls the core inside its own jitted program). The functions here take validated
arrays and static sizes and do no argument checking.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["HIGHEST", "flip_signs", "randomized_svd", "range_finder"]

HIGHEST = jax.lax.Precision.HIGHEST


def _mT(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def _orth(x: jax.Array) -> jax.Array:
    return jnp.linalg.qr(x)[0]


@functools.partial(jax.jit, static_argnames=("size", "n_iter"))
def range_finder(w: jax.Array, size: int, *, key: Any, n_iter: int) -> jax.Array:
    """Orthonormal ``(..., m, size)`` basis ``Q`` with ``Q Qᵀ w ≈ w`` (HMT Algorithm 4.4).

    ``n_iter`` power iterations, each half-step re-orthonormalised by QR so that small singular
    directions survive in float32.
    """
    omega = jax.random.normal(key, (*w.shape[:-2], w.shape[-1], size), w.dtype)
    q = _orth(jnp.matmul(w, omega, precision=HIGHEST))

    def step(_, q):
        z = _orth(jnp.matmul(_mT(w), q, precision=HIGHEST))
        return _orth(jnp.matmul(w, z, precision=HIGHEST))

    return jax.lax.fori_loop(0, n_iter, step, q)


def flip_signs(u: jax.Array, vt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Makes the largest-magnitude entry of each column of ``u`` positive (deterministic signs)."""
    idx = jnp.argmax(jnp.abs(u), axis=-2, keepdims=True)
    signs = jnp.sign(jnp.take_along_axis(u, idx, axis=-2))
    signs = jnp.where(signs == 0, 1.0, signs).astype(u.dtype)
    return u * signs, vt * _mT(signs)


@functools.partial(jax.jit, static_argnames=("rank", "size", "n_iter"))
def randomized_svd(w: jax.Array, key: Any, *, rank: int, size: int, n_iter: int
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-``rank`` ``(u (..., m, r), s (..., r), vt (..., r, n))`` of ``w`` from an ``l = size``
    sketch, signs fixed by :func:`flip_signs`; computed in ``w``'s dtype."""
    q = range_finder(w, size, key=key, n_iter=n_iter)
    b = jnp.matmul(_mT(q), w, precision=HIGHEST)
    ub, s, vt = jnp.linalg.svd(b, full_matrices=False)
    u = jnp.matmul(q, ub[..., :rank], precision=HIGHEST)
    u, vt = flip_signs(u, vt[..., :rank, :])
    return u, s[..., :rank], vt
