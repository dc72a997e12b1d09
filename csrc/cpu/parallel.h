// A minimal fork-join parallel_for on std::thread (no OpenMP: torch ships its
// own libgomp and two OpenMP runtimes in one process fight over threads).
#pragma once
#include <cstdint>
#include <functional>

namespace nnmark {

int get_num_threads();        // NNMARK_NUM_THREADS, else the CPUs this process may use
void set_num_threads(int n);  // n >= 1

// Calls fn(begin, end, worker) on up to get_num_threads() disjoint ranges covering
// [0, n), each at least `grain` long (so small problems stay on the calling thread).
// `worker` is 0..(ranges-1). The first exception thrown by any range is rethrown.
int parallel_ranges(int64_t n, int64_t grain,
                    const std::function<void(int64_t, int64_t, int)>& fn);

// How many ranges parallel_ranges would use for (n, grain).
int plan_ranges(int64_t n, int64_t grain);

}  // namespace nnmark
