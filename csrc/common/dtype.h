// Dtype codes shared with python/nnmark/_arrays.py, and host conversions of the
// 16-bit floats (carriers may be float16/bfloat16; kernels accumulate in float32).
#pragma once
#include <cstdint>
#include <cstring>

#include "common/macros.h"

namespace nnmark {

enum DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

inline const char* dtype_name(int d) {
  switch (d) {
    case kFloat32: return "float32";
    case kFloat64: return "float64";
    case kFloat16: return "float16";
    case kBFloat16: return "bfloat16";
    default: return "unknown";
  }
}

inline void check_dtype(int d, const char* what) {
  NNMARK_CHECK_ARG(d >= kFloat32 && d <= kBFloat16, what, " has unknown dtype code ", d,
                   " (expected 0=float32, 1=float64, 2=float16, 3=bfloat16)");
}

inline float bf16_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  uint32_t u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((man & 0x400u) == 0) { man <<= 1; --exp; }
      man &= 0x3FFu;
      u = sign | (exp << 23) | (man << 13);
    }
  } else if (exp == 0x1F) {
    u = sign | 0x7F800000u | (man << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Element k of a row of dtype d, as Acc (float or double).
template <typename Acc>
inline Acc load_as(const void* base, int d, int64_t k) {
  switch (d) {
    case kFloat32: return static_cast<Acc>(static_cast<const float*>(base)[k]);
    case kFloat64: return static_cast<Acc>(static_cast<const double*>(base)[k]);
    case kFloat16: return static_cast<Acc>(half_to_float(static_cast<const uint16_t*>(base)[k]));
    default: return static_cast<Acc>(bf16_to_float(static_cast<const uint16_t*>(base)[k]));
  }
}

inline int64_t dtype_size(int d) { return d == kFloat64 ? 8 : (d == kFloat32 ? 4 : 2); }

}  // namespace nnmark
