// Fused dequantize-and-multiply CPU kernel for jaxla.quant (QArray kernels and embedding tables),
// called through XLA's FFI.
//
// XLA:CPU decodes a quantized kernel into a full f32 matrix inside every program that multiplies by
// it, so a decode step that reads each weight once reads 6.4x the bytes of the 4-bit blocks plus
// the f32 copy it writes. Here every thread takes whole groups of stored rows, decodes each chunk of
// 32 values into registers and multiplies it into every row of X at once (f32 fused multiply-adds,
// f32 accumulation): the blocks stream from memory once per call and no decoded matrix exists.
// Small products (a decode step's, kSerialWork) run on the calling thread and jaxla's spinning
// helper team (jaxla_parallel::team_for), not on XLA's pool.
//
// Layouts (row-major): x (..., C) f32, every leading dimension folded into M rows; the stored rows
// of the QArray: GGUF q8_0/q4_0/q4_1 blocks uint8 (R, C/32, bytes per block), int8 codes (R, C) with
// scales (R, 1) f32, int4/nf4 paired nibbles uint8 (R, C/2) with per-block scales (R, C/block) f32
// (nf4: the decoded absmax) and int4 minima (R, C/block) f32; y (..., R) f32 = x · Rowsᵀ. A kernel
// W (C, R) stored with its blocks along d_in gives y = x·W; an embedding table (R, C) gives the
// tied head's logits x·Eᵀ; it is the same product.
//
// Code paths: _cpu_qmm_kernels.inc is included once per path (portable, avx2, avx512; numbered as
// in jaxla/_cpu_dispatch.h, shared with the attention kernel) inside its own namespace under a
// target pragma, while this file is compiled for the baseline target.
#include <Python.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

#include "../_cpu_dispatch.h"
#include "../_cpu_parallel.h"  // num_workers, parallel_for

