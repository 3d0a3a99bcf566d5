"""Optional plots: PNGs written atomically, clear errors for bad input or missing matplotlib."""

import sys

import numpy as np
import pytest

from jaxla import spectral

pytest.importorskip("matplotlib")

PNG = b"\x89PNG\r\n\x1a\n"


def test_plots_write_png_atomically(tmp_path):
    s = 0.8 ** np.arange(20)
    spectral.plot_singular_values({"q": s, "k": s / 2}, path=tmp_path / "s.png", normalize=True)
    z = np.random.default_rng(0).normal(size=(12, 3))
    spectral.plot_pca_scatter(z, ["a", "b", "c"] * 4, path=tmp_path / "p.png",
                              explained_variance_ratio=[0.5, 0.3, 0.2])
    spectral.plot_pca_scatter(z, [f"t{i}" for i in range(12)], annotate=True,
                              path=tmp_path / "p2.png")
    spectral.plot_sharpness([0, 10, 20], [1.0, 5.0, 21.0], learning_rate=0.1,
                            path=tmp_path / "h.png")
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["h.png", "p.png", "p2.png", "s.png"]  # no temporary files left behind
    for name in files:
        assert (tmp_path / name).read_bytes()[:8] == PNG
    fig = spectral.plot_singular_values(s, log=False)
    assert fig.axes[0].get_ylabel() == "σ_i"


def test_bad_plot_input(tmp_path):
    with pytest.raises(ValueError, match="C >= 2"):
        spectral.plot_pca_scatter(np.ones((4, 1)))
    with pytest.raises(ValueError, match="labels"):
        spectral.plot_pca_scatter(np.ones((4, 2)), ["a"])
    with pytest.raises(ValueError, match="equal length"):
        spectral.plot_sharpness([1, 2], [1.0])
    with pytest.raises(ValueError, match="learning_rate"):
        spectral.plot_sharpness([1], [1.0], learning_rate=0.0)
    with pytest.raises(ValueError, match="1-D"):
        spectral.plot_singular_values(np.ones((2, 2)))
    with pytest.raises(FileNotFoundError):
        spectral.plot_singular_values(np.ones(3), path=tmp_path / "missing" / "s.png")


def test_missing_matplotlib_gives_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"jaxla\[plot\]"):
        spectral.plot_singular_values(np.ones(3))


def test_training_curves(tmp_path):
    curves = {"pretrain": ([0, 1, 2], [3.0, 2.0, 1.0]), "adapt": ([0, 1], [1.0, 0.0])}
    fig = spectral.plot_training_curves(curves, path=tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == PNG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png"]
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["pretrain", "adapt"]
    with pytest.raises(ValueError, match="non-empty mapping"):
        spectral.plot_training_curves({})
    with pytest.raises(ValueError, match="pair"):
        spectral.plot_training_curves({"a": [1, 2, 3]})
    with pytest.raises(ValueError, match="equal length"):
        spectral.plot_training_curves({"a": ([1, 2], [1.0])})


def test_hessian_density_plot(tmp_path):
    grid = np.linspace(-1.0, 3.0, 50)
    density = np.exp(-grid**2)
    fig = spectral.plot_hessian_density((grid, density), path=tmp_path / "d.png")
    assert (tmp_path / "d.png").read_bytes()[:8] == PNG
    assert fig.axes[0].get_xlabel() == "eigenvalue λ"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.png"]
