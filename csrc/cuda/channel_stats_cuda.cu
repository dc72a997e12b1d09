// CUDA per-channel activation statistics (ops/channel_stats.h).
//
// rows_kernel ([B, C, S], S > 1): one 256-thread block per piece (batch block bb,
//   channel block cb, row segment sc). Threads form teams of G lanes; a team always
//   reads one channel (team % cw) and walks its rows b; lanes stride the row segment in
//   16-byte vectors where rows are 16-byte aligned. Small rows take small teams and
//   several channels per block, so a warp still reads contiguous memory.
// cols_kernel ([R, C] with channels contiguous: channels_last, or S = 1): a 32 x 8
//   block; lane x owns channel c0 + x, the 8 rows of threads stride a block of rows.
// The grid is sized from the work: pieces of at least kMinPiece elements, and as many
//   as fill the GPU (kBlocksPerSm blocks per SM) when the channels alone do not.
// Every thread sums its elements in order (float64, exact widening) and the block
//   combines threads in a fixed order, then either adds to sums/positives directly
//   (one piece per channel) or writes partials that finish_kernel reduces, one block
//   per channel: each thread its fixed share of the partials in order, then a fixed
//   tree. No atomics: the same result on every run.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "common/dtype.h"
#include "cuda/cuda_check.h"
#include "ops/channel_stats.h"

namespace nnmark {
namespace {

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

constexpr int kThreads = 256;
constexpr int64_t kSeg = 8192;    // longest row segment of a piece (a multiple of every vector width)
constexpr int64_t kMinPiece = 8192;  // fewest elements a piece gets when the grid is split for the GPU
constexpr int64_t kBlocksPerSm = 8;  // 256-thread blocks resident per SM
constexpr int kFinish = 256;         // threads of finish_kernel (a power of two)

template <typename In>
__device__ __forceinline__ double widen(In v) { return static_cast<double>(v); }
template <>
__device__ __forceinline__ double widen<__half>(__half v) { return static_cast<double>(__half2float(v)); }
template <>
__device__ __forceinline__ double widen<__nv_bfloat16>(__nv_bfloat16 v) {
  return static_cast<double>(__bfloat162float(v));
}

// V elements loaded together (16 bytes when V > 1).
template <typename In, int V>
struct alignas(sizeof(In) * V) Pack {
  In v[V];
};

template <typename In, int V, int G>
__global__ void __launch_bounds__(kThreads)
rows_kernel(const In* __restrict__ x,  // [B, C, S]
            int64_t B, int64_t C, int64_t S, int64_t nsc, int cw, int64_t ncb, int64_t bblock,
            double* __restrict__ psum,          // [nbb, C, nsc] partials, or null: add to sums directly
            long long* __restrict__ ppos,       // [nbb, C, nsc]
            double* __restrict__ sums,          // [C]
            long long* __restrict__ positives) {  // [C]
  constexpr int kTeams = kThreads / G;
  __shared__ double team_sum[kTeams];
  __shared__ long long team_pos[kTeams];
  const int64_t piece = blockIdx.x;
  const int64_t sc = piece % nsc, cb = (piece / nsc) % ncb, bb = piece / (nsc * ncb);
  const int64_t s0 = sc * kSeg, len = S - s0 < kSeg ? S - s0 : kSeg, nv = len / V;
  const int64_t c0 = cb * cw, b0 = bb * bblock, b1 = B < b0 + bblock ? B : b0 + bblock;
  const int team = threadIdx.x / G, lane = threadIdx.x % G;
  const int tpc = kTeams / cw;  // teams per channel
  const int64_t c = c0 + team % cw;
  double s = 0;
  int k = 0;  // a thread sees at most a piece: far below 2^31 elements
  if (c < C) {
    for (int64_t b = b0 + team / cw; b < b1; b += tpc) {
      const Pack<In, V>* row = reinterpret_cast<const Pack<In, V>*>(x + (b * C + c) * S + s0);
#pragma unroll 4
      for (int64_t i = lane; i < nv; i += G) {
        const Pack<In, V> p = row[i];
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const double v = widen<In>(p.v[j]);
          s += v;
          k += v > 0;
        }
      }
    }
  }
#pragma unroll
  for (int off = G / 2; off > 0; off >>= 1) {  // team reduction to lane 0 (fixed tree)
    s += __shfl_down_sync(0xffffffffu, s, off, G);
    k += __shfl_down_sync(0xffffffffu, k, off, G);
  }
  if (lane == 0) {
    team_sum[team] = s;
    team_pos[team] = k;
  }
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < cw && c0 + threadIdx.x < C) {  // one thread per channel: its teams in order
    double t = 0;
    long long n = 0;
    for (int m = 0; m < tpc; ++m) {
      t += team_sum[threadIdx.x + m * cw];
      n += team_pos[threadIdx.x + m * cw];
    }
    const int64_t ch = c0 + threadIdx.x;
    if (psum == nullptr) {
      sums[ch] += t;
      positives[ch] += n;
    } else {
      const int64_t q = (bb * C + ch) * nsc + sc;
      psum[q] = t;
      ppos[q] = n;
    }
  }
}

