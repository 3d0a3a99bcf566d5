"""Text data for the fine-tune demos: a fixed split, length buckets, a tokenization cache, batches.

Reusable by any demo that trains on tokenized sentences (MiniLM sentiment, a decoder fine-tune):

- :func:`split` — a held-out split that depends only on the seed and the number of examples;
- :func:`tokenize_cached` — tokenize every text once and keep the ids in the run directory
  (``tokens.npz``), keyed by the sha256 of the data file and of the tokenizer, so a resumed run
  reads the same ids instead of tokenizing again;
- :func:`bucketize` — pad each sequence to the smallest of a few bucket lengths (``(N_b, T_b)`` id
  and mask arrays per bucket), so a model compiles one program per bucket, not per length; on the
  right (encoders) or on the left (decoders scoring the last position);
- :func:`fit_bucket_lengths` — the few bucket lengths that waste the least padding on given data;
- :func:`batch_schedule` — every training step's bucket and example indices, drawn from
  ``(seed, epoch)``: step ``s`` always sees the same examples, so a run resumed from step ``s``
  replays an uninterrupted one exactly.

Dimension legend: N examples, N_b examples in bucket b, T_b its length, B batch, S steps.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "Buckets",
    "Schedule",
    "batch_schedule",
    "bucketize",
    "fit_bucket_lengths",
    "sha256_file",
    "split",
    "tokenize_cached",
    "vader_file",
]

_SPLIT_TAG = 0x5E17
_SHUFFLE_TAG = 0xBA7C
CACHE_NAME = "tokens.npz"
MAX_TOKENS = 1 << 28  # the cache is untrusted on reading: bound what it may make us allocate


def vader_file(section: str, data: str, corpus: str) -> Path:
    """The VADER ground-truth file ``<corpus>_GroundTruth.txt`` of ``data`` (a known download name
    or a directory); a missing one is a ConfigError naming the config key ``<section>.data``."""
    from jaxla.finetune._errors import ConfigError
    from jaxla.models import _download

    try:
        path = _download.resolve(data) / f"{corpus}_GroundTruth.txt"
    except FileNotFoundError as e:
        raise ConfigError(f"config key {section}.data = {data!r}: {e}") from None
    if not path.is_file():
        raise ConfigError(f"config key {section}.data = {data!r}: no {path.name} at "
                          f"{path.parent} (for the default run `jaxla download vader-sentiment`).")
    return path


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def split(n: int, *, seed: int, held_out: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train, held_out)`` index arrays: a permutation of ``range(n)`` from ``seed`` alone.

    The held-out indices are the first ``held_out`` of the permutation, both sorted.

    Raises:
      ValueError: ``held_out`` is not in ``[1, n - 1]``.
    """
    if not (isinstance(held_out, int) and 1 <= held_out < n):
        raise ValueError(f"held_out must be an integer in [1, {n - 1}] for {n} examples, "
                         f"got {held_out!r}")
    perm = np.random.default_rng([seed, _SPLIT_TAG]).permutation(n)
    return np.sort(perm[held_out:]), np.sort(perm[:held_out])


def tokenize_cached(tokenizer: Any, texts: Sequence[str], *, max_length: int, cache_dir: Path,
                    key: str, vocab_size: int | None = None) -> list[np.ndarray]:
    """The token ids of every text (truncated to ``max_length`` with the special tokens kept).

    The first call writes ``cache_dir/tokens.npz`` (atomically) with ``key`` (e.g. the sha256 of
    the data and the tokenizer); a later call with the same ``key``, text count and
    ``max_length`` reads it back instead of tokenizing. A cache that does not match or is
    malformed is ignored and rewritten.

    Args:
      tokenizer: a ``tokenizers.Tokenizer`` (copied: its padding and truncation are not changed).
      texts: N strings.
      max_length: the longest sequence kept (tokens beyond it are cut, [SEP] kept).
      cache_dir: the run directory.
      key: what the ids depend on besides the texts' count and ``max_length``.
      vocab_size: when given, a cache holding an id outside ``[0, vocab_size)`` is ignored, and
        the tokenizer producing one is an error.

    Returns:
      N int32 arrays of ids, each of length in ``[1, max_length]``.
    """
    if not (isinstance(max_length, int) and max_length >= 2):
        raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
    path = Path(cache_dir) / CACHE_NAME
    stamp = f"{key}|{len(texts)}|{max_length}"
    cached = _read_cache(path, stamp, len(texts), max_length, vocab_size)
    if cached is not None:
        return cached
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.no_padding()
    tok.enable_truncation(max_length=max_length)
    seqs = [np.asarray(e.ids, np.int32) for e in tok.encode_batch(list(texts))]
    empty = [i for i, s in enumerate(seqs) if s.size == 0]
    if empty:
        raise ValueError(f"text {empty[0]} ({texts[empty[0]][:60]!r}) tokenizes to no ids")
    lengths = np.asarray([s.size for s in seqs], np.int64)
    flat = np.concatenate(seqs)
    if vocab_size is not None and (flat.min() < 0 or flat.max() >= vocab_size):
        raise ValueError(f"the tokenizer produced ids in [{flat.min()}, {flat.max()}], outside the "
                         f"model's vocabulary [0, {vocab_size})")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tokens-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, stamp=np.asarray(stamp), lengths=lengths, ids=flat)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return seqs


