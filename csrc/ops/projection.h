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
  // Global index of column 0: a shard of a larger carrier projects with the counters of
  // its own columns (col0 + i).
  int64_t col0 = 0;
};

struct ProjectionBackwardArgs {
  const void* gp;  // [C, T] gradient of the projections, float32 or float64
  int gp_dtype;    // kFloat32 or kFloat64
  int64_t C, N, T;
  uint32_t k0, k1;
  void* gw;        // [C, N] gradient of the carriers, same dtype as gp
  int64_t col0 = 0;  // global index of column 0, as in ProjectionForwardArgs
};

// One carrier under many subkeys (a key search, e.g. nnmark.attacks.forge_key):
//   p[k, t] = X_k . w, X_k drawn under subkeys[k] exactly as projection_forward draws it.
// float64 throughout, summed in the order projection_forward sums a float64 carrier on one
// thread, so each row equals that op's output for the same subkey.
struct ProjectionManyKeysArgs {
  const double* w;          // [N] the carrier, float64
  const uint32_t* subkeys;  // [K, 2] (k0, k1) of each key
  int64_t K, N, T;
  double* p;                // [K, T] projections, float64
};

void projection_forward_cpu(const ProjectionForwardArgs& a);
void projection_backward_cpu(const ProjectionBackwardArgs& a);
void projection_many_keys_cpu(const ProjectionManyKeysArgs& a);  // no CUDA twin (yet)

// CUDA twins: device pointers, launched on `stream` (a cudaStream_t as an integer).
void projection_forward_cuda(const ProjectionForwardArgs& a, uintptr_t stream);
void projection_backward_cuda(const ProjectionBackwardArgs& a, uintptr_t stream);

// Check the shared argument rules (sizes, dtypes); throws std::invalid_argument.
void check_projection_args(const ProjectionForwardArgs& a);
void check_projection_args(const ProjectionBackwardArgs& a);
void check_projection_args(const ProjectionManyKeysArgs& a);

}  // namespace nnmark
