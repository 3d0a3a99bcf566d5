// Compiled CPU kernels for jaxla.dot_product_attention (implementation="cpu"), called through XLA's FFI.
//
// Tiled online-softmax ("flash") attention in float32. XLA:CPU runs each small tile matmul of the
// plain-JAX "chunked" path as a separate multi-threaded call with its score tile in memory, which
// caps it at about half a large matmul's rate on a 2-core machine. Here every thread takes whole
// work items (a batch row, a kv head and a block of query positions in the forward pass; a block
// of key positions in the backward pass) and runs its score tile, softmax and both matmuls while
// the tile is in its own L2 cache.
//
// Layouts (row-major, "Bt" is every leading dimension folded together, so vmap just adds rows):
//   q (Bt, T, N, H), k (Bt, S, K, H), v (Bt, S, K, Hv), q_len (Bt,), kv_len (Bt,), q_seg (Bt, T),
//   kv_seg (Bt, S) int32; out (Bt, T, N, Hv), lse2 (Bt, T, N) float32 in base-2 units (+inf for a row
//   that sees no key). Query head n uses kv head n / G, G = N / K. A work item's rows are its query
//   positions times the G heads of one kv head, in (position, head) order.
// Visibility of key j to query i: left < 0 or j >= i - left; right < 0 or j <= i + right;
//   i < q_len[b]; j < kv_len[b]; if has_seg, q_seg[b, i] == kv_seg[b, j].
//
// Code paths (run-time dispatch): the tile code lives in _cpu_kernels.inc, which this file includes
// once per path, each copy in its own namespace and compiled for its own instruction set through a
// target pragma, while this file is compiled for the baseline target (setup.py passes no -m flags):
//   0 "portable" (the baseline: SSE2 on x86-64, whatever the compiler targets elsewhere),
//   1 "avx2"     (AVX2 + FMA; x86-64 only), 2 "avx512" (AVX-512 F/BW/DQ/VL; x86-64 only).
// On a CPU with AVX512-BF16 the avx512 path also takes bf16 q, k, v (and dout) in the forward and
// backward passes (a fourth copy, compiled with avx512bf16, holds that code: forward_bf16,
// backward_bf16); everything else is f32. Where the CPU and OS also have AMX-BF16 tiles, the calls'
// `amx` attribute runs those passes' GEMMs on tiles instead (_cpu_amx.inc, added to that copy with
// amx-tile and amx-bf16: forward_amx, backward_amx; jaxla_dispatch::amx_bf16_supported()).
// paths() lists those this CPU can run, best first; jaxla picks the first (or the one the
// JAXLA_CPU_KERNEL environment variable names) and passes it to every call as the `path` attribute,
// which the handlers check again, so no call runs instructions the CPU lacks.
#include <Python.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

#include "../_cpu_dispatch.h"  // path_supported, bf16_dot_supported, JAXLA_X86
#include "../_cpu_parallel.h"  // num_workers, parallel_for

namespace ffi = xla::ffi;

namespace jaxla_common {

constexpr float kInf = std::numeric_limits<float>::infinity();

using jaxla_parallel::num_workers;
using jaxla_parallel::parallel_for;

struct Problem {
  int64_t bt, t, s, n, kh, g, h, hv;
  float scale;  // softmax scale times log2(e)
  int64_t left, right;  // band; -1 when unbounded
  bool has_seg;
  int64_t block_q, block_k;  // query positions and keys per tile
  const int32_t *q_len, *kv_len, *q_seg, *kv_seg;

