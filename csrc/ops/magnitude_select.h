// Exact k-th smallest magnitude across a list of tensors, without concatenating
// them (global magnitude pruning), and in-place pruning of exactly k weights.
//
// select:  t = the k-th smallest |w| over all L tensors (k is 1-based), with
//          below = #{|w| < t} and equal = #{|w| == t}; below < k <= below + equal.
//          A radix select on the magnitude's bit pattern: a histogram pass per
//          digit, each narrowing the bucket that holds rank k. NaN ranks above +inf.
// prune:   zeroes every |w| < t and the first (k - below) weights with |w| == t,
//          in tensor order then element order, so exactly k weights become zero.
#pragma once
#include <cstdint>
#include <vector>

namespace nnmark {

struct MagnitudeList {
  const void* const* data;  // [L] tensor data pointers (contiguous), dtype dtypes[l]
  const int64_t* sizes;     // [L] element counts
  const int* dtypes;        // [L] DType codes
  int64_t L;
};

struct MagnitudeSelection {
  double threshold;  // the k-th smallest |w|
  int64_t below;     // count with |w| < threshold
  int64_t equal;     // count with |w| == threshold
};

MagnitudeSelection magnitude_select_cpu(const MagnitudeList& list, int64_t k);
// Zeroes exactly k weights (see above); `sel` is what magnitude_select_cpu returned for k.
void magnitude_prune_cpu(const MagnitudeList& list, int64_t k, const MagnitudeSelection& sel);

// CUDA twins (cuda/magnitude_select_cuda.cu): device pointers, all on the current
// device, launched on `stream` (a cudaStream_t as an integer); the same results as the
// CPU ops. select waits for the stream (it returns host values); prune does not.
MagnitudeSelection magnitude_select_cuda(const MagnitudeList& list, int64_t k, uintptr_t stream);

// The select without a host sync, for CUDA graphs. plan (host only): the chunk table the
// kernels walk (bytes to copy to the device once, 16-byte aligned) and the scratch the
// select needs. device: launches the passes on `stream` and writes threshold [1] and
// counts [2] = (below, equal) to device memory; nothing waits, nothing is allocated.
struct MagnitudeSelectPlan {
  std::vector<unsigned char> table;
  int64_t nchunks = 0, total = 0;
  bool key64 = false;  // 64-bit keys (a float64 tensor in the list)
  int64_t scratch_bytes = 0;
};
MagnitudeSelectPlan magnitude_select_plan_cuda(const MagnitudeList& list);
void magnitude_select_device_cuda(const void* table, int64_t nchunks, bool key64, int64_t total, int64_t k,
                                  void* scratch, int64_t scratch_bytes, double* threshold, int64_t* counts,
                                  uintptr_t stream);
void magnitude_prune_cuda(const MagnitudeList& list, int64_t k, const MagnitudeSelection& sel, uintptr_t stream);

}  // namespace nnmark
