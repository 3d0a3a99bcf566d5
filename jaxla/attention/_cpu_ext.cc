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
// Vector code uses GCC/Clang vector extensions (8 floats), so it builds for any target; on x86-64
// setup.py compiles it for AVX2 + FMA and jaxla only calls it where the CPU has both
// (cpu_supported()).

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

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v8f __attribute__((vector_size(32)));
typedef float v8f_u __attribute__((vector_size(32), aligned(4)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef int32_t v8i_u __attribute__((vector_size(32), aligned(4)));

constexpr float kInf = std::numeric_limits<float>::infinity();

inline v8f load(const float* p) { return *reinterpret_cast<const v8f_u*>(p); }
inline void store(float* p, v8f x) { *reinterpret_cast<v8f_u*>(p) = x; }
inline v8f splat(float x) { return v8f{} + x; }
inline v8f vmax(v8f a, v8f b) { return a > b ? a : b; }

// 2^x for x <= 0 (scores minus their running maximum); exactly 0 below -126 and for -inf, and NaN
// for NaN: the clamp keeps x unless lo > x, which is false for NaN (one max instruction, as before).
// That is what makes a NaN or +inf score (+inf - +inf) turn its row's sum, output and logsumexp
// into NaN, as in the plain-JAX definition, instead of a plausible number.
inline v8f exp2v(v8f x) {
  const v8f lo = splat(-126.0f);
  v8f xc = vmax(lo, x);
  const v8f magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to the nearest integer
  v8f r = (xc + magic) - magic;
  v8f f = (xc - r) * splat(0.69314718056f);  // f in [-ln2/2, ln2/2]
  // e^f by its Taylor series to degree 7 (error < 3e-8 relative on this interval).
  v8f p = splat(1.0f / 5040.0f);
  p = p * f + splat(1.0f / 720.0f);
  p = p * f + splat(1.0f / 120.0f);
  p = p * f + splat(1.0f / 24.0f);
  p = p * f + splat(1.0f / 6.0f);
  p = p * f + splat(0.5f);
  p = p * f + splat(1.0f);
  p = p * f + splat(1.0f);
  v8i n = __builtin_convertvector(r, v8i);
  v8i bits = (n + 127) << 23;
  v8f scale = (v8f)bits;  // same-size vector cast: the bits reinterpreted
  v8f y = p * scale;
  return x < lo ? v8f{} : y;
}

inline float hmax(v8f x) {
  float m = x[0];
  for (int i = 1; i < 8; ++i) m = std::max(m, x[i]);
  return m;
}

inline float hsum(v8f x) {
  float s = 0.0f;
  for (int i = 0; i < 8; ++i) s += x[i];
  return s;
}

// C[MR x 8*NV] (+)= A[MR x kd] * B[kd x 8*NV]; A(r, p) = a[r * lda + p * aks] (aks = 1 for a
// row-major A, lda = 1 and aks = its row stride for a transposed one), B rows at stride ldb.
template <int MR, int NV>
inline void micro(int64_t kd, const float* a, int64_t lda, int64_t aks, const float* b, int64_t ldb,
                  float* c, int64_t ldc, bool accumulate) {
  v8f acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? load(c + r * ldc + 8 * v) : v8f{};
  for (int64_t p = 0; p < kd; ++p) {
    v8f bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = load(b + p * ldb + 8 * v);
    for (int r = 0; r < MR; ++r) {
      float av = a[r * lda + p * aks];
      for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) store(c + r * ldc + 8 * v, acc[r][v]);
}

template <int NV>
inline void micro_rows(int mr, int64_t kd, const float* a, int64_t lda, int64_t aks, const float* b,
                       int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  switch (mr) {
    case 6: micro<6, NV>(kd, a, lda, aks, b, ldb, c, ldc, accumulate); break;
    case 5: micro<5, NV>(kd, a, lda, aks, b, ldb, c, ldc, accumulate); break;
    case 4: micro<4, NV>(kd, a, lda, aks, b, ldb, c, ldc, accumulate); break;
    case 3: micro<3, NV>(kd, a, lda, aks, b, ldb, c, ldc, accumulate); break;
    case 2: micro<2, NV>(kd, a, lda, aks, b, ldb, c, ldc, accumulate); break;
    default: micro<1, NV>(kd, a, lda, aks, b, ldb, c, ldc, accumulate); break;
  }
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Packed B operands. Streaming B with a large row stride maps its rows onto a few cache sets, so B is
// laid out the way the microkernel reads it:
//  * key panels (for Q·Kᵀ and dO·Vᵀ): per group of 16 keys an (h × 16) block, keys past S zero;
//  * column panels (for P·V, dS·K and the per-tile Q, dO rows): the columns cut into panels of 16
//    (the last may be 8 wide); panel jp of a matrix with `prow` rows starts at jp * 16 * prow and its
//    rows are `width` floats apart.

// C[m x n] = A[m x kd] * B with B in key panels starting at the panel of C's first column; n a
// multiple of 16, kd the head dim.
void gemm_kp(int64_t m, int64_t n, int64_t kd, const float* a, int64_t lda, const float* bp, float* c,
             int64_t ldc) {
  for (int64_t jp = 0; jp * 16 < n; ++jp)
    for (int64_t i = 0; i < m; i += 6)
      micro_rows<2>(static_cast<int>(std::min<int64_t>(6, m - i)), kd, a + i * lda, lda, 1,
                    bp + jp * kd * 16, 16, c + i * ldc + jp * 16, ldc, false);
}

// C[m x n] (+)= A[m x kd] * B[row0 : row0 + kd, :] with B in column panels of `prow` rows;
// A(r, p) = a[r * lda + p * aks]; n a multiple of 8.
void gemm_cp(int64_t m, int64_t n, int64_t kd, const float* a, int64_t lda, int64_t aks,
             const float* base, int64_t prow, int64_t row0, float* c, int64_t ldc, bool accumulate) {
  for (int64_t jp = 0; jp * 16 < n; ++jp) {
    const int64_t width = std::min<int64_t>(16, n - jp * 16);
    const float* bp = base + jp * 16 * prow + row0 * width;
    for (int64_t i = 0; i < m; i += 6) {
      const int mr = static_cast<int>(std::min<int64_t>(6, m - i));
      if (width == 16)
        micro_rows<2>(mr, kd, a + i * lda, lda, aks, bp, 16, c + i * ldc + jp * 16, ldc, accumulate);
      else
        micro_rows<1>(mr, kd, a + i * lda, lda, aks, bp, 8, c + i * ldc + jp * 16, ldc, accumulate);
    }
  }
}

// Writes row `r` (h floats) of a column-panel matrix with `prow` rows.
inline void put_row_cp(float* base, int64_t prow, int64_t r, const float* src, int64_t h) {
  for (int64_t jp = 0; jp * 16 < h; ++jp) {
    const int64_t width = std::min<int64_t>(16, h - jp * 16);
    std::memcpy(base + jp * 16 * prow + r * width, src + jp * 16, width * sizeof(float));
  }
}

int64_t num_workers(ffi::ThreadPool& pool, int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), n));
}

// Runs body(item, worker) for item in [0, n) on the caller (worker 0) and the XLA thread pool
// (workers 1 .. num_workers(pool, n) - 1), returning when all are done. Helpers that start late find
// no work and never touch the caller's data, so a busy pool cannot deadlock the call.
template <typename Body>
void parallel_for(ffi::ThreadPool& pool, int64_t n, const Body& body) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> ids{1};
    std::mutex mu;
    std::condition_variable cv;
    int active = 0;
    bool closed = false;
    const Body* body;
    int64_t n;
  };
  auto state = std::make_shared<State>();
  state->body = &body;
  state->n = n;
  auto drain = [](State& s, int64_t worker) {
    for (int64_t i = s.next.fetch_add(1); i < s.n; i = s.next.fetch_add(1)) (*s.body)(i, worker);
  };
  int64_t helpers = num_workers(pool, n) - 1;
  for (int64_t h = 0; h < helpers; ++h) {
    pool.Schedule([state, drain]() {
      {
        std::lock_guard<std::mutex> lock(state->mu);
        if (state->closed) return;
        ++state->active;
      }
      drain(*state, state->ids.fetch_add(1));
      std::lock_guard<std::mutex> lock(state->mu);
      if (--state->active == 0) state->cv.notify_all();
    });
  }
  drain(*state, 0);
  std::unique_lock<std::mutex> lock(state->mu);
  state->closed = true;
  state->cv.wait(lock, [&] { return state->active == 0; });
}

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