def _read_cache(path: Path, stamp: str, n: int, max_length: int,
                vocab_size: int | None) -> list[np.ndarray] | None:
    """The cached ids when ``path`` is a well-formed cache for ``stamp``, else None."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if set(z.files) != {"stamp", "lengths", "ids"} or str(z["stamp"]) != stamp:
                return None
            lengths, ids = z["lengths"], z["ids"]
    except (OSError, ValueError, KeyError):
        return None
    if (lengths.shape != (n,) or lengths.dtype != np.int64 or ids.ndim != 1
            or ids.dtype != np.int32 or ids.size > MAX_TOKENS or (lengths < 1).any()
            or (lengths > max_length).any() or int(lengths.sum()) != ids.size):
        return None
    if vocab_size is not None and ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        return None
    return np.split(ids, np.cumsum(lengths)[:-1])


class Buckets(NamedTuple):
    """Sequences padded to a few lengths.

    Attributes:
      lengths: the bucket lengths ``T_b``, increasing.
      ids: per bucket, int32 ``(N_b, T_b)`` ids, 0 after each sequence's end.
      mask: per bucket, bool ``(N_b, T_b)``, True at real tokens.
      index: per bucket, int ``(N_b,)``: which input sequence each row is.
    """

    lengths: tuple[int, ...]
    ids: tuple[np.ndarray, ...]
    mask: tuple[np.ndarray, ...]
    index: tuple[np.ndarray, ...]


def bucketize(seqs: Sequence[np.ndarray], lengths: Sequence[int], *, pad_id: int = 0,
              pad_side: str = "right") -> Buckets:
    """Puts each sequence in the shortest bucket that holds it, padded with ``pad_id``.

    ``pad_side="right"`` puts the padding after each sequence; ``"left"`` before it, so every row's
    last token sits in the last column (a decoder's next-token logits are then those of column -1).
    Empty buckets are kept (with zero rows) so a bucket's number means the same for any data.

    Raises:
      ValueError: the lengths are not increasing positive integers, a sequence is longer than
        the last one, or ``pad_side`` is neither "right" nor "left".
    """
    if pad_side not in ("right", "left"):
        raise ValueError(f"pad_side must be 'right' or 'left', got {pad_side!r}")
    lengths = tuple(lengths)
    if not lengths or any(not isinstance(t, int) or t < 1 for t in lengths) or list(
            lengths) != sorted(set(lengths)):
        raise ValueError(f"bucket lengths must be increasing positive integers, got {lengths}")
    sizes = np.asarray([len(s) for s in seqs], np.int64)
    if sizes.size and sizes.max() > lengths[-1]:
        raise ValueError(f"a sequence has {sizes.max()} tokens, more than the longest bucket "
                         f"{lengths[-1]}")
    which = np.searchsorted(np.asarray(lengths), sizes, side="left")
    ids, mask, index = [], [], []
    for b, t in enumerate(lengths):
        rows = np.flatnonzero(which == b)
        x = np.full((rows.size, t), pad_id, np.int32)
        m = np.zeros((rows.size, t), bool)
        for r, i in enumerate(rows):
            cols = slice(0, sizes[i]) if pad_side == "right" else slice(t - sizes[i], t)
            x[r, cols] = seqs[i]
            m[r, cols] = True
        ids.append(x)
        mask.append(m)
        index.append(rows)
    return Buckets(lengths, tuple(ids), tuple(mask), tuple(index))


def fit_bucket_lengths(sizes: Sequence[int], buckets: int, *, multiple: int = 8) -> tuple[int, ...]:
    """At most ``buckets`` lengths that hold every size with the fewest padding tokens in total.

    Candidate lengths are the sizes rounded up to a multiple of ``multiple`` (the largest bucket is
    exactly the largest size, so no bucket is longer than the data needs); the choice is exact
    (dynamic programming over the few candidates) and depends only on the sizes.

    Raises:
      ValueError: no sizes, a size < 1, or ``buckets`` / ``multiple`` < 1.
    """
    sizes = np.asarray(list(sizes), np.int64)
    if not sizes.size or sizes.min() < 1:
        raise ValueError(f"fit_bucket_lengths needs sizes >= 1, got {sizes[:8].tolist()}")
    if not (isinstance(buckets, int) and buckets >= 1 and isinstance(multiple, int)
            and multiple >= 1):
        raise ValueError(f"buckets and multiple must be integers >= 1, got {buckets!r}, {multiple!r}")
    top = int(sizes.max())
    cands = np.unique(np.minimum(-(-sizes // multiple) * multiple, top))
    # rows[j]: how many sizes fit in cands[j] but not in cands[j - 1].
    rows = np.bincount(np.searchsorted(cands, sizes, side="left"), minlength=cands.size)
    m = cands.size
    k = min(buckets, m)
    # best[c][j]: least padded total of the sizes up to cands[j] with c buckets, the last cands[j].
    inf = np.iinfo(np.int64).max // 4
    best = np.full((k + 1, m), inf, np.int64)
    prev = np.full((k + 1, m), -1, np.int64)
    cum = np.concatenate([[0], np.cumsum(rows)])
    for j in range(m):
        best[1, j] = int(cum[j + 1]) * int(cands[j])
    for c in range(2, k + 1):
        for j in range(m):
            for i in range(j):
                cost = best[c - 1, i] + int(cum[j + 1] - cum[i + 1]) * int(cands[j])
                if cost < best[c, j]:
                    best[c, j], prev[c, j] = cost, i
    c = int(np.argmin(best[1:, m - 1])) + 1  # fewer buckets when more would not help
    out, j = [], m - 1
    while j >= 0 and c >= 1:
        out.append(int(cands[j]))
        j, c = int(prev[c, j]), c - 1
    return tuple(reversed(out))


class Schedule(NamedTuple):
    """Every training step's batch.

    Attributes:
      bucket: int32 ``(S,)``, the bucket of each step.
      rows: int32 ``(S, B)``, rows of that bucket (0 where ``weight`` is 0).
      weight: float32 ``(S, B)``, 1 for a real example, 0 for the padding of a bucket's last batch.
      epochs: how many passes over the data the steps make (the last may be partial).
    """

    bucket: np.ndarray
    rows: np.ndarray
    weight: np.ndarray
    epochs: int


def batch_schedule(bucket_sizes: Sequence[int], *, steps: int, batch_size: int,
                   seed: int) -> Schedule:
    """The batches of ``steps`` steps: each epoch shuffles every bucket's rows and the batch order.

    Epoch ``e`` draws from ``numpy.random.default_rng([seed, tag, e])``: shuffles each bucket's rows,
    cuts them into batches of ``batch_size`` (the last one of a bucket padded with weight 0), and
    shuffles the order of all batches. The steps walk through the epochs in turn.

    Raises:
      ValueError: no rows at all, or non-positive ``steps`` / ``batch_size``.
    """
    sizes = [int(n) for n in bucket_sizes]
    if sum(sizes) == 0:
        raise ValueError("batch_schedule needs at least one example")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    bucket, rows, weight = [], [], []
    epoch = 0
    while len(bucket) < steps:
        rng = np.random.default_rng([seed, _SHUFFLE_TAG, epoch])
        batches = []
        for b, n in enumerate(sizes):
            perm = rng.permutation(n)
            for start in range(0, n, batch_size):
                chunk = perm[start:start + batch_size]
                w = np.zeros(batch_size, np.float32)
                w[:chunk.size] = 1.0
                r = np.zeros(batch_size, np.int32)
                r[:chunk.size] = chunk
                batches.append((b, r, w))
        for j in rng.permutation(len(batches)):
            b, r, w = batches[j]
            bucket.append(b)
            rows.append(r)
            weight.append(w)
        epoch += 1
    return Schedule(np.asarray(bucket[:steps], np.int32), np.stack(rows[:steps]),
                    np.stack(weight[:steps]), epoch)
