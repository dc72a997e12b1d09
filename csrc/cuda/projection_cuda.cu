// CUDA keyed projection (key spec v1): the same Philox bits as the CPU path
// (common/philox.h), X never stored.
//
// forward:  each thread walks a grid-stride set of columns for one (row block b,
//           carrier c), holding the block's 128 row sums in registers; warps and
//           then the thread block reduce them into a per-block partial, and a
//           second kernel sums the partials in a fixed order (deterministic).
// backward: one thread per column; gp[c] sits in shared memory and every lane
//           reads the same row at once (a broadcast).
// Both use the CPU kernel's form: sum_t X[t, i] v = 2 * (sum over the set bits) - (sum of
// all), so each bit costs one predicated add instead of a compare, a select and an add.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "common/dtype.h"
#include "common/philox.h"
#include "cuda/cuda_check.h"
#include "ops/projection.h"

namespace nnmark {
namespace {

constexpr int kThreads = 128;
constexpr int kRows = 128;  // rows per Philox call

template <typename In, typename Acc>
__device__ __forceinline__ Acc to_acc(In v) { return static_cast<Acc>(v); }
template <>
__device__ __forceinline__ float to_acc<__half, float>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_acc<__nv_bfloat16, float>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename In, typename Acc>
__global__ void __launch_bounds__(kThreads)
projection_forward_kernel(const In* __restrict__ w,  // [C, N]
                          int64_t N, int64_t Tpad, uint32_t k0, uint32_t k1, int64_t col0,
                          Acc* __restrict__ partial) {  // [gridDim.x, C, Tpad]
  const int64_t c = blockIdx.z;
  const uint32_t b = blockIdx.y;
  const In* wc = w + c * N;
  Acc acc[kRows];  // A[r]: the sum of this thread's columns whose bit r is set
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = Acc(0);
  Acc total = Acc(0);  // S: the sum of all of this thread's columns
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < N; i += stride) {
    const Acc v = to_acc<In, Acc>(wc[i]);
    total += v;
    const Philox4 bits = projection_block(static_cast<uint64_t>(col0 + i), b, k0, k1);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        if ((bits.v[q] >> j) & 1u) acc[32 * q + j] += v;  // a predicated add, as the CPU's masked add
      }
    }
  }
  // sum_i X[r, i] w[i] = 2 A[r] - S, folded per thread before the reduction (2 A is exact,
  // so integer-valued carriers still sum exactly).
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = Acc(2) * acc[r] - total;
  __shared__ Acc warp_sums[kThreads / 32][kRows];  // [warp, row]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    Acc s = acc[r];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
    if (lane == 0) warp_sums[warp][r] = s;
  }
  __syncthreads();
  if (threadIdx.x < kRows) {
    Acc s = Acc(0);
#pragma unroll
    for (int k = 0; k < kThreads / 32; ++k) s += warp_sums[k][threadIdx.x];
    const int64_t C = gridDim.z;
    partial[(static_cast<int64_t>(blockIdx.x) * C + c) * Tpad + static_cast<int64_t>(b) * kRows + threadIdx.x] = s;
  }
}

// p[c, t] = sum over parts of partial[part, c, t], in a fixed order.
template <typename Acc>
__global__ void reduce_partials_kernel(const Acc* __restrict__ partial,  // [parts, C, Tpad]
                                       int parts, int64_t C, int64_t T, int64_t Tpad,
                                       Acc* __restrict__ p) {  // [C, T]
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= C * T) return;
  const int64_t c = k / T, t = k % T;
  double s = 0;
  for (int part = 0; part < parts; ++part) s += partial[(part * C + c) * Tpad + t];
  p[k] = static_cast<Acc>(s);
}

template <typename Acc>
__global__ void __launch_bounds__(kThreads)
projection_backward_kernel(const Acc* __restrict__ gp,  // [C, T]
                           int64_t N, int64_t T, int64_t b0, int64_t b1, uint32_t k0, uint32_t k1,
                           int64_t col0, bool accumulate, Acc* __restrict__ gw) {  // [C, N]
  NNMARK_DYNAMIC_SHARED(unsigned char, smem_raw);
  Acc* g = reinterpret_cast<Acc*>(smem_raw);  // [(b1 - b0) * 128] rows b0*128.., zero past T
  __shared__ Acc warp_totals[kThreads / 32];
  const int64_t c = blockIdx.y;
  const int64_t rows = (b1 - b0) * kRows;
  Acc part = Acc(0);
  for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) {
    const int64_t t = b0 * kRows + r;
    g[r] = t < T ? gp[c * T + t] : Acc(0);
    part += g[r];
  }
  // G: the sum of the tile's rows, reduced in a fixed order (deterministic).
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) part += __shfl_down_sync(0xffffffffu, part, off);
  if ((threadIdx.x & 31) == 0) warp_totals[threadIdx.x >> 5] = part;
  __syncthreads();
  Acc G = Acc(0);