// Per-thread scratch for one forward work item.
struct FwdScratch {
  std::vector<float> q, kt, vp, sc, o, m, l;
  std::vector<int64_t> lo, hi;
};

// Keys [j0, j0 + cols) of one (batch row, kv head) of x (Bt, S, K, h) in key panels, zero-padded
// to cpad keys (a multiple of 16).
void pack_key_panels(const Problem& pr, const float* x, int64_t h, int64_t b, int64_t kvh, int64_t j0,
                     int64_t cols, int64_t cpad, float* out) {
  for (int64_t j = 0; j < cpad; ++j) {
    float* dst = out + (j / 16) * h * 16 + j % 16;
    if (j < cols) {
      const float* src = x + ((b * pr.s + j0 + j) * pr.kh + kvh) * h;
      for (int64_t d = 0; d < h; ++d) dst[d * 16] = src[d];
    } else {
      for (int64_t d = 0; d < h; ++d) dst[d * 16] = 0.0f;
    }
  }
}

// Keys [j0, j0 + cols) of one (batch row, kv head) of x (Bt, S, K, h) in column panels of prow rows.
void pack_col_panels(const Problem& pr, const float* x, int64_t h, int64_t b, int64_t kvh, int64_t j0,
                     int64_t cols, int64_t prow, float* out) {
  for (int64_t j = 0; j < cols; ++j)
    put_row_cp(out, prow, j, x + ((b * pr.s + j0 + j) * pr.kh + kvh) * h, h);
}