  // Visible key range [lo, hi) of query position i in batch row b (before segments).
  inline void range(int64_t b, int64_t i, int64_t* lo, int64_t* hi) const {
    int64_t kv = std::min<int64_t>(s, kv_len[b]);
    int64_t l = left < 0 ? 0 : std::max<int64_t>(0, i - left);
    int64_t r = right < 0 ? kv : std::min<int64_t>(kv, i + right + 1);
    if (i >= q_len[b]) r = l;  // padding query: sees nothing
    *lo = l;
    *hi = std::max(l, r);
  }
};

struct BwdArgs {
  const float *q, *k, *v, *dout, *lse2, *delta;
  float scale;  // natural-units logit scale
  float *dk, *dv;
};

// The backward pass's work items and their dQ. An item is one group of key blocks of one (batch
// row, kv head): it zeroes that head's rows of its group's dQ slot, then adds every block's part of
// dQ into them. No two items share a slot's rows, so no item waits on another, and with one group
// (slot 0 is the dq output) nothing is zeroed, allocated or summed outside the items. More groups
// (slots 1 .. groups - 1 extra (Bt, T, N, H) arrays, summed into dq by the caller) split heads
// when there are too few for the workers. (A dQ buffer per worker would cost a full dQ each: at
// T = 32k, N = 32, H = 128, 512 MiB per worker, plus a pass to zero them and one to sum them.)
struct DqSlots {
  int64_t groups;
  float* const* slots;  // slots[grp]: the (Bt, T, N, H) array group grp accumulates into
};

// Groups for `heads` (batch row, kv head) pairs of `key_blocks` blocks on `threads` threads: the
// fewest that give at least four items per thread and keep the threads at least 90 % busy when the
// items cost alike (items / (rounds · threads), rounds = ceil(items / threads)), else as many as
// there are threads (or key blocks), so never more dQ memory than a buffer per worker. So whole
// heads (one group) when they balance: 8 or 9 heads on 2 threads (9 items fill 0.9 of 5 rounds),
// but two groups for 65 heads on 16 threads (65 items would fill 0.81 of 5 rounds, 130 fill 0.90
// of 9), and for 4 heads on 2 threads (fewer than four items per thread).
inline int64_t dq_groups(int64_t threads, int64_t heads, int64_t key_blocks) {
  if (threads <= 1) return 1;
  const int64_t cap = std::max<int64_t>(1, std::min(threads, key_blocks));
  for (int64_t g = 1; g < cap; ++g) {
    const int64_t items = heads * g, rounds = (items + threads - 1) / threads;
    if (items >= 4 * threads && 10 * items >= 9 * rounds * threads) return g;
  }
  return cap;
}

// Key block kbi's group: blocks dealt to the groups in rounds, each round in the reverse order of
// the one before, so under a causal band every group gets early (long) and late (short) blocks.
inline int64_t dq_group_of(int64_t kbi, int64_t groups) {
  const int64_t round = kbi / groups, j = kbi % groups;
  return round % 2 == 0 ? j : groups - 1 - j;
}

// Runs block(dq_slot, bh, kbi) for every (batch row, kv head) bh and key block kbi of pr (block_k
// already rounded by the path), one item per (group, bh) as described at DqSlots.
template <typename Block>
void for_backward_items(ffi::ThreadPool& pool, const Problem& pr, const DqSlots& dq, const Block& block) {
  const int64_t nbh = pr.bt * pr.kh, nkb = (pr.s + pr.block_k - 1) / pr.block_k;
  const int64_t width = pr.g * pr.h;  // one head's query heads in a (Bt, T, N, H) row
  parallel_for(pool, nbh * dq.groups, [&](int64_t item, int64_t) {
    const int64_t grp = item / nbh, bh = item % nbh;
    const int64_t kvh = bh % pr.kh, b = bh / pr.kh;
    float* slot = dq.slots[grp];
    for (int64_t t = 0; t < pr.t; ++t) {
      float* row = slot + ((b * pr.t + t) * pr.n + kvh * pr.g) * pr.h;
      std::fill(row, row + width, 0.0f);
    }
    for (int64_t kbi = 0; kbi < nkb; ++kbi)
      if (dq_group_of(kbi, dq.groups) == grp) block(slot, bh, kbi);
  });
}

int64_t leading(const ffi::AnyBuffer::Dimensions& dims, int keep) {
  int64_t p = 1;
  for (size_t i = 0; i + keep < dims.size(); ++i) p *= dims[i];
  return p;
}

// Fills pr from the operands and attributes of a call, checking the shapes.
ffi::Error setup_problem(Problem& pr, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                         ffi::AnyBuffer q_len, ffi::AnyBuffer kv_len, ffi::AnyBuffer q_seg,
                         ffi::AnyBuffer kv_seg, float scale, int64_t left, int64_t right, bool has_seg,
                         int64_t block_q, int64_t block_k) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() < 4 || kd.size() != qd.size() || vd.size() != qd.size())
    return ffi::Error::InvalidArgument("jaxla attention kernel: q, k, v must have equal rank >= 4");
  const size_t r = qd.size();
  pr.bt = leading(qd, 3);
  pr.t = qd[r - 3];
  pr.n = qd[r - 2];
  pr.h = qd[r - 1];
  pr.s = kd[r - 3];
  pr.kh = kd[r - 2];
  pr.hv = vd[r - 1];
  if (leading(kd, 3) != pr.bt || leading(vd, 3) != pr.bt || kd[r - 1] != pr.h || vd[r - 3] != pr.s ||
      vd[r - 2] != pr.kh || pr.kh <= 0 || pr.n % pr.kh != 0 || pr.hv % 8 != 0)
    return ffi::Error::InvalidArgument("jaxla attention kernel: inconsistent q/k/v shapes");
  if (static_cast<int64_t>(q_len.element_count()) != pr.bt ||
      static_cast<int64_t>(kv_len.element_count()) != pr.bt ||
      static_cast<int64_t>(q_seg.element_count()) != pr.bt * pr.t ||
      static_cast<int64_t>(kv_seg.element_count()) != pr.bt * pr.s)
    return ffi::Error::InvalidArgument("jaxla attention kernel: lengths/segments of the wrong size");
  pr.g = pr.n / pr.kh;
  pr.q_len = reinterpret_cast<const int32_t*>(q_len.untyped_data());
  pr.kv_len = reinterpret_cast<const int32_t*>(kv_len.untyped_data());
  pr.q_seg = reinterpret_cast<const int32_t*>(q_seg.untyped_data());
  pr.kv_seg = reinterpret_cast<const int32_t*>(kv_seg.untyped_data());
  pr.scale = scale * 1.4426950408889634f;  // base-2 units: the softmax uses exp2
  pr.left = left;
  pr.right = right;
  pr.has_seg = has_seg;
  pr.block_q = std::max<int64_t>(1, block_q);
  pr.block_k = (std::max<int64_t>(16, block_k) + 15) / 16 * 16;  // each path rounds up to its panels
  return ffi::Error::Success();
}

}  // namespace

