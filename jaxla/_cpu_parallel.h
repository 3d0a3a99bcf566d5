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
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <thread>

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

// ---- A spinning team for small products (microseconds each, e.g. a decode step's M = 1 rows).
// Handing such a product to XLA's pool costs more than the product (a Schedule and a wake-up per
// helper per call), so they used to run on the calling thread alone. team_for instead shares the
// items with helper threads of this library's own that, after each call, spin for kSpinNs waiting
// for the next one (a decode step issues hundreds of products a few microseconds apart), then sleep
// on a condition variable until a call wakes them. The team is one per process (made on first use
// with helpers() threads, never destroyed, so no exit-time destructor races a helper). One call
// uses it at a time: a call that finds it taken (XLA running two products at once) runs alone,
// as does one in a child process after fork (whose team has no threads: the caller drains every
// item itself, and the protocol below never waits for a helper that has not joined the call).
//
// Protocol: the caller publishes the call (body, n, next = 0), sets open and bumps gen; it drains
// items, clears open and waits until busy is 0. A helper that sees gen move increments busy and
// only then reads open: with sequentially consistent operations, a helper that joins after the
// caller saw busy == 0 reads open == false (or the next call's true) and touches nothing of a
// finished call.
class SpinTeam {
 public:
  static constexpr int64_t kSpinNs = 100 * 1000;

  static SpinTeam& get() {
    static SpinTeam* team = new SpinTeam(helpers());
    return *team;
  }

  // Threads beside the caller: the machine's cores less one, at most 7 (the products are small);
  // the environment variable JAXLA_CPU_TEAM_THREADS (read once, at the first small product) sets
  // the number instead, 0 to run small products on the calling thread alone (e.g. many processes
  // sharing a machine, where spinning helpers would take others' cores).
  static int helpers() {
    // Digits only (anything else keeps the default; jaxla.quant._fused warns about it at import).
    if (const char* env = std::getenv("JAXLA_CPU_TEAM_THREADS"); env != nullptr && *env != 0) {
      long v = 0;
      const char* c = env;
      for (; *c >= '0' && *c <= '9'; ++c) v = std::min<long>(v * 10 + (*c - '0'), 64);
      if (*c == 0) return static_cast<int>(v);
    }
    const unsigned hw = std::thread::hardware_concurrency();
    return hw <= 1 ? 0 : static_cast<int>(std::min<unsigned>(hw - 1, 7));
  }

  int size() const { return static_cast<int>(threads_); }

  // Runs body(item) for item in [0, n) on the caller and any helpers that join; true when the team
  // was free (false: it was taken, nothing ran, the caller should run the items itself).
  template <typename Body>
  bool run(int64_t n, const Body& body) {
    bool expect = false;
    if (!owned_.compare_exchange_strong(expect, true)) return false;
    body_ = &body;
    call_ = [](const void* b, int64_t i) { (*static_cast<const Body*>(b))(i); };
    n_.store(n);
    next_.store(0);
    open_.store(true);
    gen_.fetch_add(1);
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lock(mu_);
      cv_.notify_all();
    }
    for (int64_t i = next_.fetch_add(1); i < n; i = next_.fetch_add(1)) body(i);
    open_.store(false);
    // A helper holds busy for at most one piece, unless it was preempted: then let it run.
    for (int spins = 1; busy_.load() != 0; ++spins) spins % 64 == 0 ? std::this_thread::yield() : pause();
    owned_.store(false);
    return true;
  }

 private:
  explicit SpinTeam(int threads) : threads_(threads) {
    for (int t = 0; t < threads; ++t) std::thread([this] { loop(); }).detach();
  }

  static void pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }

  void loop() {
    uint64_t seen = gen_.load();
    for (;;) {
      const auto t0 = std::chrono::steady_clock::now();
      int spins = 0;
      while (gen_.load() == seen) {
        pause();
        if (++spins % 64 != 0) continue;
        // Every 64 pauses: give the core to any other runnable thread (XLA's, another process's),
        // and sleep once the window has passed.
        std::this_thread::yield();
        if (std::chrono::steady_clock::now() - t0 < std::chrono::nanoseconds(kSpinNs)) continue;
        std::unique_lock<std::mutex> lock(mu_);
        sleepers_.fetch_add(1);
        cv_.wait(lock, [&] { return gen_.load() != seen; });
        sleepers_.fetch_sub(1);
      }
      seen = gen_.load();
      busy_.fetch_add(1);
      if (open_.load()) {
        const int64_t n = n_.load();
        for (int64_t i = next_.fetch_add(1); i < n; i = next_.fetch_add(1)) call_(body_, i);
      }
      busy_.fetch_sub(1);
    }
  }

  const int64_t threads_;
  std::atomic<bool> owned_{false}, open_{false};
  std::atomic<uint64_t> gen_{0};
  std::atomic<int64_t> n_{0}, next_{0};
  std::atomic<int> busy_{0}, sleepers_{0};
  const void* body_ = nullptr;
  void (*call_)(const void*, int64_t) = nullptr;
  std::mutex mu_;
  std::condition_variable cv_;
};

// Runs body(item) for item in [0, n) on the calling thread and the spinning team (SpinTeam), or on
// the calling thread alone when the team is busy or has no threads.
template <typename Body>
void team_for(int64_t n, const Body& body) {
  SpinTeam& team = SpinTeam::get();
  if (n > 1 && team.size() > 0 && team.run(n, body)) return;
  for (int64_t i = 0; i < n; ++i) body(i);
}

}  // namespace jaxla_parallel

#endif  // JAXLA_CPU_PARALLEL_H_
