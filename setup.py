"""Builds jaxla's compiled pieces: the CPU attention kernels (jaxla/attention/_cpu_ext.cc) and the
fused dequantize-and-multiply kernel of quantized bases (jaxla/quant/_cpu_qmm.cc).

Everything else is declared in pyproject.toml. The extensions are optional: without a C++ compiler,
or on a platform they do not build for, the install still succeeds, attention uses the plain-JAX
"chunked" implementation and quantized kernels are decoded in jnp. They compile against the XLA FFI
headers that ship inside jaxlib, and share their CPU-feature dispatch (jaxla/_cpu_dispatch.h).
"""

import os

from setuptools import Extension, setup


def _ffi_include():
    try:
        import jaxlib
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(jaxlib.__file__), "include")
    return path if os.path.isfile(os.path.join(path, "xla", "ffi", "api", "ffi.h")) else None


def _ext_modules():
    include = _ffi_include()
    if include is None or os.name == "nt":  # the kernels use GCC/Clang vector extensions
        return []
    flags = ["-O3", "-std=c++17", "-ffp-contract=fast", "-fvisibility=hidden", "-Wno-return-type",
             "-Wno-psabi"]
    # No -m flags: the module is compiled for the baseline target, and _cpu_ext.cc compiles its AVX2
    # and AVX-512 copies of the tile code through target pragmas, choosing one at run time from the
    # CPU's features (_cpu_ext.paths), so one build runs on any x86-64 CPU and uses what it has.
    return [
        Extension(
            "jaxla.attention._cpu_ext",
            sources=["jaxla/attention/_cpu_ext.cc"],
            depends=["jaxla/attention/_cpu_kernels.inc", "jaxla/attention/_cpu_amx.inc",
                     "jaxla/_cpu_dispatch.h", "jaxla/_cpu_parallel.h"],
            include_dirs=[include],
            language="c++",
            extra_compile_args=flags,
            optional=True,
        ),
        Extension(
            "jaxla.quant._cpu_qmm",
            sources=["jaxla/quant/_cpu_qmm.cc"],
            depends=["jaxla/quant/_cpu_qmm_kernels.inc", "jaxla/_cpu_dispatch.h", "jaxla/_cpu_parallel.h"],
            include_dirs=[include],
            language="c++",
            extra_compile_args=flags,
            optional=True,
        ),
    ]


setup(ext_modules=_ext_modules())