// Each path's copy of the tile code. The pragmas set the instruction set of every function defined
// between push and pop (lambdas and the instantiated templates of the .inc included).
// 4-float vectors: one SSE2 / NEON register each, so the 6 x 8 register tile fits 16 registers.
#define JAXLA_VBYTES 16
#define JAXLA_MR 6
namespace path_portable {
using namespace jaxla_common;
#include "_cpu_kernels.inc"
}  // namespace path_portable
#undef JAXLA_VBYTES
#undef JAXLA_MR

#if JAXLA_X86
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
#define JAXLA_VBYTES 32
#define JAXLA_MR 6
namespace path_avx2 {
using namespace jaxla_common;
#include "_cpu_kernels.inc"
}  // namespace path_avx2
#undef JAXLA_VBYTES
#undef JAXLA_MR
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,avx512f,avx512bw,avx512dq,avx512vl"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512dq,avx512vl")
#endif
#define JAXLA_VBYTES 64
#define JAXLA_MR 12
namespace path_avx512 {
using namespace jaxla_common;
#include "_cpu_kernels.inc"
}  // namespace path_avx512
#undef JAXLA_VBYTES
#undef JAXLA_MR
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// AVX-512 again, with AVX512-BF16 for both passes on bf16 inputs (forward_bf16, backward_bf16);
// only called where the CPU has avx512bf16, the f32 functions of this copy are never used.
#if defined(__clang__)
#pragma clang attribute push(                                                                    \
    __attribute__((target("avx2,fma,avx512f,avx512bw,avx512dq,avx512vl,avx512bf16"))), \
    apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")