constexpr int kColX = 32, kColY = 8;

template <typename In>
__global__ void __launch_bounds__(kColX * kColY)
cols_kernel(const In* __restrict__ x,  // [R, C]
            int64_t R, int64_t C, int64_t ncb, int64_t rblock,
            double* __restrict__ psum,          // [nrb, C] partials, or null: add to sums directly
            long long* __restrict__ ppos,       // [nrb, C]
            double* __restrict__ sums,          // [C]
            long long* __restrict__ positives) {  // [C]
  __shared__ double ssum[kColY][kColX];
  __shared__ long long spos[kColY][kColX];
  const int64_t cb = blockIdx.x % ncb, rb = blockIdx.x / ncb;
  const int64_t c = cb * kColX + threadIdx.x;
  const int64_t r0 = rb * rblock, r1 = R < r0 + rblock ? R : r0 + rblock;
  double s = 0;
  int k = 0;
  if (c < C) {
#pragma unroll 4
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kColY) {
      const double v = widen<In>(x[r * C + c]);
      s += v;
      k += v > 0;
    }
  }
  ssum[threadIdx.y][threadIdx.x] = s;
  spos[threadIdx.y][threadIdx.x] = k;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    double t = 0;
    long long n = 0;
    for (int y = 0; y < kColY; ++y) {
      t += ssum[y][threadIdx.x];
      n += spos[y][threadIdx.x];
    }
    if (psum == nullptr) {
      sums[c] += t;
      positives[c] += n;
    } else {
      psum[rb * C + c] = t;
      ppos[rb * C + c] = n;
    }
  }
}

// One block per channel (grid-stride): thread t adds partials t, t + kFinish, ... in
// order, then the block adds the threads' sums in a fixed tree.
__global__ void __launch_bounds__(kFinish)
finish_kernel(const double* __restrict__ psum,     // [np, C, nsc]
              const long long* __restrict__ ppos,  // [np, C, nsc]
              int64_t np, int64_t C, int64_t nsc,
              double* __restrict__ sums,           // [C]
              long long* __restrict__ positives) {  // [C]
  __shared__ double ssum[kFinish];
  __shared__ long long spos[kFinish];
  const int64_t n = np * nsc;  // partials of a channel
  for (int64_t c = blockIdx.x; c < C; c += gridDim.x) {
    double t = 0;
    long long k = 0;
    for (int64_t q = threadIdx.x; q < n; q += kFinish) {
      const int64_t p = q / nsc, sc = q % nsc;
      t += psum[(p * C + c) * nsc + sc];
      k += ppos[(p * C + c) * nsc + sc];
    }
    ssum[threadIdx.x] = t;
    spos[threadIdx.x] = k;
    __syncthreads();
    for (int half = kFinish / 2; half > 0; half >>= 1) {
      if (static_cast<int>(threadIdx.x) < half) {
        ssum[threadIdx.x] += ssum[threadIdx.x + half];
        spos[threadIdx.x] += spos[threadIdx.x + half];
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      sums[c] += ssum[0];
      positives[c] += spos[0];
    }
    __syncthreads();  // ssum is free again
  }
}

// Pieces along the rows (batch) for `others` pieces across channels and segments, each
// of `per_row` elements a row: at least kMinPiece elements a piece, and no more pieces
// than fill the GPU when `others` alone does not.
int64_t row_pieces(int64_t rows, int64_t per_row, int64_t others) {
  const int64_t target = std::max<int64_t>(1, sm_count() * kBlocksPerSm / std::max<int64_t>(1, others));
  const int64_t by_work = std::max<int64_t>(1, rows * per_row / kMinPiece);
  const int64_t at_least = ceil_div(rows * per_row, int64_t{1} << 30);  // a thread's int count stays small
  return std::min(rows, std::max({int64_t{1}, std::min(target, by_work), at_least}));
}

int64_t pow2_floor(int64_t v) {
  int64_t p = 1;
  while (p * 2 <= v) p *= 2;
  return p;
}

// Partials of `np` pieces per channel (and nsc segments), or none when np * nsc == 1.
struct Scratch {
  double* sum = nullptr;
  long long* pos = nullptr;
};

Scratch take_scratch(int64_t np, int64_t C, int64_t nsc, cudaStream_t stream) {
  Scratch sc;
  if (np * nsc == 1) return sc;
  const size_t n = static_cast<size_t>(np * C * nsc);
  void* p = nullptr;
  NNMARK_CUDA_CHECK(cudaMallocAsync(&p, n * (sizeof(double) + sizeof(long long)), stream));
  sc.sum = static_cast<double*>(p);
  sc.pos = reinterpret_cast<long long*>(sc.sum + n);
  return sc;
}

void finish(const Scratch& scr, int64_t np, int64_t C, int64_t nsc, double* sums, long long* positives,
            cudaStream_t stream) {
  if (scr.sum == nullptr) return;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(C, 65535));
  NNMARK_LAUNCH(grid, kFinish, 0, stream, finish_kernel)(scr.sum, scr.pos, np, C, nsc, sums, positives);
  NNMARK_CUDA_CHECK(cudaGetLastError());
  NNMARK_CUDA_CHECK(cudaFreeAsync(scr.sum, stream));
}

