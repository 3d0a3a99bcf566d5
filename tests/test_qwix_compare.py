"""The qwix comparison suite without flax/qwix: one install line, exit 0, and its one check (jaxla's
NF4 equals a NumPy transcription of qwix's algorithm) is real. The comparison itself needs flax and
qwix (``python -m jaxla.benchmarks.qwix_compare``) and is recorded in benchmarks/RESULTS.md."""

import json
import sys

import numpy as np
import pytest

from jaxla import quant
from jaxla.benchmarks import qwix_compare


@pytest.fixture
def without_qwix(monkeypatch):
    for name in ("qwix", "flax", "flax.nnx"):  # a None entry makes ``import name`` fail
        monkeypatch.setitem(sys.modules, name, None)


def test_missing_flax_or_qwix_prints_one_install_line_and_exits_0(without_qwix, tmp_path, capsys):
    out = tmp_path / "qwix.json"
    code = qwix_compare.main(["--quick", "--json", str(out)])
    printed, err = capsys.readouterr()
    assert code == 0, err
    lines = [line for line in printed.splitlines() if "pip install flax qwix" in line]
    assert lines and lines[0].startswith("qwix_compare: needs flax and qwix")
    assert "Traceback" not in printed + err
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["name"].startswith("qwix side skipped") and "ok" not in rows[0]
    assert rows[1]["ok"] is True and rows[1]["max_abs_diff"] == 0.0


def test_numpy_nf4_transcription_tells_block_sizes_apart():
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((128, 8)) * 0.05).astype(np.float32)
    ours = np.asarray(quant.dequantize(quant.quantize(w, format="nf4", block_size=64)))
    np.testing.assert_array_equal(ours, qwix_compare.numpy_nf4(w, block=64))
    assert np.max(np.abs(ours - qwix_compare.numpy_nf4(w, block=32))) > 1e-3
    with pytest.raises(ValueError, match="part must be one of"):
        qwix_compare.run(quick=True, part="timing")