#if JAXLA_X86
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace jaxla_qmm {

// Format numbers of the `format` attribute (jaxla/quant/_cpu_qmm.py: _FORMAT_IDS).
constexpr int64_t kQ8_0 = 0, kQ4_0 = 1, kQ4_1 = 2, kInt8 = 3, kInt4 = 4, kNF4 = 5;
constexpr int64_t kNumFormats = 6;
constexpr int64_t kRowsPerItem = 16;  // stored rows per work item (a multiple of every JAXLA_RO)
// Products of fewer weights x rows of X than this do not go to XLA's pool. Handing work to it
// costs a wake-up of a helper and of the caller (tens of microseconds in a VM), more than a decode
// product takes: SmolLM2's 210 per-token layer products (M = 1, 0.1-0.9 M weights each) took 7.9 ms
// per token split over 2 threads and 4.9 ms on one (same kernel, same process, interleaved). 4 M
// is ~0.15 ms of work on one AVX-512 core. They are split over the spinning team instead, whose
// helpers are already awake between the products of a decode step: SmolLM2 Q4_1 decode 138-157 ->
// 186-195 tok/s on the 2-core AMD EPYC of 2026-12-02 (fresh processes, alternated; RESULTS.md).
constexpr int64_t kSerialWork = int64_t{1} << 22;

// QLoRA's NormalFloat-4 values (jaxla.quant.NF4_TABLE).
alignas(64) const float kNF4Table[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

struct QmmArgs {
  int64_t format, m, r, columns, block;
  int64_t xs;  // floats per row of x: columns rounded up to 32 (zero-padded when not a multiple)
  const float* x;
  const uint8_t* codes;
  const float *scales, *offsets;
  float* y;
};

using jaxla_parallel::num_workers;
using jaxla_parallel::parallel_for;
using jaxla_parallel::SpinTeam;
using jaxla_parallel::team_for;

// A small product's pieces per thread of the spinning team (the threads finish at different times:
// a few pieces each balance them at a few atomic increments per product).
constexpr int64_t kTeamItems = 4;

// Stored rows per piece rounded up to a multiple of 8 (of every JAXLA_RO and of the AVX-512 wide
// tile's 2 rows, so only a product's last piece has a partial register tile).
inline int64_t round_up_rows(int64_t rows) { return (rows + 7) / 8 * 8; }

}  // namespace jaxla_qmm

// Each path's copy of the kernel code; the pragmas set the instruction set of every function
// defined between push and pop (lambdas and the instantiated templates of the .inc included).
#define JAXLA_VBYTES 16
#define JAXLA_RO 2
#define JAXLA_MT 2
#define JAXLA_PF 4
namespace qmm_portable {
using namespace jaxla_qmm;
#include "_cpu_qmm_kernels.inc"
}  // namespace qmm_portable
#undef JAXLA_VBYTES
#undef JAXLA_RO
#undef JAXLA_MT
#undef JAXLA_PF

#if JAXLA_X86
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
#define JAXLA_VBYTES 32
#define JAXLA_RO 4
#define JAXLA_MT 4
#define JAXLA_PF 16
namespace qmm_avx2 {
using namespace jaxla_qmm;
#include "_cpu_qmm_kernels.inc"
}  // namespace qmm_avx2
#undef JAXLA_VBYTES
#undef JAXLA_RO
#undef JAXLA_MT
#undef JAXLA_PF
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#if defined(__clang__)
#pragma clang attribute push( \
    __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl")
#endif
#define JAXLA_VBYTES 64
#define JAXLA_RO 4
#define JAXLA_MT 8
#define JAXLA_PF 16
namespace qmm_avx512 {
using namespace jaxla_qmm;
#include "_cpu_qmm_kernels.inc"
}  // namespace qmm_avx512
#undef JAXLA_VBYTES
#undef JAXLA_RO
#undef JAXLA_MT
#undef JAXLA_PF
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // JAXLA_X86

namespace jaxla_qmm {

struct Path {
  const char* name;
  void (*qmm)(ffi::ThreadPool&, const QmmArgs&);
};

// Indexed by the `path` attribute (jaxla/_cpu_dispatch.h); names as JAXLA_CPU_KERNEL spells them.
const Path kPaths[] = {
    {"portable", qmm_portable::qmm},
#if JAXLA_X86
    {"avx2", qmm_avx2::qmm},
    {"avx512", qmm_avx512::qmm},
#endif
};
constexpr int64_t kNumPaths = sizeof(kPaths) / sizeof(kPaths[0]);

// The shared checks, plus F16C (the half-precision block scales) for the x86 vector paths.
bool path_supported(int64_t p) {
  if (p < 0 || p >= kNumPaths || !jaxla_dispatch::path_supported(p)) return false;
#if JAXLA_X86
  if (p != jaxla_dispatch::kPortable) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("f16c");
  }
#endif
  return true;
}

ffi::Error invalid(const std::string& what) {
  return ffi::Error::InvalidArgument("jaxla quantized matmul kernel: " + what);
}

// `stack` matrices lie one after another in codes/scales/offsets; the product uses matrix `index`
// (1 and 0 for the plain target), so a layer of a stacked QArray is read in place, never copied.
ffi::Error QmmBody(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer codes, ffi::AnyBuffer scales,
                   ffi::AnyBuffer offsets, ffi::Result<ffi::AnyBuffer> y, int64_t format,
                   int64_t columns, int64_t block, int64_t path, int64_t stack, int64_t index) {
  if (stack <= 0) return invalid("stack must be positive");
  if (index < 0 || index >= stack)
    return invalid("layer index " + std::to_string(index) + " outside [0, " + std::to_string(stack) +
                   ")");
  if (!path_supported(path))
    return invalid("code path " + std::to_string(path) + " is not one this CPU supports");
  if (format < 0 || format >= kNumFormats) return invalid("unknown format " + std::to_string(format));
  if (columns <= 0 || block <= 0 || columns % block)
    return invalid("columns must be a positive multiple of the block size");
  if (x.element_type() != ffi::DataType::F32 || y->element_type() != ffi::DataType::F32)
    return invalid("x and y must be f32");
  const int64_t xn = static_cast<int64_t>(x.element_count());
  if (xn % columns) return invalid("x's last dimension is not the QArray's columns");
  QmmArgs a{};
  a.format = format;
  a.columns = columns;
  a.block = block;
  a.m = xn / columns;
  const int64_t nc_all = static_cast<int64_t>(codes.element_count());
  if (nc_all % stack) return invalid("codes do not split into the stacked matrices");
  const int64_t nc = nc_all / stack;
  const bool gguf = format <= kQ4_1;
  int64_t row_bytes = columns;  // int8
  if (gguf) {
    if (block != 32 || columns % 32) return invalid("GGUF formats have blocks of 32");
    row_bytes = columns / 32 * (format == kQ8_0 ? 34 : format == kQ4_0 ? 18 : 20);
  } else if (format != kInt8) {
    if (block % 32 || columns % 32) return invalid("int4/nf4 need blocks of a multiple of 32");
    row_bytes = columns / 2;
  }
  if (nc % row_bytes || codes.element_type() != (format == kInt8 ? ffi::DataType::S8 : ffi::DataType::U8))
    return invalid("codes of the wrong size or type");
  a.r = nc / row_bytes;
  const int64_t per_row = format == kInt8 ? 1 : columns / block;
  if (!gguf && (scales.element_type() != ffi::DataType::F32 ||
                static_cast<int64_t>(scales.element_count()) != stack * a.r * per_row))
    return invalid("scales must be f32 with one value per row (int8) or per block");
  if (format == kInt4 && (offsets.element_type() != ffi::DataType::F32 ||
                          static_cast<int64_t>(offsets.element_count()) != stack * a.r * per_row))
    return invalid("int4 offsets must be f32 with one value per block");
  if (static_cast<int64_t>(y->element_count()) != a.m * a.r) return invalid("y of the wrong size");
  a.codes = reinterpret_cast<const uint8_t*>(codes.untyped_data()) + index * nc;
  a.scales = reinterpret_cast<const float*>(scales.untyped_data());
  a.offsets = reinterpret_cast<const float*>(offsets.untyped_data());
  if (!gguf) a.scales += index * a.r * per_row;
  if (format == kInt4) a.offsets += index * a.r * per_row;
  a.y = reinterpret_cast<float*>(y->untyped_data());
  if (a.m == 0 || a.r == 0) return ffi::Error::Success();
  a.xs = (columns + 31) / 32 * 32;
  const float* src = reinterpret_cast<const float*>(x.untyped_data());
  std::unique_ptr<float[]> copy;
  if (format == kInt4 || format == kNF4) {
    // The kernel reads a chunk's 32 nibbles lows first (_cpu_qmm_kernels.inc), i.e. the chunk's
    // even values then its odd ones in jaxla's paired order: X's chunks are permuted alike.
    copy.reset(new float[a.m * a.xs]);
    for (int64_t i = 0; i < a.m * a.xs; i += 32)
      for (int64_t j = 0; j < 16; ++j) {
        copy[i + j] = src[i + 2 * j];
        copy[i + 16 + j] = src[i + 2 * j + 1];
      }
    a.x = copy.get();
  } else if (a.xs == columns) {
    a.x = src;
  } else {  // int8 rows of any length: X is zero-padded to whole chunks, as the last chunk's codes
    copy.reset(new float[a.m * a.xs]());
    for (int64_t i = 0; i < a.m; ++i) std::memcpy(copy.get() + i * a.xs, src + i * columns,
                                                  columns * sizeof(float));
    a.x = copy.get();
  }
  kPaths[path].qmm(pool, a);
  return ffi::Error::Success();
}

// C++ exceptions (std::bad_alloc for a huge call) must not cross into XLA: they become FFI errors.
ffi::Error QmmImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer codes, ffi::AnyBuffer scales,
                   ffi::AnyBuffer offsets, ffi::Result<ffi::AnyBuffer> y, int64_t format,
                   int64_t columns, int64_t block, int64_t path) {
  try {
    return QmmBody(pool, x, codes, scales, offsets, y, format, columns, block, path, 1, 0);
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("jaxla quantized matmul kernel: ") + e.what());
  }
}