#pragma unroll
  for (int k = 0; k < kThreads / 32; ++k) G += warp_totals[k];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < N; i += stride) {
    Acc s = Acc(0);  // A: the sum of the rows whose bit is set in this column
    for (int64_t b = b0; b < b1; ++b) {
      const Philox4 bits = projection_block(static_cast<uint64_t>(col0 + i), static_cast<uint32_t>(b), k0, k1);
      const Acc* gb = g + (b - b0) * kRows;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
#pragma unroll
        for (int j = 0; j < 32; ++j) {
          if ((bits.v[q] >> j) & 1u) s += gb[32 * q + j];  // a predicated add
        }
      }
    }
    s = Acc(2) * s - G;  // sum_t X[t, i] g[t] = 2 A - G
    Acc* out = gw + c * N + i;
    *out = accumulate ? *out + s : s;
  }
}

// Blocks along the columns: exactly the blocks the GPU holds at once (one wave, no
// tail) across all (row block, carrier) pairs, but at least ~8 columns per thread so
// the register reduction at the end is amortised.
template <typename In, typename Acc>
int forward_grid_x(int64_t N, int64_t C, int64_t nblk) {
  int per_sm = 0;
  NNMARK_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &per_sm, projection_forward_kernel<In, Acc>, kThreads, 0));
  const int64_t slots = static_cast<int64_t>(sm_count()) * std::max(1, per_sm);
  const int64_t want = std::max<int64_t>(1, slots / std::max<int64_t>(1, C * nblk));
  const int64_t by_work = std::max<int64_t>(1, (N + kThreads * 8 - 1) / (kThreads * 8));
  return static_cast<int>(std::min<int64_t>(want, by_work));
}

template <typename In, typename Acc>
void launch_forward(const ProjectionForwardArgs& a, cudaStream_t stream) {
  const int64_t nblk = (a.T + kRows - 1) / kRows, Tpad = nblk * kRows;
  NNMARK_CHECK_ARG(nblk <= 65535, "bit count T too large for the CUDA path: ", a.T);
  keep_pool_memory();
  const int gx = forward_grid_x<In, Acc>(a.N, a.C, nblk);
  for (int64_t c0 = 0; c0 < a.C; c0 += 65535) {  // gridDim.z limit
    const int64_t Cs = std::min<int64_t>(65535, a.C - c0);
    Acc* partial = nullptr;
    const size_t bytes = static_cast<size_t>(gx) * Cs * Tpad * sizeof(Acc);
    NNMARK_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&partial), bytes, stream));
    const dim3 grid(gx, static_cast<unsigned>(nblk), static_cast<unsigned>(Cs));
    NNMARK_LAUNCH(grid, kThreads, 0, stream, projection_forward_kernel<In, Acc>)(
        static_cast<const In*>(a.w) + c0 * a.N, a.N, Tpad, a.k0, a.k1, a.col0, partial);
    NNMARK_CUDA_CHECK(cudaGetLastError());
    const int64_t outs = Cs * a.T;
    NNMARK_LAUNCH(static_cast<unsigned>((outs + 255) / 256), 256, 0, stream, reduce_partials_kernel<Acc>)(
        partial, gx, Cs, a.T, Tpad, static_cast<Acc*>(a.p) + c0 * a.T);
    NNMARK_CUDA_CHECK(cudaGetLastError());
    NNMARK_CUDA_CHECK(cudaFreeAsync(partial, stream));
  }
}

template <typename Acc>
void launch_backward(const ProjectionBackwardArgs& a, cudaStream_t stream) {
  const int64_t nblk = (a.T + kRows - 1) / kRows;
  // Row blocks per launch so gp fits in 48 KiB of shared memory.
  const int64_t tile = std::max<int64_t>(1, (48 * 1024) / (kRows * static_cast<int64_t>(sizeof(Acc))));
  const int64_t want = std::max<int64_t>(1, 8 * sm_count() / std::max<int64_t>(1, a.C));
  const int gx = static_cast<int>(std::min<int64_t>(want, (a.N + kThreads - 1) / kThreads));
  for (int64_t c0 = 0; c0 < a.C; c0 += 65535) {
    const int64_t Cs = std::min<int64_t>(65535, a.C - c0);
    for (int64_t b0 = 0; b0 < nblk; b0 += tile) {
      const int64_t b1 = std::min(nblk, b0 + tile);
      const size_t smem = static_cast<size_t>(b1 - b0) * kRows * sizeof(Acc);
      NNMARK_LAUNCH(dim3(gx, static_cast<unsigned>(Cs)), kThreads, smem, stream, projection_backward_kernel<Acc>)(
          static_cast<const Acc*>(a.gp) + c0 * a.T, a.N, a.T, b0, b1, a.k0, a.k1, a.col0, b0 > 0,
          static_cast<Acc*>(a.gw) + c0 * a.N);
      NNMARK_CUDA_CHECK(cudaGetLastError());
    }
  }
}

}  // namespace

void projection_forward_cuda(const ProjectionForwardArgs& a, uintptr_t stream_handle) {
  check_projection_args(a);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  switch (a.w_dtype) {
    case kFloat32: return launch_forward<float, float>(a, stream);
    case kFloat64: return launch_forward<double, double>(a, stream);
    case kFloat16: return launch_forward<__half, float>(a, stream);
    default: return launch_forward<__nv_bfloat16, float>(a, stream);
  }
}

void projection_backward_cuda(const ProjectionBackwardArgs& a, uintptr_t stream_handle) {
  check_projection_args(a);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  if (a.gp_dtype == kFloat64) launch_backward<double>(a, stream);
  else launch_backward<float>(a, stream);
}

}  // namespace nnmark