// K and V of a whole call packed once (kt in key panels, v in column panels, sp = S rounded up to 16
// rows per (batch row, kv head)), or nullptr to pack each tile on the fly.
struct Prepacked {
  const float *kt, *v;
  int64_t sp;
};

void forward_item(const Problem& pr, const float* q, const float* k, const float* v,
                  const Prepacked& pre, float* out, float* lse2, int64_t item, FwdScratch& w) {
  const int64_t nqb = (pr.t + pr.block_q - 1) / pr.block_q;
  // Later query blocks first: under a causal band they are the expensive ones.
  const int64_t qb = nqb - 1 - item % nqb;
  const int64_t bh = item / nqb;
  const int64_t kvh = bh % pr.kh, b = bh / pr.kh;
  const int64_t t0 = qb * pr.block_q, tq = std::min(pr.block_q, pr.t - t0);
  const int64_t g = pr.g, h = pr.h, hv = pr.hv, rows = tq * g;
  const int64_t ld = round_up(pr.block_k, 16);

  w.q.resize(rows * h);
  if (pre.kt == nullptr) {
    w.kt.resize(ld * h);
    w.vp.resize(pr.block_k * hv);
  }
  w.sc.resize(rows * ld);
  w.o.assign(rows * hv, 0.0f);
  w.m.assign(rows, -kInf);
  w.l.assign(rows, 0.0f);
  w.lo.resize(tq);
  w.hi.resize(tq);

  int64_t kmin = pr.s, kmax = 0;
  for (int64_t i = 0; i < tq; ++i) {
    pr.range(b, t0 + i, &w.lo[i], &w.hi[i]);
    if (w.lo[i] < w.hi[i]) {
      kmin = std::min(kmin, w.lo[i]);
      kmax = std::max(kmax, w.hi[i]);
    }
  }
  for (int64_t i = 0; i < tq; ++i)
    for (int64_t gg = 0; gg < g; ++gg) {
      const float* src = q + ((b * pr.t + t0 + i) * pr.n + kvh * g + gg) * h;
      float* dst = w.q.data() + (i * g + gg) * h;
      for (int64_t d = 0; d < h; ++d) dst[d] = src[d] * pr.scale;
    }
  const int32_t* qs = pr.has_seg ? pr.q_seg + b * pr.t + t0 : nullptr;
  const int32_t* ks = pr.has_seg ? pr.kv_seg + b * pr.s : nullptr;

  for (int64_t kb = kmin - kmin % 16; kb < kmax; kb += pr.block_k) {
    const int64_t cols = std::min(pr.block_k, kmax - kb);
    const int64_t cpad = round_up(cols, 16);
    const float *kt, *vp;
    int64_t vrows, vrow0;
    if (pre.kt != nullptr) {
      kt = pre.kt + bh * pre.sp * h + kb * h;
      vp = pre.v + bh * pre.sp * hv;
      vrows = pre.sp;
      vrow0 = kb;
    } else {  // this tile only, into thread-local buffers that persist across calls
      pack_key_panels(pr, k, h, b, kvh, kb, cols, cpad, w.kt.data());
      pack_col_panels(pr, v, hv, b, kvh, kb, cols, pr.block_k, w.vp.data());
      kt = w.kt.data();
      vp = w.vp.data();
      vrows = pr.block_k;
      vrow0 = 0;
    }
    gemm_kp(rows, cpad, h, w.q.data(), h, kt, w.sc.data(), ld);
    for (int64_t i = 0; i < tq; ++i) {
      const int64_t lo = std::max<int64_t>(w.lo[i] - kb, 0);
      const int64_t hi = std::min<int64_t>(w.hi[i] - kb, cols);
      for (int64_t gg = 0; gg < g; ++gg) {
        const int64_t r = i * g + gg;
        float* row = w.sc.data() + r * ld;
        if (lo >= hi) {
          std::fill(row, row + cpad, 0.0f);
          continue;
        }
        std::fill(row, row + lo, -kInf);
        std::fill(row + hi, row + cpad, -kInf);
        if (qs != nullptr) {
          const v8i qid = v8i{} + qs[i];
          for (int64_t j = 0; j < cpad; j += 8) {
            v8i kid;
            for (int e = 0; e < 8; ++e) kid[e] = kb + j + e < pr.s ? ks[kb + j + e] : ~qs[i];
            v8f x = load(row + j);
            store(row + j, kid == qid ? x : splat(-kInf));
          }
        }
        v8f mx = splat(-kInf);
        for (int64_t j = 0; j < cpad; j += 8) mx = vmax(mx, load(row + j));
        const float m_old = w.m[r];
        float m_new = std::max(m_old, hmax(mx));
        if (m_new == -kInf) {
          // Nothing visible so far, unless the max skipped NaN scores (it may): then the row is
          // NaN from here on. Only rows without a finite score pay for this scan.
          bool nan = false;
          for (int64_t j = 0; j < cpad; ++j) nan = nan || row[j] != row[j];
          if (!nan) {
            std::fill(row, row + cpad, 0.0f);
            continue;
          }
          m_new = std::numeric_limits<float>::quiet_NaN();
        }
        const v8f mv = splat(m_new);
        v8f sum = v8f{};
        for (int64_t j = 0; j < cpad; j += 8) {
          v8f p = exp2v(load(row + j) - mv);
          store(row + j, p);
          sum += p;
        }
        const float alpha = std::exp2(m_old - m_new);
        w.l[r] = w.l[r] * alpha + hsum(sum);
        w.m[r] = m_new;
        if (alpha != 1.0f) {
          float* o = w.o.data() + r * hv;
          for (int64_t d = 0; d < hv; ++d) o[d] *= alpha;
        }
      }
    }
    gemm_cp(rows, hv, cols, w.sc.data(), ld, 1, vp, vrows, vrow0, w.o.data(), hv, true);
  }
  for (int64_t i = 0; i < tq; ++i)
    for (int64_t gg = 0; gg < g; ++gg) {
      const int64_t r = i * g + gg, n = kvh * g + gg;
      float* dst = out + ((b * pr.t + t0 + i) * pr.n + n) * hv;
      // l == 0 exactly when the row saw no key; a NaN l (non-finite input) gives NaN out and lse.
      const float l = w.l[r];
      const bool empty = l == 0.0f;
      const float inv = empty ? 0.0f : 1.0f / l;
      const float* o = w.o.data() + r * hv;
      for (int64_t d = 0; d < hv; ++d) dst[d] = o[d] * inv;
      lse2[(b * pr.t + t0 + i) * pr.n + n] = empty ? kInf : w.m[r] + std::log2(l);
    }
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
  pr.block_k = round_up(std::max<int64_t>(16, block_k), 16);
  return ffi::Error::Success();
}

