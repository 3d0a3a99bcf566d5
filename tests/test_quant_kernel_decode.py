"""The fused quantized matmul kernel at decode sizes (M = 1..8 rows of X) against float64 NumPy.

The decode tiles differ from the wide ones: AVX-512 looks 4-bit codes up in a per-block table,
q8_0 and int8 multiply their scale into a chunk's (row's) finished dot product, int4/nf4 read X
with each chunk's even values first, and products below a size run on one thread. Every format,
every code path this CPU runs, M = 1..8, R = 37 stored rows (not a multiple of any register tile),
C = 96 (3 chunks) or 50 (int8: a partial chunk), and one product large enough for the threaded
split; tolerance ``4·eps32·(|x| @ |W|)`` as in tests/test_quant_fused.py.
"""

import jax
import numpy as np
import pytest

from jaxla import quant
from jaxla.quant import _fused

pytestmark = pytest.mark.skipif(_fused.available() is not None or jax.default_backend() != "cpu",
                                reason=f"fused kernel unavailable: {_fused.available()}")

EPS = float(np.finfo(np.float32).eps)
ROWS = 37
FORMATS = [("q8_0", {}, 96), ("q4_0", {}, 96), ("q4_1", {}, 96), ("int8", {}, 50),
           ("int4", {"block_size": 64}, 128), ("nf4", {"block_size": 32}, 96)]


def _quantize(w, fmt, kw):
    if fmt.startswith("q"):  # GGUF formats quantize on the host
        return quant.quantize(w, format=fmt)
    return jax.jit(lambda w: quant.quantize(w, format=fmt, **kw))(w)


def _assert_close(y, x, q, what):
    w = np.asarray(jax.jit(quant.dequantize)(q), np.float64)          # (C, R)
    x = np.asarray(x, np.float64)
    ref, scale = x @ w, np.abs(x) @ np.abs(w)
    err = np.abs(np.asarray(y, np.float64) - ref)
    assert np.all(err <= 4 * EPS * scale + 1e-30), (what, float(np.max(err / (EPS * scale + 1e-30))))


def test_decode_rows_every_format_and_path(rng):
    cases = []
    for fmt, kw, d_in in FORMATS:
        w = rng.standard_normal((d_in, ROWS)).astype(np.float32)
        x = rng.standard_normal((8, d_in)).astype(np.float32)
        x[7, 3] = np.nan  # row 7 (only in the M = 8 product) must come out NaN, and no other
        cases.append((fmt, x, _quantize(w, fmt, kw)))
    # One product past the single-thread threshold (R·C·M >= 2**22): the threaded row split.
    big_w = rng.standard_normal((512, 1040)).astype(np.float32)
    big = (quant.quantize(big_w, format="q4_1"), rng.standard_normal((8, 512)).astype(np.float32))
    paths = _fused.supported_paths()

    def products(cases, big):
        small = [[[_fused.rows_product(x[:m], q, path=p) for m in range(1, 9)] for p in paths]
                 for _, x, q in cases]
        return small, [_fused.rows_product(big[1], big[0], path=p) for p in paths]

    small, large = jax.jit(products)([(None, x, q) for _, x, q in cases], big)
    for (fmt, x, q), per_path in zip(cases, small, strict=True):
        for path, ys in zip(paths, per_path, strict=True):
            for m, y in enumerate(ys, start=1):
                y = np.asarray(y)
                assert y.shape == (m, ROWS)
                ok = min(m, 7)
                _assert_close(y[:ok], x[:ok], q, (fmt, path, m))
                if m == 8:
                    assert np.all(np.isnan(y[7])), (fmt, path, "NaN laundered")
    for path, y in zip(paths, large, strict=True):
        _assert_close(y, big[1], big[0], ("q4_1 threaded", path))
