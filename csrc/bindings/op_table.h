// The ops that _C_cpu and _C_cuda share (and _C_cudasim, cuda_module.cpp built on the
// CUDA simulator), each op's Python name, arguments, defaults and GIL handling written
// once. Addresses and sizes come as integers (python/nnmark/_arrays.py, data_ptr()).
//
//   bind_ops<Kernels>(m, std::tuple<Where...>{}, where_args...)
//
// defines every op as (its own arguments..., Where... where), named by its py::arg list
// and then where_args, and has it call Kernels::<op>(op arguments, where...). Where says
// where to run: nothing on the CPU (cpu_module.cpp), (int device, uintptr_t stream) on
// CUDA (cuda_module.cpp), whose Kernels make the device current and launch on the stream.
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "common/macros.h"
#include "ops/channel_stats.h"
#include "ops/dense_projection.h"
#include "ops/magnitude_select.h"
#include "ops/projection.h"
#include "ops/trigger_verify.h"

namespace nnmark::bindings {

namespace py = pybind11;

template <typename T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

// A list of tensors comes as lists of (address, size, dtype code). The result views the
// three lists and `data` (filled here), which must outlive it.
inline MagnitudeList magnitude_list(const std::vector<uintptr_t>& ptrs, const std::vector<int64_t>& sizes,
                                    const std::vector<int>& dtypes, std::vector<const void*>& data) {
  NNMARK_CHECK_ARG(ptrs.size() == sizes.size() && sizes.size() == dtypes.size(),
                   "ptrs, sizes and dtypes differ in length");
  data.resize(ptrs.size());
  for (size_t i = 0; i < ptrs.size(); ++i) data[i] = reinterpret_cast<const void*>(ptrs[i]);
  return {data.data(), sizes.data(), dtypes.data(), static_cast<int64_t>(ptrs.size())};
}

// The argument `name`, with its default only when it is last in Python: on CUDA the
// device and stream follow it, so there it has none.
template <bool last, typename V>
auto default_if_last(const char* name, V value) {
  if constexpr (last) {
    return py::arg_v(name, value);
  } else {
    return py::arg(name);
  }
}

template <class Kernels, class... Where, class... WhereArg>
void bind_ops(py::module_& m, std::tuple<Where...>, WhereArg... where_args) {
  using release_gil = py::call_guard<py::gil_scoped_release>;
  constexpr bool col0_last = sizeof...(Where) == 0;

  m.def("projection_forward",
        [](uintptr_t w /* [C, N] */, int w_dtype, int64_t C, int64_t N, int64_t T, uint32_t k0, uint32_t k1,
           uintptr_t p /* [C, T] */, int64_t col0, Where... where) {
          Kernels::projection_forward({ptr<const void>(w), w_dtype, C, N, T, k0, k1, ptr<void>(p), col0}, where...);
        },
        py::arg("w"), py::arg("w_dtype"), py::arg("C"), py::arg("N"), py::arg("T"), py::arg("k0"), py::arg("k1"),
        py::arg("p"), default_if_last<col0_last>("col0", 0), where_args..., release_gil());

  m.def("projection_backward",
        [](uintptr_t gp /* [C, T] */, int gp_dtype, int64_t C, int64_t N, int64_t T, uint32_t k0, uint32_t k1,
           uintptr_t gw /* [C, N] */, int64_t col0, Where... where) {
          Kernels::projection_backward({ptr<const void>(gp), gp_dtype, C, N, T, k0, k1, ptr<void>(gw), col0},
                                       where...);
        },
        py::arg("gp"), py::arg("gp_dtype"), py::arg("C"), py::arg("N"), py::arg("T"), py::arg("k0"), py::arg("k1"),
        py::arg("gw"), default_if_last<col0_last>("col0", 0), where_args..., release_gil());

  m.def("dense_forward",
        [](uintptr_t x /* [T, N] */, int x_dtype, uintptr_t w /* [C, N] */, int w_dtype, int64_t C, int64_t N,
           int64_t T, uintptr_t p /* [C, T] */, Where... where) {
          Kernels::dense_forward({ptr<const void>(x), x_dtype, ptr<const void>(w), w_dtype, C, N, T, ptr<void>(p)},
                                 where...);
        },
        py::arg("x"), py::arg("x_dtype"), py::arg("w"), py::arg("w_dtype"), py::arg("C"), py::arg("N"), py::arg("T"),
        py::arg("p"), where_args..., release_gil());

  m.def("dense_backward",
        [](uintptr_t x /* [T, N] */, int x_dtype, uintptr_t gp /* [C, T] */, int64_t C, int64_t N, int64_t T,
           uintptr_t gw /* [C, N] */, Where... where) {
          Kernels::dense_backward({ptr<const void>(x), x_dtype, ptr<const void>(gp), C, N, T, ptr<void>(gw)},
                                  where...);
        },
        py::arg("x"), py::arg("x_dtype"), py::arg("gp"), py::arg("C"), py::arg("N"), py::arg("T"), py::arg("gw"),
        where_args..., release_gil());

  m.def("trigger_verify",
        [](uintptr_t logits /* [K, B, C] */, int logits_dtype, uintptr_t labels /* [B] */, int64_t K, int64_t B,
           int64_t C, double null_rate, uintptr_t hits /* [K] */, uintptr_t margin /* [K] */,
           uintptr_t p_value /* [K] */, Where... where) {
          Kernels::trigger_verify({ptr<const void>(logits), logits_dtype, ptr<const int64_t>(labels), K, B, C,
                                   null_rate, ptr<int64_t>(hits), ptr<double>(margin), ptr<double>(p_value)},
                                  where...);
        },
        py::arg("logits"), py::arg("logits_dtype"), py::arg("labels"), py::arg("K"), py::arg("B"), py::arg("C"),
        py::arg("null_rate"), py::arg("hits"), py::arg("margin"), py::arg("p_value"), where_args..., release_gil());

  // Adds the per-channel sum and count of x > 0 of x into sums (float64) and positives (int64).
  m.def("channel_stats",
        [](uintptr_t x /* [B, C, S], or [B, S, C] when channels_last */, int x_dtype, int64_t B, int64_t C,
           int64_t S, bool channels_last, uintptr_t sums /* [C] */, uintptr_t positives /* [C] */, Where... where) {
          Kernels::channel_stats({ptr<const void>(x), x_dtype, B, C, S, channels_last, ptr<double>(sums),
                                  ptr<int64_t>(positives)},
                                 where...);
        },
        py::arg("x"), py::arg("x_dtype"), py::arg("B"), py::arg("C"), py::arg("S"), py::arg("channels_last"),
        py::arg("sums"), py::arg("positives"), where_args..., release_gil());

  // The lists are read with the GIL held; only the kernel runs without it.
  m.def("magnitude_select",
        [](const std::vector<uintptr_t>& ptrs /* [L] tensors of sizes[l] elements */,
           const std::vector<int64_t>& sizes, const std::vector<int>& dtypes, int64_t k, Where... where) {
          std::vector<const void*> data;
          const MagnitudeList list = magnitude_list(ptrs, sizes, dtypes, data);
          MagnitudeSelection s;
          {
            py::gil_scoped_release release;
            s = Kernels::magnitude_select(list, k, where...);
          }
          return std::make_tuple(s.threshold, s.below, s.equal);
        },
        py::arg("ptrs"), py::arg("sizes"), py::arg("dtypes"), py::arg("k"), where_args...);

  m.def("magnitude_prune",
        [](const std::vector<uintptr_t>& ptrs /* [L] tensors of sizes[l] elements */,
           const std::vector<int64_t>& sizes, const std::vector<int>& dtypes, int64_t k, double threshold,
           int64_t below, int64_t equal, Where... where) {
          std::vector<const void*> data;
          const MagnitudeList list = magnitude_list(ptrs, sizes, dtypes, data);
          py::gil_scoped_release release;
          Kernels::magnitude_prune(list, k, {threshold, below, equal}, where...);
        },
        py::arg("ptrs"), py::arg("sizes"), py::arg("dtypes"), py::arg("k"), py::arg("threshold"), py::arg("below"),
        py::arg("equal"), where_args...);
}

}  // namespace nnmark::bindings
