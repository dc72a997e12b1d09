// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
// SC'11; the Random123 constants). One header for host and device so CPU and
// CUDA kernels draw the same projection bits (key spec v1, DESIGN.md §4).
#pragma once
#include <cstdint>

#include "common/macros.h"

namespace nnmark {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // sqrt(3) - 1
constexpr int kPhiloxRounds = 10;

struct Philox4 {
  uint32_t v[4];
};

NNMARK_HD void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3,
                            uint32_t k0, uint32_t k1) {
  const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
  const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
  const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
  const uint32_t n1 = static_cast<uint32_t>(p1);
  const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
  const uint32_t n3 = static_cast<uint32_t>(p0);
  c0 = n0; c1 = n1; c2 = n2; c3 = n3;
}

// Philox4x32-10 of counter (c0..c3) under key (k0, k1).
NNMARK_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < kPhiloxRounds; ++r) {
    philox_round(c0, c1, c2, c3, k0, k1);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// Key spec v1: the 128 projection bits of column i, row block b (rows 128b..128b+127).
// Bit j of the block is (v[j >> 5] >> (j & 31)) & 1; X[t, i] = +1 if set, else -1.
NNMARK_HD Philox4 projection_block(uint64_t i, uint32_t b, uint32_t k0, uint32_t k1) {
  return philox4x32_10(static_cast<uint32_t>(i), static_cast<uint32_t>(i >> 32), b, 0u, k0, k1);
}

}  // namespace nnmark
