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
void magnitude_prune_cuda(const MagnitudeList& list, int64_t k, const MagnitudeSelection& sel, uintptr_t stream);

}  // namespace nnmark
