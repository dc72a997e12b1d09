// CUDA trigger-set verification (ops/trigger_verify.h).
//
// trigger_tile_kernel: one thread block per (checkpoint k, tile of kTriggerTileRows
//   rows), flattened as k * tiles + tile like the CPU work items. A team of G threads
//   (G = 1, 8 or 32 by the class count) scans one row: each lane keeps the maximum of
//   its strided classes before and after the label and a NaN flag, and the team
//   combines them with shuffles. Row results go to shared memory; thread 0 then sums
//   the tile's margins in row order into a partial.
// trigger_finish_kernel: one thread per checkpoint sums its partials in tile order
//   and computes the exact p-value with the shared host/device binomial_sf.
// The summation order is the CPU's, so margins agree bit for bit with the CPU path.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>

#include <algorithm>

#include "common/dtype.h"
#include "cuda/cuda_check.h"
#include "ops/trigger_verify.h"

namespace nnmark {
namespace {

constexpr int kThreads = static_cast<int>(kTriggerTileRows);  // 256 threads, 256 rows per block

template <typename In>
__device__ __forceinline__ float to_accf(In v) { return static_cast<float>(v); }
template <>
__device__ __forceinline__ float to_accf<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_accf<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename In, typename Acc>
__device__ __forceinline__ Acc load_acc(const In* p, int64_t i) { return static_cast<Acc>(to_accf<In>(p[i])); }
template <>
__device__ __forceinline__ double load_acc<double, double>(const double* p, int64_t i) { return p[i]; }

struct Partial {
  long long hits;   // hit rows of the tile
  long long count;  // rows with a non-NaN margin
  double sum;       // their margins summed in row order
};

template <typename In, typename Acc, int G>
__global__ void __launch_bounds__(kThreads)
trigger_tile_kernel(const In* __restrict__ logits,       // [K, B, C]
                    const int64_t* __restrict__ labels,  // [B]
                    int64_t B, int64_t C, int64_t tiles,
                    Partial* __restrict__ partial) {     // [K * tiles]
  __shared__ double row_margin[kTriggerTileRows];  // [row in tile], NaN: left out
  __shared__ unsigned char row_hit[kTriggerTileRows];  // [row in tile]
  const int64_t item = blockIdx.x;
  const int64_t k = item / tiles, b0 = (item % tiles) * kTriggerTileRows;
  const int rows = static_cast<int>(B - b0 < kTriggerTileRows ? B - b0 : kTriggerTileRows);
  constexpr int kTeams = kThreads / G;
  const int team = threadIdx.x / G, lane = threadIdx.x % G;
  const Acc neg_inf = -static_cast<Acc>(INFINITY);
  // Every thread runs the same number of rounds, so whole warps reach the shuffles.
  for (int r0 = 0; r0 < rows; r0 += kTeams) {
    const int r = r0 + team;
    const bool active = r < rows;
    const int64_t b = b0 + (active ? r : 0);
    const In* row = logits + (k * B + b) * C;
    const int64_t y = labels[b];
    const bool valid = active && y >= 0 && y < C;  // labels checked in Python; never read out of bounds
    Acc before = neg_inf, after = neg_inf;
    bool nan = false;
    if (valid) {
      for (int64_t c = lane; c < C; c += G) {
        const Acc v = load_acc<In, Acc>(row, c);
        nan |= (v != v);
        if (c < y) before = v > before ? v : before;
        else if (c > y) after = v > after ? v : after;
      }
    }
#pragma unroll
    for (int off = G / 2; off > 0; off >>= 1) {  // team reduction (NaN-free maxima)
      const Acc ob = __shfl_xor_sync(0xffffffffu, before, off, G);
      const Acc oa = __shfl_xor_sync(0xffffffffu, after, off, G);
      const int on = __shfl_xor_sync(0xffffffffu, static_cast<int>(nan), off, G);
      before = ob > before ? ob : before;
      after = oa > after ? oa : after;
      nan = nan || on;
    }
    if (active && lane == 0) {
      bool hit = false;
      double m = CUDART_NAN;
      if (valid) {
        const Acc lab = load_acc<In, Acc>(row, y);
        if (!nan && lab == lab) {
          hit = (y == 0 || lab > before) && lab >= after;
          m = static_cast<double>(lab) - static_cast<double>(before > after ? before : after);
        }
      }
      row_hit[r] = hit;
      row_margin[r] = m;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    Partial p{0, 0, 0.0};
    for (int r = 0; r < rows; ++r) {
      p.hits += row_hit[r];
      const double m = row_margin[r];
      if (m == m) {
        p.sum += m;
        p.count += 1;
      }
    }
    partial[item] = p;
  }
}

__global__ void trigger_finish_kernel(const Partial* __restrict__ partial,  // [K * tiles]
                                      int64_t K, int64_t B, int64_t tiles, double null_rate,
                                      int64_t* __restrict__ hits,       // [K]
                                      double* __restrict__ margin,      // [K]
                                      double* __restrict__ p_value) {   // [K]
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= K) return;
  long long h = 0, count = 0;
  double sum = 0;
  for (int64_t j = 0; j < tiles; ++j) {
    const Partial p = partial[k * tiles + j];
    h += p.hits;
    count += p.count;
    sum += p.sum;
  }
  hits[k] = h;
  margin[k] = count > 0 ? sum / static_cast<double>(count) : CUDART_NAN;
  p_value[k] = binomial_sf(h, B, null_rate);
}

template <typename In, typename Acc>
void launch(const TriggerVerifyArgs& a, cudaStream_t stream) {
  const int64_t tiles = (a.B + kTriggerTileRows - 1) / kTriggerTileRows;
  const int64_t items = a.K * tiles;
  NNMARK_CHECK_ARG(items <= 2147483647, "too many checkpoints x triggers for the CUDA path: K=", a.K,
                   " B=", a.B);
  Partial* partial = nullptr;
  NNMARK_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&partial), sizeof(Partial) * items, stream));
  const In* logits = static_cast<const In*>(a.logits);
  const unsigned grid = static_cast<unsigned>(items);
  if (a.C <= 16)
    NNMARK_LAUNCH(grid, kThreads, 0, stream, trigger_tile_kernel<In, Acc, 1>)(logits, a.labels, a.B, a.C, tiles, partial);
  else if (a.C <= 128)
    NNMARK_LAUNCH(grid, kThreads, 0, stream, trigger_tile_kernel<In, Acc, 8>)(logits, a.labels, a.B, a.C, tiles, partial);
  else
    NNMARK_LAUNCH(grid, kThreads, 0, stream, trigger_tile_kernel<In, Acc, 32>)(logits, a.labels, a.B, a.C, tiles, partial);
  NNMARK_CUDA_CHECK(cudaGetLastError());
  constexpr int kFinish = 128;
  NNMARK_LAUNCH(static_cast<unsigned>((a.K + kFinish - 1) / kFinish), kFinish, 0, stream, trigger_finish_kernel)(
      partial, a.K, a.B, tiles, a.null_rate, a.hits, a.margin, a.p_value);
  NNMARK_CUDA_CHECK(cudaGetLastError());
  NNMARK_CUDA_CHECK(cudaFreeAsync(partial, stream));
}

}  // namespace

void trigger_verify_cuda(const TriggerVerifyArgs& a, uintptr_t stream_handle) {
  check_trigger_verify_args(a);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  switch (a.logits_dtype) {
    case kFloat32: return launch<float, float>(a, stream);
    case kFloat64: return launch<double, double>(a, stream);
    case kFloat16: return launch<__half, float>(a, stream);
    default: return launch<__nv_bfloat16, float>(a, stream);
  }
}

}  // namespace nnmark
