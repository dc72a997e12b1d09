// Run-time choice of the SIMD path: the wheel is built for a baseline x86-64
// (or any other CPU) and picks AVX-512 / AVX2 kernels when the CPU has them.
#pragma once
#include <string>

namespace nnmark {

enum class Isa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

Isa active_isa();                    // detected once; NNMARK_ISA=generic|avx2|avx512 caps it
void set_isa(const std::string& name);  // tests force each path; refuses one the CPU lacks
std::string isa_name(Isa isa);
std::string detected_isa_name();     // best the CPU supports

}  // namespace nnmark
