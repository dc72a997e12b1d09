// Dense projection with an explicit, user-supplied matrix X[T, N] (keys made by
// other tools, e.g. Uchida et al.'s saved Gaussian matrix).
//   forward:  p[C, T]  = X . w[C, N]
//   backward: gw[C, N] = X^T . gp[C, T]
// X, w and gp share one dtype for the float32/float64 cases; w may also be
// float16/bfloat16 (X then float32). Accumulation as in projection.h.
#pragma once
#include <cstdint>

namespace nnmark {

struct DenseForwardArgs {
  const void* x;  // [T, N] projection matrix, float32 or float64
  int x_dtype;
  const void* w;  // [C, N] carriers
  int w_dtype;
  int64_t C, N, T;
  void* p;        // [C, T], dtype of x
};

struct DenseBackwardArgs {
  const void* x;   // [T, N]
  int x_dtype;
  const void* gp;  // [C, T], dtype of x
  int64_t C, N, T;
  void* gw;        // [C, N], dtype of x
};

void dense_forward_cpu(const DenseForwardArgs& a);
void dense_backward_cpu(const DenseBackwardArgs& a);
void dense_forward_cuda(const DenseForwardArgs& a, uintptr_t stream);
void dense_backward_cuda(const DenseBackwardArgs& a, uintptr_t stream);

void check_dense_args(const DenseForwardArgs& a);
void check_dense_args(const DenseBackwardArgs& a);

}  // namespace nnmark
