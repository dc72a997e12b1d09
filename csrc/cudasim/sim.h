// The CUDA simulator: the few CUDA built-ins nnmark's kernels use, for the host.
//
// The .cu files in csrc/cuda/ compile as plain C++ against this header (it stands in
// for cuda_runtime.h, cuda_fp16.h, cuda_bf16.h and math_constants.h; see include/).
// A launch runs the grid's blocks one after another on the calling thread; the threads
// of a block are fibers (user-level threads, one stack each) that switch only at
// __syncthreads and at warp collectives (shuffles, votes), so those behave as on a GPU:
// nobody passes a barrier before every thread of the block (or lane of the warp) reached
// it. The order in which fibers run between barriers, and blocks run in a grid, is a
// setting (forward, reverse, seeded shuffle): a missing barrier shows up as a wrong
// answer under one order or another. Memory is host memory: cudaMalloc* hands out
// poisoned (0xFF) bytes, so reading what no thread wrote gives NaN or huge counts.
// What it cannot catch: docs/cuda_sim.md.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

#include "common/dtype.h"

// ---- qualifiers: all host code here --------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// __shared__ variables are one object per host thread: every fiber of a block runs on
// the launching thread, and blocks run one at a time. (Not re-poisoned per block.)
#define __shared__ static thread_local
#define CUDART_NAN (__builtin_nan(""))

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace nnmark_sim {

// The running fiber's indices and its launch's shape (set by the scheduler at each switch).
struct ThreadState {
  dim3 thread_idx, block_idx, block_dim, grid_dim;
};
extern thread_local ThreadState* tl_state;

// Block barrier, and the warp exchange behind every shuffle and vote: each lane of the
// warp puts `value` in its slot, all wait, and each reads the slot of `src` (its own
// when src < 0). Both switch to other fibers; defined in sim.cpp (never inlined, so no
// compiler keeps a fiber's indices across a switch).
void syncthreads();
uint64_t warp_exchange(unsigned mask, uint64_t value, int src);
uint64_t warp_gather(unsigned mask, bool pred);  // the ballot of pred over the lanes
void* dynamic_shared();

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a type over 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <typename T>
T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

inline int lane_id() {
  const dim3& t = tl_state->thread_idx;
  const dim3& d = tl_state->block_dim;
  return static_cast<int>((t.x + d.x * (t.y + d.y * t.z)) & 31u);
}

// ---- launches ------------------------------------------------------------------
struct LaunchConfig {
  dim3 grid, block;
  size_t smem;
  void* stream;
};
// Runs body() once per thread of every block; launch errors (a bad shape, a deadlock)
// go to the last-error state, as a GPU launch's do.
void run_grid(const LaunchConfig& cfg, const std::function<void()>& body);

template <typename... P>
struct BoundKernel {
  LaunchConfig cfg;
  void (*kernel)(P...);
  // The parameters as the kernel declares them: the same conversions as a <<<>>> launch.
  void operator()(P... args) const {
    run_grid(cfg, [&] { kernel(args...); });
  }
};
struct Launcher {
  LaunchConfig cfg;
  template <typename... P>
  BoundKernel<P...> operator|(void (*kernel)(P...)) const { return {cfg, kernel}; }
};

}  // namespace nnmark_sim

#define threadIdx (::nnmark_sim::tl_state->thread_idx)
#define blockIdx (::nnmark_sim::tl_state->block_idx)
#define blockDim (::nnmark_sim::tl_state->block_dim)
#define gridDim (::nnmark_sim::tl_state->grid_dim)

// kernel<<<grid, block, smem, stream>>>(args) is written NNMARK_LAUNCH(grid, block, smem, stream, kernel)(args).
#define NNMARK_LAUNCH(grid, block, smem, stream, ...)                                                   \
  (::nnmark_sim::Launcher{{dim3(grid), dim3(block), static_cast<size_t>(smem), static_cast<void*>(stream)}} | \
   __VA_ARGS__)
