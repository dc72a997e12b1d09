#include "cpu/parallel.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__linux__)
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

int parallel_ranges(int64_t n, int64_t grain,
                    const std::function<void(int64_t, int64_t, int)>& fn) {
  const int k = plan_ranges(n, grain);
  if (k <= 1) {
    if (n > 0) fn(0, n, 0);
    return k;
  }
  std::exception_ptr error;
  std::mutex error_mutex;
  auto run = [&](int w) {
    const int64_t begin = n * w / k, end = n * (w + 1) / k;
    try {
      fn(begin, end, w);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(k - 1);
  for (int w = 1; w < k; ++w) threads.emplace_back(run, w);
  run(0);
  for (auto& t : threads) t.join();
  if (error) std::rethrow_exception(error);
  return k;
}

}  // namespace nnmark