ffi::Error ForwardBody(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                       ffi::AnyBuffer q_len, ffi::AnyBuffer kv_len, ffi::AnyBuffer q_seg,
                       ffi::AnyBuffer kv_seg, ffi::Result<ffi::AnyBuffer> out,
                       ffi::Result<ffi::AnyBuffer> lse2, float scale, int64_t left, int64_t right,
                       bool has_seg, int64_t block_q, int64_t block_k) {
  Problem pr{};
  if (auto err = setup_problem(pr, q, k, v, q_len, kv_len, q_seg, kv_seg, scale, left, right, has_seg,
                               block_q, block_k);
      !err.success())
    return err;
  const float* qp = reinterpret_cast<const float*>(q.untyped_data());
  const float* kp = reinterpret_cast<const float*>(k.untyped_data());
  const float* vp = reinterpret_cast<const float*>(v.untyped_data());
  float* op = reinterpret_cast<float*>(out->untyped_data());
  float* lp = reinterpret_cast<float*>(lse2->untyped_data());
  const int64_t nqb = (pr.t + pr.block_q - 1) / pr.block_q;
  const int64_t items = pr.bt * pr.kh * nqb;
  if (items == 0) return ffi::Error::Success();
  // With several query blocks per (batch row, kv head), every key tile is used several times: pack
  // K and V once for the call. With one (decoding, short queries) pack each tile as it is used,
  // which avoids allocating (and page-faulting) a copy of K and V for a call that reads them once.
  Prepacked pre{nullptr, nullptr, round_up(pr.s, 16)};
  std::unique_ptr<float[]> kt, vpan;
  if (nqb > 1) {
    kt.reset(new float[pr.bt * pr.kh * pre.sp * pr.h]);
    vpan.reset(new float[pr.bt * pr.kh * pre.sp * pr.hv]);
    parallel_for(pool, pr.bt * pr.kh, [&](int64_t bh, int64_t) {
      const int64_t b = bh / pr.kh, kvh = bh % pr.kh;
      pack_key_panels(pr, kp, pr.h, b, kvh, 0, pr.s, pre.sp, kt.get() + bh * pre.sp * pr.h);
      pack_col_panels(pr, vp, pr.hv, b, kvh, 0, pr.s, pre.sp, vpan.get() + bh * pre.sp * pr.hv);
    });
    pre.kt = kt.get();
    pre.v = vpan.get();
  }
  parallel_for(pool, items, [&](int64_t item, int64_t) {
    thread_local FwdScratch scratch;
    forward_item(pr, qp, kp, vp, pre, op, lp, item, scratch);
  });
  return ffi::Error::Success();
}


