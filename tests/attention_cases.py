"""Shared attention test helpers: the float64 NumPy reference and the one seeded case generator.

Imported by the attention test modules (which never import each other). ``np_attention`` is the
contract written out in NumPy: visibility, softmax over visible keys, ``EMPTY_ROW_LSE`` for a row that
sees no key, and the analytic backward for given output and logsumexp cotangents. ``draw_case`` samples
a combination of features (causal, window, lengths, segments, soft cap, scale, bias, mask, GQA,
Hv != H, odd lengths) from a seed, optionally forcing one group of them on.

Dimension legend: B batch, T query length, S key length, N query heads, K kv heads, G = N // K,
H query/key head dim, Hv value head dim.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jaxla.attention import EMPTY_ROW_LSE


class Reference(NamedTuple):
    """Float64 results: out (B, T, N, Hv), lse (B, T, N), and gradients when cotangents were given."""

    out: np.ndarray
    lse: np.ndarray
    dq: np.ndarray | None = None
    dk: np.ndarray | None = None
    dv: np.ndarray | None = None
    dbias: np.ndarray | None = None  # summed to the bias's own (broadcast) shape


def visibility(b, t, s, *, causal=False, window=None, q_len=None, kv_len=None, q_seg=None,
               kv_seg=None):
    """(B, T, S) boolean: key j visible to query i, from the documented rule.

    ``window`` is ``(left, right)`` (an int w means ``(w, w)``); a side may be None (unbounded).
    """
    if isinstance(window, int):
        window = (window, window)
    i, j = np.arange(t)[:, None], np.arange(s)[None, :]
    vis = np.ones((t, s), bool)
    if causal:
        vis &= j <= i
    if window is not None:
        if window[0] is not None:
            vis &= j >= i - window[0]
        if window[1] is not None:
            vis &= j <= i + window[1]
    vis = np.broadcast_to(vis, (b, t, s)).copy()
    if q_len is not None:
        vis &= np.arange(t)[None, :, None] < np.asarray(q_len)[:, None, None]
    if kv_len is not None:
        vis &= np.arange(s)[None, None, :] < np.asarray(kv_len)[:, None, None]
    if q_seg is not None:
        vis &= np.asarray(q_seg)[:, :, None] == np.asarray(kv_seg)[:, None, :]
    return vis


def np_attention(q, k, v, bias=None, mask=None, *, scale=None, causal=False, window=None,
                 q_len=None, kv_len=None, q_seg=None, kv_seg=None, softcap=None, d_out=None,
                 d_lse=None) -> Reference:
    """Attention from the definition in float64; with ``d_out`` (and ``d_lse``) also its gradients."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    scale = 1 / np.sqrt(h) if scale is None else scale
    vis = visibility(b, t, s, causal=causal, window=window, q_len=q_len, kv_len=kv_len,
                     q_seg=q_seg, kv_seg=kv_seg)[:, None]  # (B, 1, T, S)
    if mask is not None:
        vis = vis & np.broadcast_to(np.asarray(mask), (b, n, t, s))
    vis = np.broadcast_to(vis, (b, n, t, s))
    kk, vv = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    logits = np.einsum("btnh,bsnh->bnts", q, kk) * scale
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)
    tanh = None
    if softcap is not None:
        tanh = np.tanh(logits / softcap)
        logits = softcap * tanh
    masked = np.where(vis, logits, -np.inf)
    m = masked.max(-1, keepdims=True)
    m = np.where(m == -np.inf, 0.0, m)
    e = np.where(vis, np.exp(masked - m), 0.0)
    z = e.sum(-1, keepdims=True)
    empty = z == 0
    p = e / np.where(empty, 1.0, z)
    out = np.einsum("bnts,bsnh->btnh", p, vv)
    lse = np.where(empty, EMPTY_ROW_LSE, m + np.log(np.where(empty, 1.0, z)))[..., 0]
    lse = np.transpose(lse, (0, 2, 1))
    if d_out is None:
        return Reference(out, lse)
    d_lse = np.zeros((b, t, n)) if d_lse is None else np.asarray(d_lse, np.float64)
    do = np.transpose(np.asarray(d_out, np.float64), (0, 2, 1, 3))  # BNTHv
    dv = np.einsum("bnts,bnth->bsnh", p, do)
    dp = np.einsum("bnth,bsnh->bnts", do, vv)
    delta = (do * np.transpose(out, (0, 2, 1, 3))).sum(-1, keepdims=True)
    dlogits = p * (dp - delta + np.transpose(d_lse, (0, 2, 1))[..., None])
    if tanh is not None:
        dlogits = dlogits * (1.0 - tanh**2)
    dq = np.einsum("bnts,bsnh->btnh", dlogits, kk) * scale
    dk = np.einsum("bnts,btnh->bsnh", dlogits, q) * scale

    def group_sum(x):
        return x.reshape(b, s, kh, g, x.shape[-1]).sum(3)

    dbias = None
    if bias is not None:
        shape = np.shape(bias)
        shape = (1,) * (4 - len(shape)) + shape
        axes = tuple(a for a in range(4) if shape[a] == 1)
        dbias = dlogits.sum(axis=axes, keepdims=True).reshape(np.shape(bias))
    return Reference(out, lse, dq, group_sum(dk), group_sum(dv), dbias)


