// Keyed projection (key spec v1): X in {-1,+1}^{T x N} drawn on the fly from
// Philox4x32-10 under subkey (k0, k1); X is never stored.
//   forward:  p[C, T]  = X . w[C, N]        (each of the C carriers projected by the same X)
//   backward: gw[C, N] = X^T . gp[C, T]
// All arrays are dense, C-contiguous. Accumulation is float32 for float32 and
// 16-bit inputs and float64 for float64 inputs; outputs are float32 or float64.
#pragma once
#include <cstdint>

namespace nnmark {

struct ProjectionForwardArgs {
  const void* w;   // [C, N] carriers, dtype w_dtype
  int w_dtype;     // DType code
  int64_t C, N, T;
  uint32_t k0, k1;  // subkey
  void* p;          // [C, T] projections, float64 if w is float64, else float32
};

struct ProjectionBackwardArgs {
  const void* gp;  // [C, T] gradient of the projections, float32 or float64
  int gp_dtype;    // kFloat32 or kFloat64
  int64_t C, N, T;
  uint32_t k0, k1;
  void* gw;        // [C, N] gradient of the carriers, same dtype as gp
};

void projection_forward_cpu(const ProjectionForwardArgs& a);
void projection_backward_cpu(const ProjectionBackwardArgs& a);

// CUDA twins: device pointers, launched on `stream` (a cudaStream_t as an integer).
void projection_forward_cuda(const ProjectionForwardArgs& a, uintptr_t stream);
void projection_backward_cuda(const ProjectionBackwardArgs& a, uintptr_t stream);

// Check the shared argument rules (sizes, dtypes); throws std::invalid_argument.
void check_projection_args(const ProjectionForwardArgs& a);
void check_projection_args(const ProjectionBackwardArgs& a);

}  // namespace nnmark