// Per-thread scratch for one backward work item.
struct BwdScratch {
  std::vector<float> q, qp, dout, doutp, kt, vt, kpan, sc, dp, dq, dk, dv, lse, delta;
  std::vector<int64_t> lo, hi;
};

struct BwdArgs {
  const float *q, *k, *v, *dout, *lse2, *delta;
  float scale;  // natural-units logit scale
  float *dk, *dv;
};

// One (batch row, kv head, key block): dK and dV of the block, and its part of dQ.
// dq is this worker's own (Bt, T, N, H) accumulator.
void backward_item(const Problem& pr, const BwdArgs& a, float* dq, int64_t item, BwdScratch& w) {
  const int64_t nkb = (pr.s + pr.block_k - 1) / pr.block_k;
  const int64_t kbi = item % nkb, bh = item / nkb;
  const int64_t kvh = bh % pr.kh, b = bh / pr.kh;
  const int64_t kb = kbi * pr.block_k, cols = std::min(pr.block_k, pr.s - kb);
  const int64_t cpad = round_up(cols, 16);
  const int64_t g = pr.g, h = pr.h, hv = pr.hv;
  const int64_t ld = cpad;
  const int64_t rows_max = pr.block_q * g;
  w.q.resize(rows_max * h);
  w.qp.resize(rows_max * h);
  w.dq.resize(rows_max * h);
  w.dout.resize(rows_max * hv);
  w.doutp.resize(rows_max * hv);
  w.sc.resize(rows_max * ld);
  w.dp.resize(rows_max * ld);
  w.lse.resize(rows_max);
  w.delta.resize(rows_max);
  w.dk.assign(cols * h, 0.0f);
  w.dv.assign(cols * hv, 0.0f);
  w.lo.resize(pr.block_q);
  w.hi.resize(pr.block_q);
  // The block's keys and values, packed once for the whole item.
  w.kt.resize(cpad * h);
  w.vt.resize(cpad * hv);
  w.kpan.resize(cols * h);
  pack_key_panels(pr, a.k, h, b, kvh, kb, cols, cpad, w.kt.data());
  pack_key_panels(pr, a.v, hv, b, kvh, kb, cols, cpad, w.vt.data());
  pack_col_panels(pr, a.k, h, b, kvh, kb, cols, cols, w.kpan.data());
  const float c2 = pr.scale;  // scale * log2(e): logits in base-2 units
  const int32_t* ks = pr.has_seg ? pr.kv_seg + b * pr.s + kb : nullptr;

  for (int64_t t0 = 0; t0 < pr.t; t0 += pr.block_q) {
    const int64_t tq = std::min(pr.block_q, pr.t - t0), rows = tq * g;
    bool any = false;
    for (int64_t i = 0; i < tq; ++i) {
      int64_t lo, hi;
      pr.range(b, t0 + i, &lo, &hi);
      w.lo[i] = std::max<int64_t>(lo - kb, 0);
      w.hi[i] = std::min<int64_t>(hi - kb, cols);
      any = any || w.lo[i] < w.hi[i];
    }
    if (!any) continue;
    for (int64_t i = 0; i < tq; ++i)
      for (int64_t gg = 0; gg < g; ++gg) {
        const int64_t r = i * g + gg, idx = (b * pr.t + t0 + i) * pr.n + kvh * g + gg;
        std::memcpy(w.q.data() + r * h, a.q + idx * h, h * sizeof(float));
        std::memcpy(w.dout.data() + r * hv, a.dout + idx * hv, hv * sizeof(float));
        put_row_cp(w.qp.data(), rows_max, r, a.q + idx * h, h);
        put_row_cp(w.doutp.data(), rows_max, r, a.dout + idx * hv, hv);
        w.lse[r] = a.lse2[idx];
        w.delta[r] = a.delta[idx];
      }
    gemm_kp(rows, cpad, h, w.q.data(), h, w.kt.data(), w.sc.data(), ld);       // logits
    gemm_kp(rows, cpad, hv, w.dout.data(), hv, w.vt.data(), w.dp.data(), ld);  // dO·Vᵀ
    const v8f c2v = splat(c2), sv = splat(a.scale);
    for (int64_t i = 0; i < tq; ++i) {
      const int64_t lo = w.lo[i], hi = w.hi[i];
      for (int64_t gg = 0; gg < g; ++gg) {
        const int64_t r = i * g + gg;
        float* p = w.sc.data() + r * ld;
        float* ds = w.dp.data() + r * ld;
        if (lo >= hi || w.lse[r] == kInf) {  // sees nothing here (a NaN lse gives NaN gradients)
          std::fill(p, p + cpad, 0.0f);
          std::fill(ds, ds + cpad, 0.0f);
          continue;
        }
        const v8f lv = splat(w.lse[r]), dv = splat(w.delta[r]);
        for (int64_t j = 0; j < cpad; j += 8) {
          v8f pj = exp2v(load(p + j) * c2v - lv);
          store(p + j, pj);
          store(ds + j, pj * (load(ds + j) - dv) * sv);
        }
        std::fill(p, p + lo, 0.0f);
        std::fill(ds, ds + lo, 0.0f);
        std::fill(p + hi, p + cpad, 0.0f);
        std::fill(ds + hi, ds + cpad, 0.0f);
        if (ks != nullptr) {
          const int32_t qid = pr.q_seg[b * pr.t + t0 + i];
          for (int64_t j = lo; j < hi; ++j)
            if (ks[j] != qid) p[j] = ds[j] = 0.0f;
        }
      }
    }
    gemm_cp(cols, hv, rows, w.sc.data(), 1, ld, w.doutp.data(), rows_max, 0, w.dv.data(), hv,
            true);  // dV += Pᵀ·dO
    gemm_cp(cols, h, rows, w.dp.data(), 1, ld, w.qp.data(), rows_max, 0, w.dk.data(), h,
            true);  // dK += dSᵀ·Q
    gemm_cp(rows, h, cols, w.dp.data(), ld, 1, w.kpan.data(), cols, 0, w.dq.data(), h,
            false);  // dS·K
    for (int64_t i = 0; i < tq; ++i)
      for (int64_t gg = 0; gg < g; ++gg) {
        float* dst = dq + ((b * pr.t + t0 + i) * pr.n + kvh * g + gg) * h;
        const float* src = w.dq.data() + (i * g + gg) * h;
        for (int64_t d = 0; d < h; ++d) dst[d] += src[d];
      }
  }
  for (int64_t j = 0; j < cols; ++j) {
    std::memcpy(a.dk + ((b * pr.s + kb + j) * pr.kh + kvh) * h, w.dk.data() + j * h, h * sizeof(float));
    std::memcpy(a.dv + ((b * pr.s + kb + j) * pr.kh + kvh) * hv, w.dv.data() + j * hv,
                hv * sizeof(float));
  }
}

