"""Shapes shared by the linear tests and the linear benchmark: (batch, d_in, d_out)."""

# The seed's Code Fragment A.1.3: X (4, 768) @ W (768, 3072) + b (3072,).
SEED_FRAGMENT = (4, 768, 3072)

# Transformer FFN projections at realistic token counts.
BENCH_SHAPES = [SEED_FRAGMENT, (4096, 768, 3072), (4096, 3072, 768)]
QUICK_SHAPES = [SEED_FRAGMENT, (512, 768, 3072)]
GPU_SHAPES = [(16384, 4096, 4096), (16384, 4096, 14336), (16384, 14336, 4096)]