#endif
#define JAXLA_VBYTES 64
#define JAXLA_MR 12
#define JAXLA_BF16 1
namespace path_avx512bf16 {
using namespace jaxla_common;
#include "_cpu_kernels.inc"
}  // namespace path_avx512bf16
#undef JAXLA_VBYTES
#undef JAXLA_MR
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// The AMX kernels for bf16 inputs (forward_amx, backward_amx), added to that copy with the tile
// instructions on top of its target; only called where the CPU and OS provide AMX.
#if defined(__x86_64__)
#if defined(__clang__)
#pragma clang attribute push(                                                                    \
    __attribute__((target("avx2,fma,avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,amx-tile,"      \
                          "amx-bf16"))),                                                         \
    apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,amx-tile,amx-bf16")
#endif
#define JAXLA_VBYTES 64
#define JAXLA_MR 12
namespace path_avx512bf16 {
#include "_cpu_amx.inc"
}  // namespace path_avx512bf16
#undef JAXLA_VBYTES
#undef JAXLA_MR
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#define JAXLA_AMX 1
#else
#define JAXLA_AMX 0
#endif  // __x86_64__
#undef JAXLA_BF16
#endif  // JAXLA_X86

namespace jaxla_common {

struct Path {
  const char* name;
  void (*forward)(ffi::ThreadPool&, const Problem&, const float*, const float*, const float*, float*,
                  float*);
  void (*backward)(ffi::ThreadPool&, const Problem&, const BwdArgs&, const DqSlots&);
  int64_t (*backward_groups)(ffi::ThreadPool&, const Problem&);
};

// Indexed by the `path` attribute; names as JAXLA_CPU_KERNEL spells them.
const Path kPaths[] = {
    {"portable", path_portable::forward, path_portable::backward, path_portable::backward_groups},
#if JAXLA_X86
    {"avx2", path_avx2::forward, path_avx2::backward, path_avx2::backward_groups},
    {"avx512", path_avx512::forward, path_avx512::backward, path_avx512::backward_groups},
#endif
};
constexpr int64_t kNumPaths = sizeof(kPaths) / sizeof(kPaths[0]);

// The CPU-feature checks are shared with the quantized-matmul kernel (jaxla/_cpu_dispatch.h).
using jaxla_dispatch::amx_bf16_supported;
using jaxla_dispatch::bf16_dot_supported;
using jaxla_dispatch::path_supported;

ffi::Error check_path(int64_t path) {
  if (path_supported(path)) return ffi::Error::Success();
  return ffi::Error::InvalidArgument("jaxla attention kernel: code path " + std::to_string(path) +
                                     " is not one this CPU supports");
}

// The `amx` attribute: bf16 GEMMs on AMX tiles instead of AVX512-BF16 dot products.
ffi::Error check_amx(bool amx) {
  if (!amx || amx_bf16_supported()) return ffi::Error::Success();
  return ffi::Error::InvalidArgument("jaxla attention kernel: amx=true on a CPU (or OS) without "
                                     "AMX-BF16 tiles");
}

ffi::Error ForwardBody(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                       ffi::AnyBuffer q_len, ffi::AnyBuffer kv_len, ffi::AnyBuffer q_seg,
                       ffi::AnyBuffer kv_seg, ffi::Result<ffi::AnyBuffer> out,
                       ffi::Result<ffi::AnyBuffer> lse2, float scale, int64_t left, int64_t right,
                       bool has_seg, int64_t block_q, int64_t block_k, int64_t path, bool amx) {
  if (auto err = check_path(path); !err.success()) return err;
  Problem pr{};
  if (auto err = setup_problem(pr, q, k, v, q_len, kv_len, q_seg, kv_seg, scale, left, right, has_seg,
                               block_q, block_k);
      !err.success())
    return err;
  const ffi::DataType dt = q.element_type();
  if (k.element_type() != dt || v.element_type() != dt ||
      (dt != ffi::DataType::F32 && dt != ffi::DataType::BF16))
    return ffi::Error::InvalidArgument("jaxla attention kernel: q, k, v must all be f32 or all bf16");
  if (dt == ffi::DataType::BF16) {
#if JAXLA_X86
    if (path != 2 || !bf16_dot_supported() || pr.h % 32 != 0 || pr.hv % 32 != 0 || !(pr.scale > 0))
      return ffi::Error::InvalidArgument(
          "jaxla attention kernel: bf16 inputs need the avx512 path on a CPU with AVX512-BF16, "
          "H and Hv multiples of 32 and a positive scale");
    if (auto err = check_amx(amx); !err.success()) return err;
    using path_avx512bf16::bf16;
    auto* run = path_avx512bf16::forward_bf16;
#if JAXLA_AMX
    if (amx) run = path_avx512bf16::forward_amx;
#endif
    run(pool, pr, reinterpret_cast<const bf16*>(q.untyped_data()),
        reinterpret_cast<const bf16*>(k.untyped_data()), reinterpret_cast<const bf16*>(v.untyped_data()),
        reinterpret_cast<float*>(out->untyped_data()), reinterpret_cast<float*>(lse2->untyped_data()));
    return ffi::Error::Success();
#else
    return ffi::Error::InvalidArgument("jaxla attention kernel: bf16 inputs need AVX512-BF16");
#endif
  }
  kPaths[path].forward(pool, pr, reinterpret_cast<const float*>(q.untyped_data()),
                       reinterpret_cast<const float*>(k.untyped_data()),
                       reinterpret_cast<const float*>(v.untyped_data()),
                       reinterpret_cast<float*>(out->untyped_data()),
                       reinterpret_cast<float*>(lse2->untyped_data()));
  return ffi::Error::Success();
}

ffi::Error BackwardBody(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                        ffi::AnyBuffer dout, ffi::AnyBuffer lse2, ffi::AnyBuffer delta,
                        ffi::AnyBuffer q_len, ffi::AnyBuffer kv_len, ffi::AnyBuffer q_seg,
                        ffi::AnyBuffer kv_seg, ffi::Result<ffi::AnyBuffer> dq,
                        ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv, float scale,
                        int64_t left, int64_t right, bool has_seg, int64_t block_q, int64_t block_k,
                        int64_t path, bool amx) {
  if (auto err = check_path(path); !err.success()) return err;
  Problem pr{};
  if (auto err = setup_problem(pr, q, k, v, q_len, kv_len, q_seg, kv_seg, scale, left, right, has_seg,
                               block_q, block_k);
      !err.success())
    return err;
  if (pr.h % 8 != 0)
    return ffi::Error::InvalidArgument("jaxla attention kernel: H must be a multiple of 8");
  // q, k, v, dout all f32, or all bf16 (AVX512-BF16 GEMMs, as in the forward pass); lse2, delta f32.
  const bool is_bf16 = q.element_type() == ffi::DataType::BF16;
  for (const ffi::AnyBuffer* x : {&k, &v, &dout})
    if (x->element_type() != q.element_type())
      return ffi::Error::InvalidArgument("jaxla attention backward kernel: q, k, v, dout must all be "
                                         "f32 or all bf16");
  if (!is_bf16 && q.element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("jaxla attention backward kernel: operands must be f32 or bf16");
  if (lse2.element_type() != ffi::DataType::F32 || delta.element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("jaxla attention backward kernel: lse2 and delta must be f32");
#if JAXLA_X86
  if (is_bf16 && (path != 2 || !bf16_dot_supported() || pr.h % 32 != 0 || pr.hv % 32 != 0))
#else
  if (is_bf16)
#endif
    return ffi::Error::InvalidArgument(
        "jaxla attention backward kernel: bf16 operands need the avx512 path on a CPU with "
        "AVX512-BF16 and H, Hv multiples of 32");
  if (auto err = check_amx(is_bf16 && amx); !err.success()) return err;
  BwdArgs a{};
  a.q = reinterpret_cast<const float*>(q.untyped_data());
  a.k = reinterpret_cast<const float*>(k.untyped_data());
  a.v = reinterpret_cast<const float*>(v.untyped_data());
  a.dout = reinterpret_cast<const float*>(dout.untyped_data());
  a.lse2 = reinterpret_cast<const float*>(lse2.untyped_data());
  a.delta = reinterpret_cast<const float*>(delta.untyped_data());
  a.scale = scale;
  a.dk = reinterpret_cast<float*>(dk->untyped_data());
  a.dv = reinterpret_cast<float*>(dv->untyped_data());
  float* dqp = reinterpret_cast<float*>(dq->untyped_data());
  const int64_t dq_size = pr.bt * pr.t * pr.n * pr.h;
  if (dq_size == 0 || pr.bt * pr.s * pr.kh == 0) {
    std::fill(dqp, dqp + dq_size, 0.0f);
    std::fill(a.dk, a.dk + pr.bt * pr.s * pr.kh * pr.h, 0.0f);
    std::fill(a.dv, a.dv + pr.bt * pr.s * pr.kh * pr.hv, 0.0f);
    return ffi::Error::Success();
  }
  const Path& kern = kPaths[path];
  // Group 0 accumulates into dq itself, the others into their own arrays, summed at the end.
  const int64_t groups = kern.backward_groups(pool, pr);
  std::unique_ptr<float[]> extra(groups > 1 ? new float[(groups - 1) * dq_size] : nullptr);
  std::vector<float*> bufs(groups);
  bufs[0] = dqp;
  for (int64_t i = 1; i < groups; ++i) bufs[i] = extra.get() + (i - 1) * dq_size;
  const DqSlots slots{groups, bufs.data()};
  if (is_bf16) {
#if JAXLA_X86
    using path_avx512bf16::bf16;
    path_avx512bf16::BwdArgsBf16 ab{};
    ab.q = reinterpret_cast<const bf16*>(q.untyped_data());
    ab.k = reinterpret_cast<const bf16*>(k.untyped_data());
    ab.v = reinterpret_cast<const bf16*>(v.untyped_data());
    ab.dout = reinterpret_cast<const bf16*>(dout.untyped_data());
    ab.lse2 = a.lse2;
    ab.delta = a.delta;
    ab.scale = a.scale;
    ab.dk = a.dk;
    ab.dv = a.dv;
#if JAXLA_AMX
    if (amx)
      path_avx512bf16::backward_amx(pool, pr, ab, slots);
    else
#endif
      path_avx512bf16::backward_bf16(pool, pr, ab, slots);
#endif
  } else {
    kern.backward(pool, pr, a, slots);
  }
  if (groups > 1) {
    const int64_t chunk = 1 << 16, nchunks = (dq_size + chunk - 1) / chunk;
    parallel_for(pool, nchunks, [&](int64_t c, int64_t) {
      const int64_t lo = c * chunk, hi = std::min(dq_size, lo + chunk);
      for (int64_t i = 1; i < groups; ++i) {
        const float* src = bufs[i];
        for (int64_t e = lo; e < hi; ++e) dqp[e] += src[e];
      }
    });
  }
  return ffi::Error::Success();
}

// C++ exceptions (std::bad_alloc for a huge call) must not cross into XLA: they become FFI errors.
ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                       ffi::AnyBuffer q_len, ffi::AnyBuffer kv_len, ffi::AnyBuffer q_seg,
                       ffi::AnyBuffer kv_seg, ffi::Result<ffi::AnyBuffer> out,
                       ffi::Result<ffi::AnyBuffer> lse2, float scale, int64_t left, int64_t right,
                       bool has_seg, int64_t block_q, int64_t block_k, int64_t path, bool amx) {
  try {
    return ForwardBody(pool, q, k, v, q_len, kv_len, q_seg, kv_seg, out, lse2, scale, left, right,
                       has_seg, block_q, block_k, path, amx);
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("jaxla attention forward kernel: ") + e.what());
  }
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                        ffi::AnyBuffer dout, ffi::AnyBuffer lse2, ffi::AnyBuffer delta,
                        ffi::AnyBuffer q_len, ffi::AnyBuffer kv_len, ffi::AnyBuffer q_seg,
                        ffi::AnyBuffer kv_seg, ffi::Result<ffi::AnyBuffer> dq,
                        ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv, float scale,
                        int64_t left, int64_t right, bool has_seg, int64_t block_q, int64_t block_k,
                        int64_t path, bool amx) {
  try {
    return BackwardBody(pool, q, k, v, dout, lse2, delta, q_len, kv_len, q_seg, kv_seg, dq, dk, dv,
                        scale, left, right, has_seg, block_q, block_k, path, amx);
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("jaxla attention backward kernel: ") + e.what());
  }
}

}  // namespace jaxla_common