ffi::Error BackwardBody(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                        ffi::AnyBuffer dout, ffi::AnyBuffer lse2, ffi::AnyBuffer delta,
                        ffi::AnyBuffer q_len, ffi::AnyBuffer kv_len, ffi::AnyBuffer q_seg,
                        ffi::AnyBuffer kv_seg, ffi::Result<ffi::AnyBuffer> dq,
                        ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv, float scale,
                        int64_t left, int64_t right, bool has_seg, int64_t block_q, int64_t block_k) {
  Problem pr{};
  if (auto err = setup_problem(pr, q, k, v, q_len, kv_len, q_seg, kv_seg, scale, left, right, has_seg,
                               block_q, block_k);
      !err.success())
    return err;
  if (pr.h % 8 != 0)
    return ffi::Error::InvalidArgument("jaxla attention kernel: H must be a multiple of 8");
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
  const int64_t nkb = (pr.s + pr.block_k - 1) / pr.block_k;
  const int64_t items = pr.bt * pr.kh * nkb;
  const int64_t workers = num_workers(pool, items);
  // Worker 0 accumulates into dq itself; the others into their own buffers, summed at the end.
  std::unique_ptr<float[]> extra(workers > 1 ? new float[(workers - 1) * dq_size] : nullptr);
  std::vector<float*> bufs(workers);
  bufs[0] = dqp;
  for (int64_t i = 1; i < workers; ++i) bufs[i] = extra.get() + (i - 1) * dq_size;
  const int64_t chunk = 1 << 16, nchunks = (dq_size + chunk - 1) / chunk;
  parallel_for(pool, nchunks * workers, [&](int64_t c, int64_t) {
    float* base = bufs[c / nchunks];
    const int64_t lo = (c % nchunks) * chunk;
    std::fill(base + lo, base + std::min(dq_size, lo + chunk), 0.0f);
  });
  parallel_for(pool, items, [&](int64_t item, int64_t worker) {
    thread_local BwdScratch scratch;
    backward_item(pr, a, bufs[worker], item, scratch);
  });
  if (workers > 1) {
    parallel_for(pool, nchunks, [&](int64_t c, int64_t) {
      const int64_t lo = c * chunk, hi = std::min(dq_size, lo + chunk);
      for (int64_t i = 1; i < workers; ++i) {
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
                       bool has_seg, int64_t block_q, int64_t block_k) {
  try {
    return ForwardBody(pool, q, k, v, q_len, kv_len, q_seg, kv_seg, out, lse2, scale, left, right,
                       has_seg, block_q, block_k);
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("jaxla attention forward kernel: ") + e.what());
  }
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                        ffi::AnyBuffer dout, ffi::AnyBuffer lse2, ffi::AnyBuffer delta,
                        ffi::AnyBuffer q_len, ffi::AnyBuffer kv_len, ffi::AnyBuffer q_seg,
                        ffi::AnyBuffer kv_seg, ffi::Result<ffi::AnyBuffer> dq,
                        ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv, float scale,
                        int64_t left, int64_t right, bool has_seg, int64_t block_q, int64_t block_k) {
  try {
    return BackwardBody(pool, q, k, v, dout, lse2, delta, q_len, kv_len, q_seg, kv_seg, dq, dk, dv,
                        scale, left, right, has_seg, block_q, block_k);
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("jaxla attention backward kernel: ") + e.what());
  }
}

}  // namespace

// The attributes both kernels take, after their buffers.
template <typename Binding>
auto with_attrs(Binding binding) {
  return std::move(binding)
      .template Attr<float>("scale")
      .template Attr<int64_t>("left")
      .template Attr<int64_t>("right")
      .template Attr<bool>("has_seg")
      .template Attr<int64_t>("block_q")
      .template Attr<int64_t>("block_k");
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
#if defined(__x86_64__) || defined(__i386__)
#if defined(__AVX2__)
  __builtin_cpu_init();
  if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) Py_RETURN_FALSE;
#endif
#endif
  Py_RETURN_TRUE;
}

PyMethodDef methods[] = {
    {"registrations", registrations, METH_NOARGS, "FFI targets: {name: capsule}."},
    {"cpu_supported", cpu_supported, METH_NOARGS,
     "Whether this CPU has the instruction set the module was compiled for."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_ext", "jaxla's compiled CPU attention kernels.",
                      -1, methods, nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__cpu_ext() { return PyModule_Create(&module); }