#define NNMARK_DYNAMIC_SHARED(type, name) type* name = static_cast<type*>(::nnmark_sim::dynamic_shared())

// ---- device functions ----------------------------------------------------------
inline void __syncthreads() { ::nnmark_sim::syncthreads(); }

template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  const int lane = ::nnmark_sim::lane_id(), base = lane & ~(width - 1);
  return ::nnmark_sim::from_bits<T>(::nnmark_sim::warp_exchange(mask, ::nnmark_sim::to_bits(v), base + (src & (width - 1))));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = ::nnmark_sim::lane_id();
  const int src = (lane & (width - 1)) + static_cast<int>(delta) < width ? lane + static_cast<int>(delta) : -1;
  return ::nnmark_sim::from_bits<T>(::nnmark_sim::warp_exchange(mask, ::nnmark_sim::to_bits(v), src));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = ::nnmark_sim::lane_id();
  const int src = (lane & (width - 1)) >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : -1;
  return ::nnmark_sim::from_bits<T>(::nnmark_sim::warp_exchange(mask, ::nnmark_sim::to_bits(v), src));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = ::nnmark_sim::lane_id();
  const int src = lane ^ lane_mask;  // a later group of `width` lanes gives the caller its own value
  const int end = (lane & ~(width - 1)) + width;
  return ::nnmark_sim::from_bits<T>(::nnmark_sim::warp_exchange(mask, ::nnmark_sim::to_bits(v), src < end ? src : -1));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return static_cast<unsigned>(::nnmark_sim::warp_gather(mask, pred != 0));
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return (__ballot_sync(mask, pred) & mask) == mask; }

inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }
template <typename T>
T __ldg(const T* p) { return *p; }

// Blocks run one at a time on one host thread, so a plain read-modify-write is atomic.
template <typename T>
T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}

// ---- 16-bit floats (only the conversions the kernels use) -----------------------
struct __half { uint16_t x; };
struct __nv_bfloat16 { uint16_t x; };
inline float __half2float(__half h) { return ::nnmark::half_to_float(h.x); }
inline float __bfloat162float(__nv_bfloat16 h) { return ::nnmark::bf16_to_float(h.x); }

// ---- runtime API (host memory, one simulated device, synchronous streams) -------
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorLaunchFailure = 719,
};
enum cudaMemcpyKind { cudaMemcpyHostToHost, cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
enum cudaMemPoolAttr { cudaMemPoolAttrReleaseThreshold = 4 };
struct CUstream_st;
using cudaStream_t = CUstream_st*;
struct CUmemPool_st;
using cudaMemPool_t = CUmemPool_st*;

const char* cudaGetErrorString(cudaError_t e);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
cudaError_t cudaGetDeviceCount(int* n);
cudaError_t cudaGetDevice(int* d);
cudaError_t cudaSetDevice(int d);
cudaError_t cudaRuntimeGetVersion(int* v);
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int device);
cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t s);
cudaError_t cudaFreeAsync(void* p, cudaStream_t s);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t s);
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t s);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaDeviceGetDefaultMemPool(cudaMemPool_t* pool, int device);
cudaError_t cudaMemPoolSetAttribute(cudaMemPool_t pool, cudaMemPoolAttr a, void* value);
int sim_blocks_per_sm(int threads);  // as a GPU with 2048 threads per SM
template <typename K>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, K, int threads, size_t) {
  *n = sim_blocks_per_sm(threads);
  return cudaSuccess;
}

namespace nnmark_sim {
// Test hooks (the _C_cudasim module exposes them).
enum class Order { kForward, kReverse, kShuffle };
void set_schedule(Order order, uint64_t seed);
void fail_next_mallocs(int n);  // the next n cudaMallocAsync calls run out of memory
int64_t live_allocations();     // cudaMallocAsync'd blocks not yet freed
}  // namespace nnmark_sim
