// CUDA error checks that carry file, line and the failing call (as tiny-cuda-nn does).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

// A failed call also sets CUDA's last error; it is read (and so cleared) before the
// throw, so that once the caller has handled a recoverable error (out of memory, a bad
// launch shape) the next good call does not report it again. Sticky errors (a device
// fault) stay: the runtime keeps returning them until the process ends.
#define NNMARK_CUDA_CHECK(call)                                                        \
  do {                                                                                 \
    const cudaError_t nnmark_err_ = (call);                                            \
    if (nnmark_err_ != cudaSuccess) {                                                  \
      (void)cudaGetLastError();                                                        \
      throw std::runtime_error(std::string("nnmark: CUDA error at ") + __FILE__ + ":" + \
                               std::to_string(__LINE__) + " in `" #call "`: " +        \
                               cudaGetErrorString(nnmark_err_));                       \
    }                                                                                  \
  } while (0)

// kernel<<<grid, block, smem, stream>>>(args) is written
// NNMARK_LAUNCH(grid, block, smem, stream, kernel)(args), and dynamic shared memory
// NNMARK_DYNAMIC_SHARED(type, name), so that the simulator (csrc/cudasim/sim.h, which
// defines both its own way) can build the same sources with a host compiler.
#ifndef NNMARK_LAUNCH
#define NNMARK_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define NNMARK_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

namespace nnmark {

// Makes `device` current for the scope, restoring the previous one after.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    NNMARK_CUDA_CHECK(cudaGetDevice(&previous_));
    if (device != previous_) NNMARK_CUDA_CHECK(cudaSetDevice(device));
    device_ = device;
  }
  ~DeviceGuard() {
    if (device_ != previous_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0, device_ = 0;
};

// Scratch comes from the device's default memory pool; keeping freed memory in the
// pool (instead of returning it at each synchronisation) makes the next call's
// cudaMallocAsync a cheap reuse. Not torch's caching allocator: the modules do not link
// libtorch (README, "CUDA scratch memory and graphs"); where a CUDA graph needs it, the
// Python side allocates the scratch through torch and passes it in
// (magnitude_select_device_cuda, nnmark.ops.MagnitudeSelector).
inline void keep_pool_memory() {
  int dev = 0;
  NNMARK_CUDA_CHECK(cudaGetDevice(&dev));
  static bool done[64] = {};
  if (dev < 64 && !done[dev]) {
    cudaMemPool_t pool;
    NNMARK_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, dev));
    uint64_t keep = UINT64_MAX;
    NNMARK_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
    done[dev] = true;
  }
}

inline int sm_count() {
  int dev = 0, sms = 0;
  NNMARK_CUDA_CHECK(cudaGetDevice(&dev));
  NNMARK_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return sms;
}

}  // namespace nnmark
