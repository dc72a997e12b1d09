// Per-channel activation statistics, accumulated in place across batches (the
// channel ranking of fine-pruning, Liu et al. 2018).
//
// For an activation x of B samples, C channels and S spatial positions:
//   sums[c]      += sum over b < B, s < S of x[b, c, s]      (float64 accumulation)
//   positives[c] += #{(b, s) : x[b, c, s] > 0}               (NaN is not positive)
// Memory layouts:
//   channels_last = false: x is [B, C, S] (NCHW flattened; a [B, C] linear output is S = 1)
//   channels_last = true:  x is [B, S, C] (NHWC flattened)
// [B, C] and S = 1 are the same memory either way; both take the channel-minor path.
//
// Deterministic: the work is cut into pieces whose boundaries depend only on (B, C, S)
// and the layout, each piece is summed in a fixed order, and the pieces are combined in
// a fixed order, so the result does not depend on the thread count (nor on timing).
// The CPU's SIMD path (generic / AVX2 / AVX-512) fixes the order within a piece; every
// element is widened exactly to float64 before it is added, so results agree with a
// float64 reference to float64 rounding.
#pragma once
#include <cstdint>

#include "common/dtype.h"
#include "common/macros.h"

namespace nnmark {

struct ChannelStatsArgs {
  const void* x;          // [B, C, S] or, channels_last, [B, S, C]; dense, dtype x_dtype
  int x_dtype;            // DType code (float32, float64, float16, bfloat16)
  int64_t B, C, S;        // samples, channels, spatial positions (all >= 1)
  bool channels_last;     // layout of x, see above
  double* sums;           // [C] in/out: sum of x per channel is added
  int64_t* positives;     // [C] in/out: count of x > 0 per channel is added
};

// CPU: all pointers on the host.
void channel_stats_cpu(const ChannelStatsArgs& a);
// CUDA: x, sums and positives on the current device; launched on `stream`
// (a cudaStream_t as an integer).
void channel_stats_cuda(const ChannelStatsArgs& a, uintptr_t stream);

// Sizes, dtype and pointers; throws std::invalid_argument. Inline: both modules use it.
inline void check_channel_stats_args(const ChannelStatsArgs& a) {
  check_dtype(a.x_dtype, "activation x");
  NNMARK_CHECK_ARG(a.B >= 1 && a.C >= 1 && a.S >= 1, "sizes must be >= 1, got B=", a.B, " C=", a.C,
                   " S=", a.S);
  // B * C * S indexes x with int64 arithmetic; keep a margin below overflow.
  NNMARK_CHECK_ARG(a.B <= (int64_t{1} << 62) / a.C / a.S, "too many elements: B=", a.B, " C=", a.C,
                   " S=", a.S);
  NNMARK_CHECK_ARG(a.x != nullptr && a.sums != nullptr && a.positives != nullptr, "null data pointer");
}

}  // namespace nnmark
