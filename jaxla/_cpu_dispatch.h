// Run-time CPU dispatch shared by jaxla's compiled CPU kernels (jaxla/attention/_cpu_ext.cc and
// jaxla/quant/_cpu_qmm.cc): which of the compiled code paths this CPU can run.
//
// Every extension compiles its kernel code once per path, each copy under its own target pragma,
// while the rest of the module is compiled for the baseline target, so one build runs on any CPU.
// The paths are numbered alike in every extension (the `path` attribute their FFI calls take):
//   0 "portable" (the baseline: SSE2 on x86-64, whatever the compiler targets elsewhere),
//   1 "avx2"     (AVX2 + FMA; x86-64 only), 2 "avx512" (AVX-512 F/BW/DQ/VL; x86-64 only).
// The Python side (jaxla/_cpu_dispatch.py) picks the best path this CPU runs, or the one the
// JAXLA_CPU_KERNEL environment variable names, and every handler checks it again here, so no call
// runs instructions the CPU lacks.
#ifndef JAXLA_CPU_DISPATCH_H_
#define JAXLA_CPU_DISPATCH_H_

#include <cstdint>

#if defined(__x86_64__) || defined(__i386__)
#define JAXLA_X86 1
#include <cpuid.h>
#else
#define JAXLA_X86 0
#endif
#if defined(__x86_64__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace jaxla_dispatch {

constexpr int64_t kPortable = 0, kAvx2 = 1, kAvx512 = 2;

// Whether this CPU (and its OS, which must save the wider registers) can run path p.
inline bool path_supported(int64_t p) {
  if (p == kPortable) return true;
#if JAXLA_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (p == kAvx2) return avx2;
  if (p == kAvx512)
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#endif
  return false;
}

// Whether the AVX-512 path may also use AVX512-BF16 dot products here.
inline bool bf16_dot_supported() {
#if JAXLA_X86
  __builtin_cpu_init();
  return path_supported(kAvx512) && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

// Whether the bf16 kernels may also use AMX tile matmuls (AMX-TILE and AMX-BF16) here, besides the
// AVX-512 and AVX512-BF16 instructions of bf16_dot_supported() that their softmax uses. Three
// conditions, checked once per process: the CPU has the instructions (CPUID leaf 7, EDX bits 22
// and 24), the OS saves the tile state (XCR0 bits 17 and 18), and on Linux, which hands the 8 KiB of
// tile data only to processes that ask, the request (arch_prctl ARCH_REQ_XCOMP_PERM for the
// XTILEDATA feature) succeeds; it covers every thread of the process. Any failure: not supported.
inline bool amx_bf16_supported() {
#if defined(__x86_64__) && defined(__linux__)
  static const bool ok = [] {
    if (!bf16_dot_supported()) return false;
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1)) return false;  // OSXSAVE: xgetbv works
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 22) & 1) || !((d >> 24) & 1))
      return false;
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));  // XCR0 (no -mxsave needed)
    if (((lo >> 17) & 3) != 3) return false;
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  }();
  return ok;
#else
  return false;  // (elsewhere: no way here to ask the OS for the tile state)
#endif
}

}  // namespace jaxla_dispatch

#ifdef Py_PYTHON_H  // the including module's Python side: paths() of both extensions
namespace jaxla_dispatch {

// ({name: path index} of the n paths compiled in, [names this CPU can run, best first]), or
// nullptr with a Python error set; name_of(p) is path p's name.
template <typename NameOf>
PyObject* path_table(int64_t n, const NameOf& name_of) {
  PyObject* all = PyDict_New();
  PyObject* ok = PyList_New(0);
  if (all == nullptr || ok == nullptr) {
    Py_XDECREF(all);
    Py_XDECREF(ok);
    return nullptr;
  }
  for (int64_t p = n - 1; p >= 0; --p) {
    PyObject* idx = PyLong_FromLongLong(p);
    PyObject* name = PyUnicode_FromString(name_of(p));
    bool fail = idx == nullptr || name == nullptr || PyDict_SetItem(all, name, idx) != 0 ||
                (path_supported(p) && PyList_Append(ok, name) != 0);
    Py_XDECREF(idx);
    Py_XDECREF(name);
    if (fail) {
      Py_DECREF(all);
      Py_DECREF(ok);
      return nullptr;
    }
  }
  return Py_BuildValue("(NN)", all, ok);
}

}  // namespace jaxla_dispatch
#endif  // Py_PYTHON_H

#endif  // JAXLA_CPU_DISPATCH_H_
