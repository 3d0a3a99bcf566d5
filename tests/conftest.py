"""Test configuration: 8 simulated CPU devices, strict dtype promotion, rank promotion raising.

XLA_FLAGS must be set before jax is imported anywhere, so this happens at the top of conftest.
"""

import os

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def key(request):
    """A PRNG key that differs per test but is the same on every run."""
    seed = sum(ord(c) for c in request.node.nodeid) % (2**31)
    return jax.random.key(seed)


@pytest.fixture
def rng(request):
    """A NumPy Generator seeded per test, for float64 reference data."""
    seed = sum(ord(c) * (i + 1) for i, c in enumerate(request.node.nodeid)) % (2**31)
    return np.random.default_rng(seed)


@pytest.fixture
def x64():
    """Runs the test with 64-bit types enabled (for float64 references and check_grads)."""
    with jax.enable_x64(True):
        yield
