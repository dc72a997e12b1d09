#include "cpu/parallel.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <pthread.h>
#include <sched.h>
#endif

#include "common/macros.h"

namespace nnmark {
namespace {

int detect_threads() {
  if (const char* env = std::getenv("NNMARK_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n >= 1) return n;
  }
#if defined(__linux__)
  // Respect the affinity mask (containers, taskset): hardware_concurrency() does not.
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n >= 1) return n;
  }
#endif
  const unsigned hc = std::thread::hardware_concurrency();
  return hc ? static_cast<int>(hc) : 1;
}

std::atomic<int> g_threads{0};

}  // namespace

int get_num_threads() {
  int n = g_threads.load();
  if (n == 0) {
    n = detect_threads();
    g_threads.store(n);
  }
  return n;
}

void set_num_threads(int n) {
  NNMARK_CHECK_ARG(n >= 1, "number of threads must be >= 1, got ", n);
  g_threads.store(n);
}

int plan_ranges(int64_t n, int64_t grain) {
  if (n <= 0) return 0;
  grain = std::max<int64_t>(grain, 1);
  const int64_t by_grain = std::max<int64_t>(1, n / grain);
  return static_cast<int>(std::min<int64_t>(get_num_threads(), by_grain));
}

namespace {

// Persistent workers: starting threads per call, or waking ones asleep on a condition
// variable, costs up to a millisecond on an idle VM CPU, more than a whole pass over
// 100 MB. Workers spin briefly after each job (as OpenMP runtimes do) so back-to-back
// calls find them awake, then sleep. One caller at a time uses the pool; a concurrent
// or nested call gets its own short-lived threads instead.
class Pool {
 public:
  // Runs job(w) for w in [0, k): w = 0 on the caller, the rest on workers.
  bool try_run(int k, const std::function<void(int)>& job) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    {
      std::lock_guard<std::mutex> lock(m_);
      while (static_cast<int>(workers_.size()) < k - 1) {
        const int index = static_cast<int>(workers_.size()) + 1;
        const uint64_t before = generation_.load();  // a new worker's first job is the one coming
        workers_.emplace_back([this, index, before] { loop(index, before); });
        workers_.back().detach();  // the pool lives as long as the process
      }
      job_ = &job;
      k_ = k;
      pending_.store(k - 1);
      generation_.fetch_add(1);
    }
    cv_work_.notify_all();
    job(0);
    for (int spin = 0; pending_.load() != 0; ++spin) {
      if (spin < 1 << 16) continue;
      std::unique_lock<std::mutex> lock(m_);
      cv_done_.wait(lock, [this] { return pending_.load() == 0; });
    }
    return true;
  }

 private:
  void loop(int index, uint64_t seen) {
    for (;;) {
      const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(500);
      while (generation_.load() == seen && std::chrono::steady_clock::now() < spin_until) {
      }
      if (generation_.load() == seen) {
        std::unique_lock<std::mutex> lock(m_);
        cv_work_.wait(lock, [&] { return generation_.load() != seen; });
      }
      const std::function<void(int)>* job;
      int k;
      {  // the caller sets job, k and generation together under m_: read them so
        std::lock_guard<std::mutex> lock(m_);
        seen = generation_.load();
        job = job_;
        k = k_;
      }
      if (index < k) {
        (*job)(index);
        if (pending_.fetch_sub(1) == 1) {
          std::lock_guard<std::mutex> lock(m_);
          cv_done_.notify_one();
        }
      }
    }
  }

  std::mutex busy_, m_;
  std::condition_variable cv_work_, cv_done_;
  std::vector<std::thread> workers_;
  const std::function<void(int)>* job_ = nullptr;
  int k_ = 0;
  std::atomic<int> pending_{0};
  std::atomic<uint64_t> generation_{0};
};

std::atomic<Pool*> g_pool{nullptr};

Pool* pool() {
  Pool* p = g_pool.load();
  if (p == nullptr) {
    Pool* fresh = new Pool();  // never freed: detached workers may outlive static destructors
    if (g_pool.compare_exchange_strong(p, fresh)) return fresh;
    delete fresh;
  }
  return p;
}

#if defined(__linux__)
// A forked child has none of the parent's workers: it starts a pool of its own.
[[maybe_unused]] const int g_atfork = pthread_atfork(nullptr, nullptr, [] { g_pool.store(nullptr); });
#endif

}  // namespace

int parallel_ranges(int64_t n, int64_t grain,
                    const std::function<void(int64_t, int64_t, int)>& fn) {
  const int k = plan_ranges(n, grain);
  if (k <= 1) {
    if (n > 0) fn(0, n, 0);
    return k;
  }
  std::exception_ptr error;
  std::mutex error_mutex;
  const std::function<void(int)> run = [&](int w) {
    const int64_t begin = n * w / k, end = n * (w + 1) / k;
    try {
      fn(begin, end, w);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  };
  if (!pool()->try_run(k, run)) {
    std::vector<std::thread> threads;
    threads.reserve(k - 1);
    for (int w = 1; w < k; ++w) threads.emplace_back(run, w);
    run(0);
    for (auto& t : threads) t.join();
  }
  if (error) std::rethrow_exception(error);
  return k;
}

}  // namespace nnmark