using namespace jaxla_common;

// The attributes both kernels take, after their buffers.
template <typename Binding>
auto with_attrs(Binding binding) {
  return std::move(binding)
      .template Attr<float>("scale")
      .template Attr<int64_t>("left")
      .template Attr<int64_t>("right")
      .template Attr<bool>("has_seg")
      .template Attr<int64_t>("block_q")
      .template Attr<int64_t>("block_k")
      .template Attr<int64_t>("path")
      .template Attr<bool>("amx");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxlaAttentionForward, ForwardImpl,
                              with_attrs(ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Arg<ffi::AnyBuffer>()  // q_len
                                  .Arg<ffi::AnyBuffer>()  // kv_len
                                  .Arg<ffi::AnyBuffer>()  // q_seg
                                  .Arg<ffi::AnyBuffer>()  // kv_seg
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Ret<ffi::AnyBuffer>()));  // lse2

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxlaAttentionBackward, BackwardImpl,
                              with_attrs(ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Arg<ffi::AnyBuffer>()  // dout
                                  .Arg<ffi::AnyBuffer>()  // lse2
                                  .Arg<ffi::AnyBuffer>()  // delta
                                  .Arg<ffi::AnyBuffer>()  // q_len
                                  .Arg<ffi::AnyBuffer>()  // kv_len
                                  .Arg<ffi::AnyBuffer>()  // q_seg
                                  .Arg<ffi::AnyBuffer>()  // kv_seg
                                  .Ret<ffi::AnyBuffer>()  // dq
                                  .Ret<ffi::AnyBuffer>()  // dk
                                  .Ret<ffi::AnyBuffer>()));  // dv

