// The ledger's row encoder and MAC (see ledger_rows.cpp), bound into _C_cpu.
#pragma once
#include <pybind11/pybind11.h>

namespace nnmark {
void bind_ledger_rows(pybind11::module_& m);
}  // namespace nnmark
