// SHA-256 entry points of _C_cpu (see hashes.cpp).
#pragma once
#include <pybind11/pybind11.h>

namespace nnmark {
void bind_hashes(pybind11::module_& m);
}  // namespace nnmark
