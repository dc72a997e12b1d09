// CUDA error checks that carry file, line and the failing call (as tiny-cuda-nn does).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#define NNMARK_CUDA_CHECK(call)                                                        \
  do {                                                                                 \
    const cudaError_t nnmark_err_ = (call);                                            \
    if (nnmark_err_ != cudaSuccess)                                                    \
      throw std::runtime_error(std::string("nnmark: CUDA error at ") + __FILE__ + ":" + \
                               std::to_string(__LINE__) + " in `" #call "`: " +        \
                               cudaGetErrorString(nnmark_err_));                       \
  } while (0)

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
// cudaMallocAsync a cheap reuse.
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
