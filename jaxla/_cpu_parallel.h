// Work sharing over XLA's CPU thread pool, shared by jaxla's compiled CPU kernels
// (jaxla/attention/_cpu_ext.cc and jaxla/quant/_cpu_qmm.cc).
//
// A handler gets XLA's intra-op pool as an FFI context argument (ffi::ThreadPool). parallel_for
// hands out whole work items from one atomic counter to the calling thread (worker 0) and to up to
// num_workers(pool, n) - 1 helpers scheduled on the pool (workers 1 ..), and returns when every item
// is done. A helper that starts after the caller has drained the items finds none and returns
// without touching the caller's data, so a busy pool (or one that never runs the helpers) cannot
// deadlock a call. Worker ids are dense and below num_workers(pool, n): a kernel may index
// per-worker scratch buffers by them.
#ifndef JAXLA_CPU_PARALLEL_H_
#define JAXLA_CPU_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace jaxla_parallel {

inline int64_t num_workers(xla::ffi::ThreadPool& pool, int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), n));
}

// Runs body(item, worker) for item in [0, n); see the header comment.
template <typename Body>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t n, const Body& body) {
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
  const int64_t helpers = num_workers(pool, n) - 1;
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

}  // namespace jaxla_parallel

#endif  // JAXLA_CPU_PARALLEL_H_