void check_grid(int64_t blocks) {
  NNMARK_CHECK_ARG(blocks <= 2147483647, "too many work pieces for one CUDA launch: ", blocks);
}

template <typename In, int V, int G>
void launch_rows_g(const ChannelStatsArgs& a, cudaStream_t stream) {
  const int64_t B = a.B, C = a.C, S = a.S;
  const int64_t nsc = ceil_div(S, kSeg), seg = std::min(S, kSeg);
  constexpr int64_t kTeams = kThreads / G;
  // Channels per block: one when rows are long; for short rows enough channels that a
  // block's teams read about 1024 contiguous elements per sample.
  const int64_t cw = nsc > 1 ? 1 : pow2_floor(std::min({kTeams, C, std::max<int64_t>(1, 1024 / S)}));
  const int64_t ncb = ceil_div(C, cw);
  // Batch blocks: as the work and the GPU call for (row_pieces).
  const int64_t bblock = ceil_div(B, row_pieces(B, cw * seg, ncb * nsc));
  const int64_t nbb = ceil_div(B, bblock);
  const int64_t blocks = nbb * ncb * nsc;
  check_grid(blocks);
  const Scratch scr = take_scratch(nbb, C, nsc, stream);
  auto* positives = reinterpret_cast<long long*>(a.positives);
  NNMARK_LAUNCH(static_cast<unsigned>(blocks), kThreads, 0, stream, rows_kernel<In, V, G>)(
      static_cast<const In*>(a.x), B, C, S, nsc, static_cast<int>(cw), ncb, bblock, scr.sum, scr.pos, a.sums,
      positives);
  NNMARK_CUDA_CHECK(cudaGetLastError());
  finish(scr, nbb, C, nsc, a.sums, positives, stream);
}

template <typename In, int V>
void launch_rows_v(const ChannelStatsArgs& a, cudaStream_t stream) {
  // Lanes per row by the vectors in a row segment: whole warps for long rows.
  const int64_t nv = std::min(a.S, kSeg) / V;
  if (nv >= 24) return launch_rows_g<In, V, 32>(a, stream);
  if (nv >= 4) return launch_rows_g<In, V, 4>(a, stream);
  launch_rows_g<In, V, 1>(a, stream);
}

template <typename In>
void launch(const ChannelStatsArgs& a, cudaStream_t stream) {
  if (a.channels_last || a.S == 1) {
    const int64_t R = a.B * a.S, C = a.C;
    const int64_t ncb = ceil_div(C, kColX);
    const int64_t rblock = ceil_div(R, row_pieces(R, std::min<int64_t>(C, kColX), ncb)), nrb = ceil_div(R, rblock);
    check_grid(nrb * ncb);
    const Scratch scr = take_scratch(nrb, C, 1, stream);
    auto* positives = reinterpret_cast<long long*>(a.positives);
    NNMARK_LAUNCH(static_cast<unsigned>(nrb * ncb), dim3(kColX, kColY), 0, stream, cols_kernel<In>)(
        static_cast<const In*>(a.x), R, C, ncb, rblock, scr.sum, scr.pos, a.sums, positives);
    NNMARK_CUDA_CHECK(cudaGetLastError());
    finish(scr, nrb, C, 1, a.sums, positives, stream);
    return;
  }
  // 16-byte loads when every row (and segment) starts 16-byte aligned.
  constexpr int V = 16 / sizeof(In);
  const bool vec = a.S % V == 0 && reinterpret_cast<uintptr_t>(a.x) % 16 == 0;
  if (vec) launch_rows_v<In, V>(a, stream);
  else launch_rows_v<In, 1>(a, stream);
}

}  // namespace

void channel_stats_cuda(const ChannelStatsArgs& a, uintptr_t stream_handle) {
  check_channel_stats_args(a);
  static_assert(sizeof(long long) == sizeof(int64_t), "positives are int64");
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  switch (a.x_dtype) {
    case kFloat32: return launch<float>(a, stream);
    case kFloat64: return launch<double>(a, stream);
    case kFloat16: return launch<__half>(a, stream);
    default: return launch<__nv_bfloat16>(a, stream);
  }
}

}  // namespace nnmark
