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


def test_small_products_split_over_the_spinning_team_are_bitwise_the_serial_ones(tmp_path):
    """Small products run on the calling thread and the spinning helper team
    (jaxla/_cpu_parallel.h); each stored row is one thread's work either way, so the result is the
    same bits with no helpers (JAXLA_CPU_TEAM_THREADS=0), the default team, and more helpers than
    cores (3), in fresh processes."""
    import os
    import subprocess
    import sys

    code = f"""
import numpy as np, jax
from jaxla import quant
from jaxla.quant import _fused
rng = np.random.default_rng(5)
out = []
for fmt, kw in (("q4_1", {{}}), ("nf4", {{"block_size": 64}})):
    w = rng.standard_normal((576, 1000)).astype(np.float32)
    q = quant.quantize(w, format=fmt, **kw)
    x = rng.standard_normal((3, 576)).astype(np.float32)
    f = jax.jit(lambda x, q: [_fused.rows_product(x[:m], q) for m in (1, 3)])
    for _ in range(3):  # repeated calls: the helpers spin, sleep and wake between them
        ys = f(x, q)
    out += [np.asarray(y) for y in ys]
np.savez({str(tmp_path)!r} + "/" + __import__("os").environ.get("JAXLA_CPU_TEAM_THREADS", "default"), *out)
"""
    for threads in ("0", "3", None):
        env = dict(os.environ)
        env.pop("JAXLA_CPU_TEAM_THREADS", None)
        if threads is not None:
            env["JAXLA_CPU_TEAM_THREADS"] = threads
        subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    env = dict(os.environ, JAXLA_CPU_TEAM_THREADS="two")
    proc = subprocess.run([sys.executable, "-c", "import jaxla.quant._fused"], env=env,
                          check=True, capture_output=True, text=True)
    assert "JAXLA_CPU_TEAM_THREADS='two' is not a non-negative integer" in proc.stderr
    runs = [np.load(tmp_path / f"{name}.npz") for name in ("0", "3", "default")]
    for key in runs[0].files:
        assert runs[0][key].shape in ((1, 1000), (3, 1000))
        for other in runs[1:]:
            np.testing.assert_array_equal(other[key], runs[0][key])