// The same product for matrix `index` (an s32 scalar operand) of `stack` stacked matrices: inside a
// loop over layers the whole stack is the operand, so XLA does not copy the layer's slice out first.
ffi::Error QmmLayerImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer index,
                        ffi::AnyBuffer codes, ffi::AnyBuffer scales, ffi::AnyBuffer offsets,
                        ffi::Result<ffi::AnyBuffer> y, int64_t format, int64_t columns, int64_t block,
                        int64_t path, int64_t stack) {
  if (index.element_type() != ffi::DataType::S32 || index.element_count() != 1)
    return invalid("the layer index must be one int32");
  const int64_t i = *reinterpret_cast<const int32_t*>(index.untyped_data());
  try {
    return QmmBody(pool, x, codes, scales, offsets, y, format, columns, block, path, stack, i);
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("jaxla quantized matmul kernel: ") + e.what());
  }
}

}  // namespace jaxla_qmm

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxlaQuantMatmul, jaxla_qmm::QmmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // codes
                                  .Arg<ffi::AnyBuffer>()  // scales
                                  .Arg<ffi::AnyBuffer>()  // offsets
                                  .Ret<ffi::AnyBuffer>()  // y
                                  .Attr<int64_t>("format")
                                  .Attr<int64_t>("columns")
                                  .Attr<int64_t>("block")
                                  .Attr<int64_t>("path"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxlaQuantMatmulLayer, jaxla_qmm::QmmLayerImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // index
                                  .Arg<ffi::AnyBuffer>()  // codes (stack, ...)
                                  .Arg<ffi::AnyBuffer>()  // scales
                                  .Arg<ffi::AnyBuffer>()  // offsets
                                  .Ret<ffi::AnyBuffer>()  // y
                                  .Attr<int64_t>("format")
                                  .Attr<int64_t>("columns")
                                  .Attr<int64_t>("block")
                                  .Attr<int64_t>("path")
                                  .Attr<int64_t>("stack"));

