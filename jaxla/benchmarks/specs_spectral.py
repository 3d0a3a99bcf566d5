"""Shapes shared by the spectral tests and the spectral benchmark (plain data)."""

# Top-`rank` randomized SVD of an n × n matrix with power-law spectrum σ_i = (i + 1)^-decay.
import itertools

RSVD_BENCH = {"n": 4096, "rank": 32, "decay": 1.0}
RSVD_QUICK = {"n": 512, "rank": 16, "decay": 1.0}
RSVD_TARGET_SPEEDUP = 10.0
RSVD_TOP_SIGMA_RTOL = 1e-3

# Top-k Lanczos of an n × n symmetric matrix with a few separated top eigenvalues, vs dense eigh.
LANCZOS_BENCH = {"n": 2048, "k": 4, "num_iters": 40}
LANCZOS_QUICK = {"n": 256, "k": 4, "num_iters": 40}

# MLP d_in -> hidden... -> d_out with tanh and squared loss; BENCH has 1,068,810 parameters.
HESSIAN_BENCH = {"widths": (784, 1024, 256, 10), "batch": 256, "num_iters": 32}
HESSIAN_QUICK = {"widths": (64, 128, 10), "batch": 64, "num_iters": 20}
HESSIAN_TARGET_S = 10.0

# Hutchinson trace (64 probes) and SLQ density (8 probes x 64 steps) of the HESSIAN_* MLP losses; the
# dense rows use an MLP small enough for jax.hessian + eigvalsh (DENSE_* widths).
TRACE_PROBES = 64
SLQ_PROBES, SLQ_STEPS = 8, 64
SLQ_QUICK_STEPS = 24
CURVATURE_DENSE = {"widths": (24, 48, 8), "batch": 64}
CURVATURE_DENSE_QUICK = {"widths": (8, 16, 4), "batch": 32}

# PCA of N embeddings of width D keeping C components.
PCA_BENCH = {"n": 20000, "d": 768, "c": 16}
PCA_QUICK = {"n": 1000, "d": 64, "c": 8}


def mlp_param_count(widths):
    """Weights plus biases of the benchmark MLP."""
    return sum(a * b + b for a, b in itertools.pairwise(widths))
