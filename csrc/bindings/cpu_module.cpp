// _C_cpu: the always-built module. Takes raw addresses, sizes and dtype codes
// from python/nnmark/_arrays.py; never sees a torch object. The ops it shares with
// _C_cuda are bound by op_table.h; the rest are the CPU module's own.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <tuple>

#include "bindings/hashes.h"
#include "bindings/ledger_rows.h"
#include "bindings/op_table.h"
#include "common/philox.h"
#include "cpu/isa.h"
#include "cpu/parallel.h"

namespace py = pybind11;
using namespace nnmark;
using nnmark::bindings::bind_ops;
using nnmark::bindings::ptr;

namespace {

// The CPU kernels of op_table.h's ops: host pointers, nothing says where to run.
struct CpuKernels {
  static void projection_forward(const ProjectionForwardArgs& a) { projection_forward_cpu(a); }
  static void projection_backward(const ProjectionBackwardArgs& a) { projection_backward_cpu(a); }
  static void dense_forward(const DenseForwardArgs& a) { dense_forward_cpu(a); }
  static void dense_backward(const DenseBackwardArgs& a) { dense_backward_cpu(a); }
  static void trigger_verify(const TriggerVerifyArgs& a) { trigger_verify_cpu(a); }
  static void channel_stats(const ChannelStatsArgs& a) { channel_stats_cpu(a); }
  static MagnitudeSelection magnitude_select(const MagnitudeList& list, int64_t k) {
    return magnitude_select_cpu(list, k);
  }
  static void magnitude_prune(const MagnitudeList& list, int64_t k, const MagnitudeSelection& sel) {
    magnitude_prune_cpu(list, k, sel);
  }
};

}  // namespace

PYBIND11_MODULE(_C_cpu, m) {
  m.doc() = "nnmark CPU kernels";

  m.def("philox4x32_10",
        [](uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
          const Philox4 r = philox4x32_10(c0, c1, c2, c3, k0, k1);
          return std::make_tuple(r.v[0], r.v[1], r.v[2], r.v[3]);
        },
        py::arg("c0"), py::arg("c1"), py::arg("c2"), py::arg("c3"), py::arg("k0"), py::arg("k1"),
        "Philox4x32-10 of one counter under one key: four uint32 words.");

  bind_ops<CpuKernels>(m, std::tuple<>{});

  // One float64 carrier w [N] under K subkeys [K, 2] (uint32) -> p [K, T] float64.
  m.def("projection_many_keys",
        [](uintptr_t w /* [N] */, uintptr_t subkeys /* [K, 2] */, int64_t K, int64_t N, int64_t T,
           uintptr_t p /* [K, T] */) {
          projection_many_keys_cpu({ptr<const double>(w), ptr<const uint32_t>(subkeys), K, N, T, ptr<double>(p)});
        },
        py::arg("w"), py::arg("subkeys"), py::arg("K"), py::arg("N"), py::arg("T"), py::arg("p"),
        py::call_guard<py::gil_scoped_release>());

  m.def("binomial_sf",
        [](int64_t h, int64_t n, double p) {
          NNMARK_CHECK_ARG(n >= 1, "number of trials must be >= 1, got ", n);
          NNMARK_CHECK_ARG(p > 0.0 && p < 1.0, "success probability must be in (0, 1), got ", p);
          return binomial_sf(h, n, p);
        },
        py::arg("h"), py::arg("n"), py::arg("p"),
        "Exact P[X >= h] for X ~ Binomial(n, p) (the p-value of trigger_verify).");

  bind_ledger_rows(m);
  bind_hashes(m);

  m.def("get_num_threads", &get_num_threads);
  m.def("set_num_threads", &set_num_threads, py::arg("n"));
  m.def("isa", [] { return isa_name(active_isa()); }, "SIMD path in use: generic, avx2 or avx512");
  m.def("detected_isa", &detected_isa_name, "best SIMD path this CPU supports");
  m.def("set_isa", &set_isa, py::arg("name"));
#ifdef NNMARK_CXX_COMPILER
  m.attr("compiler") = NNMARK_CXX_COMPILER;
#else
  m.attr("compiler") = "unknown";
#endif
}
