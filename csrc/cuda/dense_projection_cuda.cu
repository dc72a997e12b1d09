// CUDA dense projection with an explicit X[T, N] (imported keys).
// forward: one thread block per (t, c) reduces a dot product over N.
// backward: one thread per (c, i) walks the T rows of X (coalesced over i).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/dtype.h"
#include "cuda/cuda_check.h"
#include "ops/dense_projection.h"

namespace nnmark {
namespace {

constexpr int kThreads = 256;

template <typename In, typename Acc>
__device__ __forceinline__ Acc load_w(const In* w, int64_t k) { return static_cast<Acc>(w[k]); }
template <>
__device__ __forceinline__ float load_w<__half, float>(const __half* w, int64_t k) { return __half2float(w[k]); }
template <>
__device__ __forceinline__ float load_w<__nv_bfloat16, float>(const __nv_bfloat16* w, int64_t k) {
  return __bfloat162float(w[k]);
}

template <typename In, typename Acc>
__global__ void dense_forward_kernel(const Acc* __restrict__ x,  // [T, N]
                                     const In* __restrict__ w,   // [C, N]
                                     int64_t N, int64_t T, Acc* __restrict__ p) {  // [C, T]
  const int64_t t = blockIdx.x, c = blockIdx.y;
  double s = 0;
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x)
    s += static_cast<double>(x[t * N + i]) * static_cast<double>(load_w<In, Acc>(w, c * N + i));
  __shared__ double part[kThreads];  // [thread]
  part[threadIdx.x] = s;
  __syncthreads();
  for (int h = blockDim.x / 2; h > 0; h >>= 1) {
    if (threadIdx.x < h) part[threadIdx.x] += part[threadIdx.x + h];
    __syncthreads();
  }
  if (threadIdx.x == 0) p[c * T + t] = static_cast<Acc>(part[0]);
}

template <typename Acc>
__global__ void dense_backward_kernel(const Acc* __restrict__ x,   // [T, N]
                                      const Acc* __restrict__ gp,  // [C, T]
                                      int64_t N, int64_t T, Acc* __restrict__ gw) {  // [C, N]
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t c = blockIdx.y;
  if (i >= N) return;
  Acc s = Acc(0);
  for (int64_t t = 0; t < T; ++t) s += x[t * N + i] * gp[c * T + t];
  gw[c * N + i] = s;
}

template <typename In, typename Acc>
void launch_forward(const DenseForwardArgs& a, cudaStream_t stream) {
  NNMARK_CHECK_ARG(a.T <= 2147483647 && a.C <= 65535, "too many rows or carriers for the CUDA path: T=",
                   a.T, " C=", a.C);
  NNMARK_LAUNCH(dim3(static_cast<unsigned>(a.T), static_cast<unsigned>(a.C)), kThreads, 0, stream, dense_forward_kernel<In, Acc>)(
      static_cast<const Acc*>(a.x), static_cast<const In*>(a.w), a.N, a.T, static_cast<Acc*>(a.p));
  NNMARK_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void dense_forward_cuda(const DenseForwardArgs& a, uintptr_t stream_handle) {
  check_dense_args(a);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  if (a.x_dtype == kFloat64) return launch_forward<double, double>(a, stream);
  switch (a.w_dtype) {
    case kFloat32: return launch_forward<float, float>(a, stream);
    case kFloat16: return launch_forward<__half, float>(a, stream);
    default: return launch_forward<__nv_bfloat16, float>(a, stream);
  }
}

void dense_backward_cuda(const DenseBackwardArgs& a, uintptr_t stream_handle) {
  check_dense_args(a);
  NNMARK_CHECK_ARG(a.C <= 65535, "too many carriers for the CUDA path: C=", a.C);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const dim3 grid(static_cast<unsigned>((a.N + kThreads - 1) / kThreads), static_cast<unsigned>(a.C));
  if (a.x_dtype == kFloat64)
    NNMARK_LAUNCH(grid, kThreads, 0, stream, dense_backward_kernel<double>)(
        static_cast<const double*>(a.x), static_cast<const double*>(a.gp), a.N, a.T, static_cast<double*>(a.gw));
  else
    NNMARK_LAUNCH(grid, kThreads, 0, stream, dense_backward_kernel<float>)(
        static_cast<const float*>(a.x), static_cast<const float*>(a.gp), a.N, a.T, static_cast<float*>(a.gw));
  NNMARK_CUDA_CHECK(cudaGetLastError());
}

}  // namespace nnmark
