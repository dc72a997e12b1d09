// A C interface to a few CUDA ops built on the simulator, for tests/test_cuda_sim.py: it
// builds variants of the real kernels with planted bugs (no pybind11 needed at test time)
// and loads them with ctypes. Each call returns 0, or 1 with the error text in `err`.
// Built with PLANTED_SELECT or PLANTED_TRIGGER: the ops of the one kernel file it has.
#include <cstring>
#include <exception>

#include "cudasim/sim.h"
#include "ops/magnitude_select.h"
#include "ops/trigger_verify.h"

#define API extern "C" __attribute__((visibility("default")))

namespace {
template <typename F>
int guarded(char* err, int errlen, F f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    std::strncpy(err, e.what(), static_cast<size_t>(errlen) - 1);
    err[errlen - 1] = 0;
    return 1;
  }
}
}  // namespace

API void planted_set_schedule(int order, unsigned long long seed) {
  nnmark_sim::set_schedule(static_cast<nnmark_sim::Order>(order), seed);
}

#ifdef PLANTED_SELECT
API int planted_magnitude_select(const void* const* data, const int64_t* sizes, const int* dtypes, int64_t L,
                                 int64_t k, double* threshold, int64_t* below, int64_t* equal, char* err,
                                 int errlen) {
  return guarded(err, errlen, [&] {
    const nnmark::MagnitudeSelection s = nnmark::magnitude_select_cuda({data, sizes, dtypes, L}, k, 0);
    *threshold = s.threshold;
    *below = s.below;
    *equal = s.equal;
  });
}

API int planted_magnitude_prune(const void* const* data, const int64_t* sizes, const int* dtypes, int64_t L,
                                int64_t k, double threshold, int64_t below, int64_t equal, char* err, int errlen) {
  return guarded(err, errlen,
                 [&] { nnmark::magnitude_prune_cuda({data, sizes, dtypes, L}, k, {threshold, below, equal}, 0); });
}

#endif

#ifdef PLANTED_TRIGGER
API int planted_trigger_verify(const void* logits, int dtype, const int64_t* labels, int64_t K, int64_t B,
                               int64_t C, double null_rate, int64_t* hits, double* margin, double* p_value,
                               char* err, int errlen) {
  return guarded(err, errlen, [&] {
    nnmark::trigger_verify_cuda({logits, dtype, labels, K, B, C, null_rate, hits, margin, p_value}, 0);
  });
}
#endif
