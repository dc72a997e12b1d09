// _C_cpu: the always-built module. Takes raw addresses, sizes and dtype codes
// from python/nnmark/_arrays.py; never sees a torch object.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <tuple>
#include <vector>

#include "bindings/ledger_rows.h"
#include "common/philox.h"
#include "cpu/isa.h"
#include "cpu/parallel.h"
#include "ops/channel_stats.h"
#include "ops/dense_projection.h"
#include "ops/magnitude_select.h"
#include "ops/projection.h"
#include "ops/trigger_verify.h"

namespace py = pybind11;
using namespace nnmark;

namespace {
template <typename T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }
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

  m.def("projection_forward",
        [](uintptr_t w, int w_dtype, int64_t C, int64_t N, int64_t T, uint32_t k0, uint32_t k1,
           uintptr_t p, int64_t col0) {
          projection_forward_cpu({ptr<const void>(w), w_dtype, C, N, T, k0, k1, ptr<void>(p), col0});
        },
        py::arg("w"), py::arg("w_dtype"), py::arg("C"), py::arg("N"), py::arg("T"), py::arg("k0"),
        py::arg("k1"), py::arg("p"), py::arg("col0") = 0, py::call_guard<py::gil_scoped_release>());

  m.def("projection_backward",
        [](uintptr_t gp, int gp_dtype, int64_t C, int64_t N, int64_t T, uint32_t k0, uint32_t k1,
           uintptr_t gw, int64_t col0) {
          projection_backward_cpu({ptr<const void>(gp), gp_dtype, C, N, T, k0, k1, ptr<void>(gw), col0});
        },
        py::arg("gp"), py::arg("gp_dtype"), py::arg("C"), py::arg("N"), py::arg("T"), py::arg("k0"),
        py::arg("k1"), py::arg("gw"), py::arg("col0") = 0, py::call_guard<py::gil_scoped_release>());

  // One float64 carrier w [N] under K subkeys [K, 2] (uint32) -> p [K, T] float64.
  m.def("projection_many_keys",
        [](uintptr_t w, uintptr_t subkeys, int64_t K, int64_t N, int64_t T, uintptr_t p) {
          projection_many_keys_cpu({ptr<const double>(w), ptr<const uint32_t>(subkeys), K, N, T, ptr<double>(p)});
        },
        py::arg("w"), py::arg("subkeys"), py::arg("K"), py::arg("N"), py::arg("T"), py::arg("p"),
        py::call_guard<py::gil_scoped_release>());

  m.def("dense_forward",
        [](uintptr_t x, int x_dtype, uintptr_t w, int w_dtype, int64_t C, int64_t N, int64_t T,
           uintptr_t p) {
          dense_forward_cpu({ptr<const void>(x), x_dtype, ptr<const void>(w), w_dtype, C, N, T, ptr<void>(p)});
        },
        py::arg("x"), py::arg("x_dtype"), py::arg("w"), py::arg("w_dtype"), py::arg("C"), py::arg("N"),
        py::arg("T"), py::arg("p"), py::call_guard<py::gil_scoped_release>());

  m.def("dense_backward",
        [](uintptr_t x, int x_dtype, uintptr_t gp, int64_t C, int64_t N, int64_t T, uintptr_t gw) {
          dense_backward_cpu({ptr<const void>(x), x_dtype, ptr<const void>(gp), C, N, T, ptr<void>(gw)});
        },
        py::arg("x"), py::arg("x_dtype"), py::arg("gp"), py::arg("C"), py::arg("N"), py::arg("T"),
        py::arg("gw"), py::call_guard<py::gil_scoped_release>());

  m.def("trigger_verify",
        [](uintptr_t logits, int logits_dtype, uintptr_t labels, int64_t K, int64_t B, int64_t C,
           double null_rate, uintptr_t hits, uintptr_t margin, uintptr_t p_value) {
          trigger_verify_cpu({ptr<const void>(logits), logits_dtype, ptr<const int64_t>(labels), K, B, C,
                              null_rate, ptr<int64_t>(hits), ptr<double>(margin), ptr<double>(p_value)});
        },
        py::arg("logits"), py::arg("logits_dtype"), py::arg("labels"), py::arg("K"), py::arg("B"),
        py::arg("C"), py::arg("null_rate"), py::arg("hits"), py::arg("margin"), py::arg("p_value"),
        py::call_guard<py::gil_scoped_release>());

  m.def("binomial_sf",
        [](int64_t h, int64_t n, double p) {
          NNMARK_CHECK_ARG(n >= 1, "number of trials must be >= 1, got ", n);
          NNMARK_CHECK_ARG(p > 0.0 && p < 1.0, "success probability must be in (0, 1), got ", p);
          return binomial_sf(h, n, p);
        },
        py::arg("h"), py::arg("n"), py::arg("p"),
        "Exact P[X >= h] for X ~ Binomial(n, p) (the p-value of trigger_verify).");

  // Lists of tensors come as lists of (address, size, dtype code).
  m.def("magnitude_select",
        [](const std::vector<uintptr_t>& ptrs, const std::vector<int64_t>& sizes, const std::vector<int>& dtypes,
           int64_t k) {
          NNMARK_CHECK_ARG(ptrs.size() == sizes.size() && sizes.size() == dtypes.size(),
                           "ptrs, sizes and dtypes differ in length");
          std::vector<const void*> data(ptrs.size());
          for (size_t i = 0; i < ptrs.size(); ++i) data[i] = reinterpret_cast<const void*>(ptrs[i]);
          MagnitudeSelection s;
          {
            py::gil_scoped_release release;
            s = magnitude_select_cpu({data.data(), sizes.data(), dtypes.data(), static_cast<int64_t>(ptrs.size())}, k);
          }
          return std::make_tuple(s.threshold, s.below, s.equal);
        },
        py::arg("ptrs"), py::arg("sizes"), py::arg("dtypes"), py::arg("k"));
  m.def("magnitude_prune",
        [](const std::vector<uintptr_t>& ptrs, const std::vector<int64_t>& sizes, const std::vector<int>& dtypes,
           int64_t k, double threshold, int64_t below, int64_t equal) {
          NNMARK_CHECK_ARG(ptrs.size() == sizes.size() && sizes.size() == dtypes.size(),
                           "ptrs, sizes and dtypes differ in length");
          std::vector<const void*> data(ptrs.size());
          for (size_t i = 0; i < ptrs.size(); ++i) data[i] = reinterpret_cast<const void*>(ptrs[i]);
          py::gil_scoped_release release;
          magnitude_prune_cpu({data.data(), sizes.data(), dtypes.data(), static_cast<int64_t>(ptrs.size())}, k,
                              {threshold, below, equal});
        },
        py::arg("ptrs"), py::arg("sizes"), py::arg("dtypes"), py::arg("k"), py::arg("threshold"), py::arg("below"),
        py::arg("equal"));

  // Adds the per-channel sum and count of x > 0 of x into sums [C] (float64) and
  // positives [C] (int64); x is [B, C, S], or [B, S, C] when channels_last.
  m.def("channel_stats",
        [](uintptr_t x, int x_dtype, int64_t B, int64_t C, int64_t S, bool channels_last, uintptr_t sums,
           uintptr_t positives) {
          channel_stats_cpu({ptr<const void>(x), x_dtype, B, C, S, channels_last, ptr<double>(sums),
                             ptr<int64_t>(positives)});
        },
        py::arg("x"), py::arg("x_dtype"), py::arg("B"), py::arg("C"), py::arg("S"), py::arg("channels_last"),
        py::arg("sums"), py::arg("positives"), py::call_guard<py::gil_scoped_release>());

  bind_ledger_rows(m);

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
