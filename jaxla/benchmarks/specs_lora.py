"""Shapes shared by the LoRA tests and the LoRA benchmark."""

# The seed's shape: a batch of 4096 rows through a 768 → 3072 projection with a rank-8 adapter.
SEED = {"batch": 4096, "d_in": 768, "d_out": 3072, "rank": 8}
QUICK = {"batch": 1024, "d_in": 768, "d_out": 3072, "rank": 8}

# A small transformer-like MLP stack (residual up/down projections) for the training-step rows.
MLP_STACK = {"layers": 4, "d_model": 256, "d_hidden": 1024, "batch": 512, "rank": 8, "alpha": 16.0}
MLP_STACK_QUICK = {"layers": 2, "d_model": 128, "d_hidden": 512, "batch": 256, "rank": 8,
                   "alpha": 16.0}

# Tiny shapes for tests: (batch, d_in, d_out, rank).
TEST_LINEAR = [(3, 5, 7, 2), (4, 8, 6, 3), (2, 6, 6, 6)]
TEST_MLP_STACK = {"layers": 2, "d_model": 8, "d_hidden": 16, "batch": 6, "rank": 2, "alpha": 4.0}
