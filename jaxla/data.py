"""Small real data sets for demos and tests, read from files fetched with ``jaxla download NAME``.

The files are untrusted input: sizes are bounded, the text must be UTF-8 and every line must have
the documented format; an error names the file and the line.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from jaxla.models import _download

__all__ = ["VADER_CORPORA", "vader_sentiment"]

VADER_CORPORA = _download.VADER_CORPORA
MAX_FILE_BYTES = 64 << 20  # the largest ground-truth file is 1.4 MB
VALENCE_RANGE = (-4.0, 4.0)


def vader_sentiment(source: str | os.PathLike = "vader-sentiment", *,
                    corpus: str = "movieReviewSnippets") -> tuple[list[str], np.ndarray]:
    """Texts and their mean human sentiment from VADER's ground truth (Hutto & Gilbert, ICWSM 2014).

    Each ``<corpus>_GroundTruth.txt`` line is ``id<TAB>valence<TAB>text``; the valence is the mean
    of about 20 human ratings on [-4, 4] (extremely negative .. extremely positive). Sizes:
    movieReviewSnippets 10,605, tweets 4,200, amazonReviewSnippets 3,708, nytEditorialSnippets 5,190.

    Args:
      source: the name ``"vader-sentiment"`` (from the cache: ``jaxla download vader-sentiment``) or
        a directory holding the ``*_GroundTruth.txt`` files.
      corpus: one of :data:`VADER_CORPORA`.

    Returns:
      ``(texts, valence)``: N strings and a float32 (N,) array, in file order.

    Raises:
      FileNotFoundError: the data set is not downloaded (the message names the command) or the
        corpus file is missing.
      ValueError: an unknown corpus, or a malformed file (naming the file and the line).
    """
    if corpus not in VADER_CORPORA:
        raise ValueError(f"corpus must be one of {VADER_CORPORA}, got {corpus!r}")
    directory = _download.resolve(source)
    if not directory.is_dir():
        raise FileNotFoundError(f"{str(source)!r} is not a directory nor a downloaded data set "
                                "name; run `jaxla download vader-sentiment`")
    path = Path(directory) / f"{corpus}_GroundTruth.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (is {directory} the vader-sentiment "
                                "directory?)")
    return _read_ground_truth(path)


def _read_ground_truth(path: Path) -> tuple[list[str], np.ndarray]:
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ValueError(f"{path}: {size} bytes, over the {MAX_FILE_BYTES}-byte limit for this file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # a final newline ends the last line
    texts, values, seen = [], [], {}
    lo, hi = VALENCE_RANGE
    for number, line in enumerate(lines, start=1):
        where = f"{path}, line {number}"
        if line.endswith("\r"):
            line = line[:-1]
        fields = line.split("\t")
        if len(fields) != 3:
            raise ValueError(f"{where}: expected 'id<TAB>valence<TAB>text', got {len(fields)} "
                             f"tab-separated field(s): {line[:80]!r}")
        ident, valence, sentence = fields
        if not ident or not sentence.strip():
            raise ValueError(f"{where}: the id and the text must be non-empty, got {line[:80]!r}")
        if ident in seen:
            raise ValueError(f"{where}: id {ident!r} repeats line {seen[ident]}")
        seen[ident] = number
        try:
            value = float(valence)
        except ValueError:
            raise ValueError(f"{where}: valence {valence[:40]!r} is not a number") from None
        if not (math.isfinite(value) and lo <= value <= hi):
            raise ValueError(f"{where}: valence {value} is outside [{lo:g}, {hi:g}]")
        texts.append(sentence)
        values.append(value)
    if not texts:
        raise ValueError(f"{path}: no lines")
    return texts, np.asarray(values, np.float32)
