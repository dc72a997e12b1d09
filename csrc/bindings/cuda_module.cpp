// _C_cuda: the optional module. Same ops as _C_cpu on device pointers, plus the
// device index (made current for the call) and the caller's CUDA stream.
// Built a second time against the CUDA simulator (NNMARK_CUDA_SIM=ON) as _C_cudasim,
// where "device pointers" are host pointers (docs/cuda_sim.md).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime.h>

#include <string>
#include <tuple>
#include <vector>

#include "cuda/cuda_check.h"
#include "ops/channel_stats.h"
#include "ops/dense_projection.h"
#include "ops/magnitude_select.h"
#include "ops/projection.h"
#include "ops/trigger_verify.h"

#ifndef NNMARK_CUDA_MODULE
#define NNMARK_CUDA_MODULE _C_cuda
#endif

namespace py = pybind11;
using namespace nnmark;

namespace {
template <typename T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }
}  // namespace

PYBIND11_MODULE(NNMARK_CUDA_MODULE, m) {
  m.doc() = "nnmark CUDA kernels";

  m.def("projection_forward",
        [](uintptr_t w, int w_dtype, int64_t C, int64_t N, int64_t T, uint32_t k0, uint32_t k1,
           uintptr_t p, int64_t col0, int device, uintptr_t stream) {
          DeviceGuard guard(device);
          projection_forward_cuda({ptr<const void>(w), w_dtype, C, N, T, k0, k1, ptr<void>(p), col0}, stream);
        },
        py::arg("w"), py::arg("w_dtype"), py::arg("C"), py::arg("N"), py::arg("T"), py::arg("k0"),
        py::arg("k1"), py::arg("p"), py::arg("col0"), py::arg("device"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());

  m.def("projection_backward",
        [](uintptr_t gp, int gp_dtype, int64_t C, int64_t N, int64_t T, uint32_t k0, uint32_t k1,
           uintptr_t gw, int64_t col0, int device, uintptr_t stream) {
          DeviceGuard guard(device);
          projection_backward_cuda({ptr<const void>(gp), gp_dtype, C, N, T, k0, k1, ptr<void>(gw), col0}, stream);
        },
        py::arg("gp"), py::arg("gp_dtype"), py::arg("C"), py::arg("N"), py::arg("T"), py::arg("k0"),
        py::arg("k1"), py::arg("gw"), py::arg("col0"), py::arg("device"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());

  m.def("dense_forward",
        [](uintptr_t x, int x_dtype, uintptr_t w, int w_dtype, int64_t C, int64_t N, int64_t T,
           uintptr_t p, int device, uintptr_t stream) {
          DeviceGuard guard(device);
          dense_forward_cuda({ptr<const void>(x), x_dtype, ptr<const void>(w), w_dtype, C, N, T, ptr<void>(p)}, stream);
        },
        py::arg("x"), py::arg("x_dtype"), py::arg("w"), py::arg("w_dtype"), py::arg("C"), py::arg("N"),
        py::arg("T"), py::arg("p"), py::arg("device"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());

  m.def("dense_backward",
        [](uintptr_t x, int x_dtype, uintptr_t gp, int64_t C, int64_t N, int64_t T, uintptr_t gw,
           int device, uintptr_t stream) {
          DeviceGuard guard(device);
          dense_backward_cuda({ptr<const void>(x), x_dtype, ptr<const void>(gp), C, N, T, ptr<void>(gw)}, stream);
        },
        py::arg("x"), py::arg("x_dtype"), py::arg("gp"), py::arg("C"), py::arg("N"), py::arg("T"),
        py::arg("gw"), py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());

  m.def("trigger_verify",
        [](uintptr_t logits, int logits_dtype, uintptr_t labels, int64_t K, int64_t B, int64_t C,
           double null_rate, uintptr_t hits, uintptr_t margin, uintptr_t p_value, int device,
           uintptr_t stream) {
          DeviceGuard guard(device);
          trigger_verify_cuda({ptr<const void>(logits), logits_dtype, ptr<const int64_t>(labels), K, B, C,
                               null_rate, ptr<int64_t>(hits), ptr<double>(margin), ptr<double>(p_value)},
                              stream);
        },
        py::arg("logits"), py::arg("logits_dtype"), py::arg("labels"), py::arg("K"), py::arg("B"),
        py::arg("C"), py::arg("null_rate"), py::arg("hits"), py::arg("margin"), py::arg("p_value"),
        py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());

  m.def("channel_stats",
        [](uintptr_t x, int x_dtype, int64_t B, int64_t C, int64_t S, bool channels_last, uintptr_t sums,
           uintptr_t positives, int device, uintptr_t stream) {
          DeviceGuard guard(device);
          channel_stats_cuda({ptr<const void>(x), x_dtype, B, C, S, channels_last, ptr<double>(sums),
                              ptr<int64_t>(positives)},
                             stream);
        },
        py::arg("x"), py::arg("x_dtype"), py::arg("B"), py::arg("C"), py::arg("S"), py::arg("channels_last"),
        py::arg("sums"), py::arg("positives"), py::arg("device"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());

  // Lists of tensors come as lists of (address, size, dtype code), as in _C_cpu.
  m.def("magnitude_select",
        [](const std::vector<uintptr_t>& ptrs, const std::vector<int64_t>& sizes, const std::vector<int>& dtypes,
           int64_t k, int device, uintptr_t stream) {
          NNMARK_CHECK_ARG(ptrs.size() == sizes.size() && sizes.size() == dtypes.size(),
                           "ptrs, sizes and dtypes differ in length");
          std::vector<const void*> data(ptrs.size());
          for (size_t i = 0; i < ptrs.size(); ++i) data[i] = reinterpret_cast<const void*>(ptrs[i]);
          MagnitudeSelection s;
          {
            py::gil_scoped_release release;
            DeviceGuard guard(device);
            s = magnitude_select_cuda({data.data(), sizes.data(), dtypes.data(), static_cast<int64_t>(ptrs.size())},
                                      k, stream);
          }
          return std::make_tuple(s.threshold, s.below, s.equal);
        },
        py::arg("ptrs"), py::arg("sizes"), py::arg("dtypes"), py::arg("k"), py::arg("device"), py::arg("stream"));
  // The capturable select: plan on the host (before any capture), then device-only launches.
  m.def("magnitude_select_plan",
        [](const std::vector<uintptr_t>& ptrs, const std::vector<int64_t>& sizes, const std::vector<int>& dtypes) {
          NNMARK_CHECK_ARG(ptrs.size() == sizes.size() && sizes.size() == dtypes.size(),
                           "ptrs, sizes and dtypes differ in length");
          std::vector<const void*> data(ptrs.size());
          for (size_t i = 0; i < ptrs.size(); ++i) data[i] = reinterpret_cast<const void*>(ptrs[i]);
          const MagnitudeSelectPlan plan = magnitude_select_plan_cuda(
              {data.data(), sizes.data(), dtypes.data(), static_cast<int64_t>(ptrs.size())});
          return std::make_tuple(py::bytes(reinterpret_cast<const char*>(plan.table.data()), plan.table.size()),
                                 plan.nchunks, plan.total, plan.key64, plan.scratch_bytes);
        },
        py::arg("ptrs"), py::arg("sizes"), py::arg("dtypes"));
  m.def("magnitude_select_device",
        [](uintptr_t table, int64_t nchunks, bool key64, int64_t total, int64_t k, uintptr_t scratch,
           int64_t scratch_bytes, uintptr_t threshold, uintptr_t counts, int device, uintptr_t stream) {
          DeviceGuard guard(device);
          magnitude_select_device_cuda(ptr<const void>(table), nchunks, key64, total, k, ptr<void>(scratch),
                                       scratch_bytes, ptr<double>(threshold), ptr<int64_t>(counts), stream);
        },
        py::arg("table"), py::arg("nchunks"), py::arg("key64"), py::arg("total"), py::arg("k"), py::arg("scratch"),
        py::arg("scratch_bytes"), py::arg("threshold"), py::arg("counts"), py::arg("device"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());
  m.def("magnitude_prune",
        [](const std::vector<uintptr_t>& ptrs, const std::vector<int64_t>& sizes, const std::vector<int>& dtypes,
           int64_t k, double threshold, int64_t below, int64_t equal, int device, uintptr_t stream) {
          NNMARK_CHECK_ARG(ptrs.size() == sizes.size() && sizes.size() == dtypes.size(),
                           "ptrs, sizes and dtypes differ in length");
          std::vector<const void*> data(ptrs.size());
          for (size_t i = 0; i < ptrs.size(); ++i) data[i] = reinterpret_cast<const void*>(ptrs[i]);
          py::gil_scoped_release release;
          DeviceGuard guard(device);
          magnitude_prune_cuda({data.data(), sizes.data(), dtypes.data(), static_cast<int64_t>(ptrs.size())}, k,
                               {threshold, below, equal}, stream);
        },
        py::arg("ptrs"), py::arg("sizes"), py::arg("dtypes"), py::arg("k"), py::arg("threshold"), py::arg("below"),
        py::arg("equal"), py::arg("device"), py::arg("stream"));

  m.def("device_count", [] {
    int n = 0;
    // No driver or no device is "zero devices", not an error: the module still imports.
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    return n;
  });
  m.def("runtime_version", [] {
    int v = 0;
    cudaRuntimeGetVersion(&v);
    return v;
  });
#ifdef NNMARK_CUDA_SIM
  m.attr("simulated") = true;
  // The order the simulator runs threads (between barriers) and blocks in.
  m.def("set_schedule", [](const std::string& order, uint64_t seed) {
    using nnmark_sim::Order;
    NNMARK_CHECK_ARG(order == "forward" || order == "reverse" || order == "shuffle",
                     "order must be 'forward', 'reverse' or 'shuffle', got '", order, "'");
    nnmark_sim::set_schedule(order == "forward" ? Order::kForward : order == "reverse" ? Order::kReverse : Order::kShuffle,
                             seed);
  }, py::arg("order"), py::arg("seed") = 0);
  m.def("fail_next_mallocs", &nnmark_sim::fail_next_mallocs, py::arg("n"));
  m.def("live_allocations", &nnmark_sim::live_allocations);
#else
  m.attr("simulated") = false;
#endif
#ifdef NNMARK_CUDA_ARCHS
  m.attr("archs") = NNMARK_CUDA_ARCHS;
#endif
#ifdef NNMARK_CUDA_VERSION
  m.attr("cuda_version") = NNMARK_CUDA_VERSION;
#endif
}
