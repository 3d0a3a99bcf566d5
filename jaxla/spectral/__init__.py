"""jaxla.spectral: eigenvalues and SVDs for training stability, PCA of embeddings and LoRA rank.

Matrix-free iterative eigensolvers (power iteration, Lanczos) over matrices or matvec functions on
pytrees; Hessian and Jacobian spectra through autodiff products; randomized and exact low-rank SVD;
Hessian trace (Hutchinson) and eigenvalue density (stochastic Lanczos quadrature);
spectral matrix metrics, a per-layer weight report and heavy-tail (power-law, Marchenko–Pastur)
metrics; scikit-learn compatible PCA; LoRA rank
analysis; and optional matplotlib plots. Everything is a pure function, and results are pytrees that
pass through ``jax.jit``.
"""

from jaxla.spectral._curvature import (
    CurvatureSummary,
    TraceResult,
    curvature_summary,
    hessian_trace,
)
from jaxla.spectral._density import HessianDensity, hessian_density
from jaxla.spectral._heavy_tail import (
    HeavyTailReport,
    PowerLawFit,
    esd,
    heavy_tail_report,
    marchenko_pastur_edge,
    power_law_fit,
)
from jaxla.spectral._hessian import (
    JacobianSVDResult,
    SharpnessResult,
    hessian_top_eigenvalues,
    hvp,
    jacobian_singular_values,
    sharpness,
    sharpness_callback,
)
from jaxla.spectral._iterative import EigResult, lanczos, power_iteration
from jaxla.spectral._lora_analysis import AdapterReport, adapter_report, suggest_rank
from jaxla.spectral._metrics import (
    WeightReport,
    condition_number,
    effective_rank,
    numerical_rank,
    singular_values,
    spectral_norm,
    stable_rank,
    weight_report,
)
from jaxla.spectral._pca import PCAResult, pca, pca_inverse_transform, pca_transform
from jaxla.spectral._plot import (
    plot_hessian_density,
    plot_pca_scatter,
    plot_sharpness,
    plot_singular_values,
    plot_training_curves,
)
from jaxla.spectral._svd import LowRankResult, SVDResult, low_rank_approx, randomized_svd

__all__ = [
    "AdapterReport",
    "CurvatureSummary",
    "EigResult",
    "HeavyTailReport",
    "HessianDensity",
    "JacobianSVDResult",
    "LowRankResult",
    "PCAResult",
    "PowerLawFit",
    "SVDResult",
    "SharpnessResult",
    "TraceResult",
    "WeightReport",
    "adapter_report",
    "condition_number",
    "curvature_summary",
    "effective_rank",
    "esd",
    "heavy_tail_report",
    "hessian_density",
    "hessian_top_eigenvalues",
    "hessian_trace",
    "hvp",
    "jacobian_singular_values",
    "lanczos",
    "low_rank_approx",
    "marchenko_pastur_edge",
    "numerical_rank",
    "pca",
    "pca_inverse_transform",
    "pca_transform",
    "plot_hessian_density",
    "plot_pca_scatter",
    "plot_sharpness",
    "plot_singular_values",
    "plot_training_curves",
    "power_iteration",
    "power_law_fit",
    "randomized_svd",
    "sharpness",
    "sharpness_callback",
    "singular_values",
    "spectral_norm",
    "stable_rank",
    "suggest_rank",
    "weight_report",
]
