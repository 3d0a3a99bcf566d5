"""Test configuration: 8 simulated CPU devices, strict dtype promotion, rank promotion raising.

XLA_FLAGS and the compilation cache variables must be set before jax is imported anywhere, so this
happens at the top of conftest.
"""

import atexit
import os
import shutil
import tempfile

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()


def _compilation_cache() -> None:
    """A persistent XLA compilation cache for this test session (one directory per xdist worker,
    deleted at exit). Many tests run a demo in-process and then again in a subprocess (resume after
    SIGKILL, the CLI): the subprocess inherits the variable and loads the executables the worker
    compiled instead of compiling them again — the same programs, so results are unchanged, and
    the suite spends much less of its time in XLA. A user's own JAX_COMPILATION_CACHE_DIR is kept."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    owner = os.environ.get("JAXLA_TESTS_CACHE_OWNER")
    if "JAX_COMPILATION_CACHE_DIR" in os.environ and owner in (None, worker):
        return  # the user's own cache, or this worker's (inherited by a test's subprocess)
    path = tempfile.mkdtemp(prefix=f"jaxla-tests-{worker}-")
    atexit.register(shutil.rmtree, path, True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    os.environ["JAXLA_TESTS_CACHE_OWNER"] = worker
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


_compilation_cache()

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