namespace {

PyObject* registrations(PyObject*, PyObject*) {
  PyObject* d = PyDict_New();
  if (d == nullptr) return nullptr;
  const std::pair<const char*, void*> targets[] = {
      {"jaxla_quant_matmul", reinterpret_cast<void*>(&JaxlaQuantMatmul)},
      {"jaxla_quant_matmul_layer", reinterpret_cast<void*>(&JaxlaQuantMatmulLayer)},
  };
  for (const auto& [name, fn] : targets) {
    PyObject* cap = PyCapsule_New(fn, nullptr, nullptr);
    if (cap == nullptr || PyDict_SetItemString(d, name, cap) != 0) {
      Py_XDECREF(cap);
      Py_DECREF(d);
      return nullptr;
    }
    Py_DECREF(cap);
  }
  return d;
}

// ({name: path index} of every path compiled in, [names this CPU can run, best first]).
PyObject* paths(PyObject*, PyObject*) {
  return jaxla_dispatch::path_table(jaxla_qmm::kNumPaths,
                                    [](int64_t p) { return jaxla_qmm::kPaths[p].name; });
}

PyMethodDef methods[] = {
    {"registrations", registrations, METH_NOARGS, "FFI targets: {name: capsule}."},
    {"paths", paths, METH_NOARGS,
     "({name: path attribute} of the compiled code paths, [names this CPU runs, best first])."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_qmm",
                      "jaxla's fused dequantize-and-multiply CPU kernel.", -1, methods, nullptr,
                      nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__cpu_qmm() { return PyModule_Create(&module); }