namespace {

int add_capsule(PyObject* d, const char* name, void* fn) {
  PyObject* cap = PyCapsule_New(fn, nullptr, nullptr);
  if (cap == nullptr) return -1;
  int rc = PyDict_SetItemString(d, name, cap);
  Py_DECREF(cap);
  return rc;
}

PyObject* registrations(PyObject*, PyObject*) {
  PyObject* d = PyDict_New();
  if (d == nullptr) return nullptr;
  if (add_capsule(d, "jaxla_attention_fwd", reinterpret_cast<void*>(&JaxlaAttentionForward)) != 0 ||
      add_capsule(d, "jaxla_attention_bwd", reinterpret_cast<void*>(&JaxlaAttentionBackward)) != 0) {
    Py_DECREF(d);
    return nullptr;
  }
  return d;
}

PyObject* cpu_supported(PyObject*, PyObject*) {
  Py_RETURN_TRUE;  // the portable path runs on any CPU the module loads on
}

// {name: path index} of every path compiled in, and the names this CPU can run, best first.
PyObject* paths(PyObject*, PyObject*) {
  return jaxla_dispatch::path_table(kNumPaths, [](int64_t p) { return kPaths[p].name; });
}

PyObject* bf16_dot(PyObject*, PyObject*) {
  if (bf16_dot_supported()) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

PyObject* amx_bf16(PyObject*, PyObject*) {
  if (amx_bf16_supported()) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

PyMethodDef methods[] = {
    {"bf16_dot", bf16_dot, METH_NOARGS,
     "Whether the avx512 path takes bf16 q, k, v in the forward pass (AVX512-BF16 dot products)."},
    {"amx_bf16", amx_bf16, METH_NOARGS,
     "Whether bf16 calls may take the `amx` attribute here: GEMMs on AMX-BF16 tiles."},
    {"registrations", registrations, METH_NOARGS, "FFI targets: {name: capsule}."},
    {"cpu_supported", cpu_supported, METH_NOARGS,
     "Whether this CPU can run at least one compiled code path (always: the portable one)."},
    {"paths", paths, METH_NOARGS,
     "({name: path attribute} of the compiled code paths, [names this CPU runs, best first])."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_ext", "jaxla's compiled CPU attention kernels.",
                      -1, methods, nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__cpu_ext() {
  PyObject* m = PyModule_Create(&module);
  // Whether the backward kernel takes bf16 q, k, v, dout where the forward one does (bf16_dot).
  if (m != nullptr && PyModule_AddIntConstant(m, "BF16_BACKWARD", 1) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