class Case(NamedTuple):
    """One sampled attention problem: float64 arrays and the options, two ways."""

    arrays: tuple  # (q, k, v, bias or None, mask or None) as NumPy arrays
    kwargs: dict  # keyword arguments of jaxla.dot_product_attention
    ref: dict  # keyword arguments of np_attention

    @property
    def shape(self) -> str:
        q, k, v = self.arrays[:3]
        return f"q{q.shape} k{k.shape} v{v.shape}"


FOCUSES = ("bias_mask", "head_dims", "packing", "band")


def draw_case(rng: np.random.Generator, *, focus: str | None = None, lengths=(1, 7, 20, 33),
              head_dims=((64, 64), (64, 128), (8, 8), (8, 4), (12, 16)),
              feature_p: float = 0.3) -> Case:
    """A random combination of attention features (each on with probability ``feature_p``).

    Args:
      rng: the seeded generator; the same seed gives the same case.
      focus: one of ``FOCUSES`` to force a group of features on, so that a few seeds cover them
        all: "bias_mask" (a bias and a mask array, which not every backend has), "head_dims"
        (Hv != H or head dims that are not multiples of 8), "packing" (segments and lengths),
        "band" (causal or a window, soft cap, scale). None: nothing forced.
      lengths: query lengths to pick from; S is T half the time, else another of these.
      head_dims: (H, Hv) pairs to pick from (the first is picked half the time unless the focus is
        "head_dims", which picks among the others).
      feature_p: probability of each feature that the focus does not force.
    """
    if focus is not None and focus not in FOCUSES:
        raise ValueError(f"focus must be one of {FOCUSES} or None, got {focus!r}")

    def on(group):
        return focus == group or rng.random() < feature_p

    b = int(rng.integers(1, 3))
    t = int(rng.choice(lengths))
    s = t if rng.random() < 0.5 else int(rng.choice(lengths))
    kh = int(rng.choice([1, 2]))
    n = kh * int(rng.choice([1, 2]))
    if focus == "head_dims":
        h, hv = head_dims[int(rng.integers(1, len(head_dims)))]
    else:
        h, hv = head_dims[0] if rng.random() < 0.5 else head_dims[int(rng.integers(len(head_dims)))]
    q = rng.normal(size=(b, t, n, h))
    k = rng.normal(size=(b, s, kh, h))
    v = rng.normal(size=(b, s, kh, hv))
    kw, ref = {}, {}
    # With the band focus: causal only, a window only, or both.
    band = int(rng.integers(3)) if focus == "band" else None
    if band in (0, 2) or (band is None and on("causal")):
        kw["is_causal"] = ref["causal"] = True
    if band in (1, 2) or (band is None and on("window")):
        w = (int(rng.integers(0, 6)), int(rng.integers(0, 6)))
        kw["local_window_size"] = ref["window"] = w
    if on("packing"):
        ql = rng.integers(0, t + 1, size=b).astype(np.int32)
        kw["query_seq_lengths"], ref["q_len"] = ql, ql
    if on("packing"):
        kl = rng.integers(1, s + 1, size=b).astype(np.int32)
        kw["key_value_seq_lengths"], ref["kv_len"] = kl, kl
    if on("packing"):
        qs = np.sort(rng.integers(0, 3, size=(b, t)), axis=1).astype(np.int32)
        ks = np.sort(rng.integers(0, 3, size=(b, s)), axis=1).astype(np.int32)
        single = s == t and rng.random() < 0.5
        kw["segment_ids"] = qs if single else (qs, ks)
        ref["q_seg"], ref["kv_seg"] = qs, (qs if single else ks)
    if on("band"):
        kw["logits_soft_cap"] = ref["softcap"] = 2.0
    if on("band"):
        kw["scale"] = ref["scale"] = 0.3
    bias = mask = None
    # A bias or mask array sends the cpu and pallas backends away, so only the focus forces them.
    if focus == "bias_mask" or rng.random() < feature_p / 3:
        bias = rng.normal(size=(b if rng.random() < 0.5 else 1, n if rng.random() < 0.5 else 1, t, s))
    if focus == "bias_mask" or rng.random() < feature_p / 3:
        shape = (1, n if rng.random() < 0.5 else 1, t if rng.random() < 0.7 else 1, s)
        mask = rng.random(size=shape) < 0.7
    return Case((q, k, v, bias, mask), kw, ref)
