// _C_cuda: the optional module. The ops of _C_cpu (op_table.h) on device pointers, each
// with two more arguments: the device index (made current for the call) and the caller's
// CUDA stream; plus the CUDA module's own calls below.
// Built a second time against the CUDA simulator (NNMARK_CUDA_SIM=ON) as _C_cudasim,
// where "device pointers" are host pointers (docs/cuda_sim.md).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime.h>

#include <string>
#include <tuple>
#include <vector>

#include "bindings/op_table.h"
#include "cuda/cuda_check.h"

#ifndef NNMARK_CUDA_MODULE
#define NNMARK_CUDA_MODULE _C_cuda
#endif

namespace py = pybind11;
using namespace nnmark;
using nnmark::bindings::bind_ops;
using nnmark::bindings::magnitude_list;
using nnmark::bindings::ptr;

namespace {

// The CUDA kernels of op_table.h's ops: `device` is current while each is launched on
// `stream` (a cudaStream_t as an integer). op_table.h calls them without the GIL.
struct CudaKernels {
  static void projection_forward(const ProjectionForwardArgs& a, int device, uintptr_t stream) {
    DeviceGuard guard(device);
    projection_forward_cuda(a, stream);
  }
  static void projection_backward(const ProjectionBackwardArgs& a, int device, uintptr_t stream) {
    DeviceGuard guard(device);
    projection_backward_cuda(a, stream);
  }
  static void dense_forward(const DenseForwardArgs& a, int device, uintptr_t stream) {
    DeviceGuard guard(device);
    dense_forward_cuda(a, stream);
  }
  static void dense_backward(const DenseBackwardArgs& a, int device, uintptr_t stream) {
    DeviceGuard guard(device);
    dense_backward_cuda(a, stream);
  }
  static void trigger_verify(const TriggerVerifyArgs& a, int device, uintptr_t stream) {
    DeviceGuard guard(device);
    trigger_verify_cuda(a, stream);
  }
  static void channel_stats(const ChannelStatsArgs& a, int device, uintptr_t stream) {
    DeviceGuard guard(device);
    channel_stats_cuda(a, stream);
  }
  static MagnitudeSelection magnitude_select(const MagnitudeList& list, int64_t k, int device, uintptr_t stream) {
    DeviceGuard guard(device);
    return magnitude_select_cuda(list, k, stream);
  }
  static void magnitude_prune(const MagnitudeList& list, int64_t k, const MagnitudeSelection& sel, int device,
                              uintptr_t stream) {
    DeviceGuard guard(device);
    magnitude_prune_cuda(list, k, sel, stream);
  }
};

}  // namespace

PYBIND11_MODULE(NNMARK_CUDA_MODULE, m) {
  m.doc() = "nnmark CUDA kernels";

  bind_ops<CudaKernels>(m, std::tuple<int, uintptr_t>{}, py::arg("device"), py::arg("stream"));

  // The capturable select: plan on the host (before any capture), then device-only launches.
  m.def("magnitude_select_plan",
        [](const std::vector<uintptr_t>& ptrs /* [L] tensors of sizes[l] elements */,
           const std::vector<int64_t>& sizes, const std::vector<int>& dtypes) {
          std::vector<const void*> data;
          const MagnitudeSelectPlan plan = magnitude_select_plan_cuda(magnitude_list(ptrs, sizes, dtypes, data));
          return std::make_tuple(py::bytes(reinterpret_cast<const char*>(plan.table.data()), plan.table.size()),
                                 plan.nchunks, plan.total, plan.key64, plan.scratch_bytes);
        },
        py::arg("ptrs"), py::arg("sizes"), py::arg("dtypes"));
  m.def("magnitude_select_device",
        [](uintptr_t table /* [nchunks] chunks: the plan's table bytes, on the device */, int64_t nchunks,
           bool key64, int64_t total, int64_t k, uintptr_t scratch /* [scratch_bytes] bytes */,
           int64_t scratch_bytes, uintptr_t threshold /* [1] float64 */, uintptr_t counts /* [2] int64 */,
           int device, uintptr_t stream) {
          DeviceGuard guard(device);
          magnitude_select_device_cuda(ptr<const void>(table), nchunks, key64, total, k, ptr<void>(scratch),
                                       scratch_bytes, ptr<double>(threshold), ptr<int64_t>(counts), stream);
        },
        py::arg("table"), py::arg("nchunks"), py::arg("key64"), py::arg("total"), py::arg("k"), py::arg("scratch"),
        py::arg("scratch_bytes"), py::arg("threshold"), py::arg("counts"), py::arg("device"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());

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
