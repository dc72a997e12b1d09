// CPU keyed projection (key spec v1). Work is split over columns of the carrier
// across threads; each thread draws the Philox bits of a chunk of columns once
// and applies them to all C carriers, so the hash is amortised over the batch.
//
// forward:  p[c, t] = sum_i X[t, i] w[c, i] = 2 * A[c, t] - S[c], where
//           A[c, t] = sum_{i : bit(t, i) = 1} w[c, i] and S[c] = sum_i w[c, i]:
//           a masked add per bit instead of a sign-add (one AVX-512 op per 16 bits).
// backward: gw[c, i] = 2 * sum_{t : bit(t, i) = 1} gp[c, t] - sum_t gp[c, t].
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define NNMARK_X86 1
#endif

#include "common/dtype.h"
#include "common/philox.h"
#include "cpu/isa.h"
#include "cpu/parallel.h"
#include "ops/projection.h"

namespace nnmark {

// ---------------------------------------------------------------- ISA choice
namespace {
Isa detect_isa() {
#if NNMARK_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2")) return Isa::kAvx2;
#endif
  return Isa::kGeneric;
}
Isa parse_isa(const std::string& s) {
  if (s == "generic") return Isa::kGeneric;
  if (s == "avx2") return Isa::kAvx2;
  if (s == "avx512") return Isa::kAvx512;
  throw std::invalid_argument("nnmark: unknown ISA '" + s + "' (expected generic, avx2 or avx512)");
}
Isa initial_isa() {
  Isa best = detect_isa();
  if (const char* env = std::getenv("NNMARK_ISA")) {
    try {
      const Isa want = parse_isa(env);
      if (static_cast<int>(want) < static_cast<int>(best)) best = want;
    } catch (const std::invalid_argument&) {
      // An unknown value is ignored at load time; set_isa() reports it.
    }
  }
  return best;
}
Isa g_isa = initial_isa();
}  // namespace

Isa active_isa() { return g_isa; }
std::string isa_name(Isa isa) {
  return isa == Isa::kAvx512 ? "avx512" : isa == Isa::kAvx2 ? "avx2" : "generic";
}
std::string detected_isa_name() { return isa_name(detect_isa()); }
void set_isa(const std::string& name) {
  const Isa want = parse_isa(name);
  NNMARK_CHECK_ARG(static_cast<int>(want) <= static_cast<int>(detect_isa()),
                   "this CPU does not support ISA '", name, "' (best: ", detected_isa_name(), ")");
  g_isa = want;
}

namespace {

constexpr int64_t kChunk = 256;  // columns whose Philox bits are drawn together
constexpr int64_t kBlock = 128;  // rows per Philox call (key spec v1)

// ------------------------------------------------------------- Philox bits
// Layout of a chunk's bits (structure of arrays): word q of column i0 + l is
// bits[q * kChunk + l], l < len <= kChunk.

void philox_fill_generic(uint64_t i0, int64_t len, uint32_t b, uint32_t k0, uint32_t k1, uint32_t* bits) {
  for (int64_t l = 0; l < len; ++l) {
    const Philox4 r = projection_block(i0 + static_cast<uint64_t>(l), b, k0, k1);
    for (int q = 0; q < 4; ++q) bits[q * kChunk + l] = r.v[q];
  }
}

#if NNMARK_X86
// hi and lo 32 bits of a * m for 16 uint32 lanes: two 32x32->64 multiplies (even
// and odd lanes), then shifts and blends gather the halves (two-source permutes
// measured no faster on Zen 4).
__attribute__((target("avx512f")))
inline void mulhilo_avx512(__m512i a, __m512i m, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, m);                        // lanes 0,2,.. as 64-bit
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);  // lanes 1,3,..
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

// The ten rounds are a dependency chain (multiply -> blend -> xor), so one group of
// 16 columns at a time is latency-bound: G groups advance together to fill the pipes.
template <int G>
__attribute__((target("avx512f"), always_inline))
inline void philox_groups_avx512(uint64_t base, uint32_t b, uint32_t k0, uint32_t k1, __m512i (&c)[4][G]) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(kPhiloxM1));
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int g = 0; g < G; ++g) {
    const uint64_t gb = base + 16u * static_cast<uint64_t>(g);
    const __m512i lo32 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(gb)));
    const __m512i hi32 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(gb >> 32)));
    c[0][g] = _mm512_add_epi32(lo32, lane);
    // Word 1 is the high half of i: carry where the low word wrapped inside the group.
    c[1][g] = _mm512_mask_add_epi32(hi32, _mm512_cmplt_epu32_mask(c[0][g], lo32), hi32, _mm512_set1_epi32(1));
    c[2][g] = _mm512_set1_epi32(static_cast<int>(b));
    c[3][g] = _mm512_setzero_si512();
  }
  uint32_t ka = k0, kb = k1;
  for (int r = 0; r < kPhiloxRounds; ++r) {
    const __m512i vka = _mm512_set1_epi32(static_cast<int>(ka)), vkb = _mm512_set1_epi32(static_cast<int>(kb));
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) {
      __m512i hi0, lo0, hi1, lo1;
      mulhilo_avx512(c[0][g], m0, hi0, lo0);
      mulhilo_avx512(c[2][g], m1, hi1, lo1);
      c[0][g] = _mm512_ternarylogic_epi32(hi1, c[1][g], vka, 0x96);  // 0x96: three-way xor
      c[2][g] = _mm512_ternarylogic_epi32(hi0, c[3][g], vkb, 0x96);
      c[1][g] = lo1;
      c[3][g] = lo0;
    }
    ka += kPhiloxW0;
    kb += kPhiloxW1;
  }
}

__attribute__((target("avx512f")))
void philox_fill_avx512(uint64_t i0, int64_t len, uint32_t b, uint32_t k0, uint32_t k1, uint32_t* bits) {
  constexpr int G = 4;
  int64_t l0 = 0;
  for (; l0 + 16 * G <= len; l0 += 16 * G) {
    __m512i c[4][G];
    philox_groups_avx512<G>(i0 + static_cast<uint64_t>(l0), b, k0, k1, c);
    for (int g = 0; g < G; ++g)
      for (int q = 0; q < 4; ++q) _mm512_storeu_si512(bits + q * kChunk + l0 + 16 * g, c[q][g]);
  }
  for (; l0 < len; l0 += 16) {
    __m512i c[4][1];
    philox_groups_avx512<1>(i0 + static_cast<uint64_t>(l0), b, k0, k1, c);
    const int64_t n = std::min<int64_t>(16, len - l0);
    const __mmask16 keep = static_cast<__mmask16>(n >= 16 ? 0xFFFF : ((1u << n) - 1));
    for (int q = 0; q < 4; ++q) _mm512_mask_storeu_epi32(bits + q * kChunk + l0, keep, c[q][0]);
  }
}

__attribute__((target("avx2")))
inline void mulhilo_avx2(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

__attribute__((target("avx2")))
void philox_fill_avx2(uint64_t i0, int64_t len, uint32_t b, uint32_t k0, uint32_t k1, uint32_t* bits) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  for (int64_t l0 = 0; l0 < len; l0 += 8) {
    alignas(32) uint32_t w0[8], w1[8];
    for (int l = 0; l < 8; ++l) {
      const uint64_t i = i0 + static_cast<uint64_t>(l0 + l);
      w0[l] = static_cast<uint32_t>(i);
      w1[l] = static_cast<uint32_t>(i >> 32);
    }
    __m256i c0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(w0));
    __m256i c1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(w1));
    __m256i c2 = _mm256_set1_epi32(static_cast<int>(b));
    __m256i c3 = _mm256_setzero_si256();
    uint32_t ka = k0, kb = k1;
    for (int r = 0; r < kPhiloxRounds; ++r) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo_avx2(c0, m0, hi0, lo0);
      mulhilo_avx2(c2, m1, hi1, lo1);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(ka)));
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(kb)));
      c1 = lo1;
      c3 = lo0;
      ka += kPhiloxW0;
      kb += kPhiloxW1;
    }
    const int64_t n = std::min<int64_t>(8, len - l0);
    alignas(32) uint32_t out[4][8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(out[0]), c0);
    _mm256_store_si256(reinterpret_cast<__m256i*>(out[1]), c1);
    _mm256_store_si256(reinterpret_cast<__m256i*>(out[2]), c2);
    _mm256_store_si256(reinterpret_cast<__m256i*>(out[3]), c3);
    for (int q = 0; q < 4; ++q)
      for (int64_t l = 0; l < n; ++l) bits[q * kChunk + l0 + l] = out[q][l];
  }
}
#endif  // NNMARK_X86

void philox_fill(Isa isa, uint64_t i0, int64_t len, uint32_t b, uint32_t k0, uint32_t k1,
                 uint32_t* bits /* [4, kChunk] */) {
#if NNMARK_X86
  if (isa == Isa::kAvx512) return philox_fill_avx512(i0, len, b, k0, k1, bits);
  if (isa == Isa::kAvx2) return philox_fill_avx2(i0, len, b, k0, k1, bits);
#endif
  (void)isa;
  philox_fill_generic(i0, len, b, k0, k1, bits);
}

// ------------------------------------------------- forward: masked column sums
// out[r] = sum_{l < len, bit r of column l set} w[l], r < 128; bits as philox_fill writes them.
// Nibble n -> its four bits as 0/1 (bit k of n at index k): the portable path
// turns four bits into one 4-wide multiply-add without variable shifts.
template <typename Acc>
struct NibbleTable {
  Acc v[16][4];
  constexpr NibbleTable() : v() {
    for (int n = 0; n < 16; ++n)
      for (int k = 0; k < 4; ++k) v[n][k] = static_cast<Acc>((n >> k) & 1);
  }
};

template <typename Acc>
void fwd_block_generic(const Acc* w /* [len] */, const uint32_t* bits /* [4, kChunk] */,
                       int64_t len, Acc* out /* [128] */) {
  static constexpr NibbleTable<Acc> table{};
  alignas(64) Acc acc[kBlock] = {};
  for (int64_t l = 0; l < len; ++l) {
    const Acc v = w[l];
    for (int q = 0; q < 4; ++q) {
      const uint32_t word = bits[q * kChunk + l];
      for (int k = 0; k < 8; ++k) {
        const Acc* pat = table.v[(word >> (4 * k)) & 15u];
        Acc* a = acc + 32 * q + 4 * k;
        for (int m = 0; m < 4; ++m) a[m] += v * pat[m];
      }
    }
  }
  std::memcpy(out, acc, sizeof(acc));
}

#if NNMARK_X86
// float32 forward on AVX-512, in fixed point: on Zen 4 and Intel cores integer adds
// issue on more ports than float adds, and the masked adds are the bottleneck. w holds a chunk of the
// carrier scaled by a power of two to |w| <= 2^22 (see quantize_chunk), so 256
// columns sum without overflow and the sums are exact.
__attribute__((target("avx512f")))
void fwd_block_avx512(const int32_t* w, const uint32_t* bits, int64_t len, int32_t* out) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  for (int64_t l = 0; l < len; ++l) {
    const __m512i v = _mm512_set1_epi32(w[l]);
    const uint32_t q[4] = {bits[l], bits[kChunk + l], bits[2 * kChunk + l], bits[3 * kChunk + l]};
    a0 = _mm512_mask_add_epi32(a0, static_cast<__mmask16>(q[0]), a0, v);
    a1 = _mm512_mask_add_epi32(a1, static_cast<__mmask16>(q[0] >> 16), a1, v);
    a2 = _mm512_mask_add_epi32(a2, static_cast<__mmask16>(q[1]), a2, v);
    a3 = _mm512_mask_add_epi32(a3, static_cast<__mmask16>(q[1] >> 16), a3, v);
    a4 = _mm512_mask_add_epi32(a4, static_cast<__mmask16>(q[2]), a4, v);
    a5 = _mm512_mask_add_epi32(a5, static_cast<__mmask16>(q[2] >> 16), a5, v);
    a6 = _mm512_mask_add_epi32(a6, static_cast<__mmask16>(q[3]), a6, v);
    a7 = _mm512_mask_add_epi32(a7, static_cast<__mmask16>(q[3] >> 16), a7, v);
  }
  _mm512_storeu_si512(out + 0, a0);   _mm512_storeu_si512(out + 16, a1);
  _mm512_storeu_si512(out + 32, a2);  _mm512_storeu_si512(out + 48, a3);
  _mm512_storeu_si512(out + 64, a4);  _mm512_storeu_si512(out + 80, a5);
  _mm512_storeu_si512(out + 96, a6);  _mm512_storeu_si512(out + 112, a7);
}

__attribute__((target("avx512f")))
void fwd_block_avx512(const double* w, const uint32_t* bits, int64_t len, double* out) {
  __m512d a[16];
  for (int g = 0; g < 16; ++g) a[g] = _mm512_setzero_pd();
  for (int64_t l = 0; l < len; ++l) {
    const __m512d v = _mm512_set1_pd(w[l]);
    const uint32_t q[4] = {bits[l], bits[kChunk + l], bits[2 * kChunk + l], bits[3 * kChunk + l]};
#pragma GCC unroll 16
    for (int g = 0; g < 16; ++g)  // lane k of a[g] is row 8g + k
      a[g] = _mm512_mask_add_pd(a[g], static_cast<__mmask8>(q[g >> 2] >> (8 * (g & 3))), a[g], v);
  }
  for (int g = 0; g < 16; ++g) _mm512_storeu_pd(out + 8 * g, a[g]);
}

__attribute__((target("avx2")))
void fwd_block_avx2(const float* w, const uint32_t* bits, int64_t len, float* out) {
  // sllv by 31 - (8g + k) moves bit 8g + k of a word into lane k's sign bit.
  const __m256i s0 = _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24);
  const __m256i eight = _mm256_set1_epi32(8);
  const __m256i s1 = _mm256_sub_epi32(s0, eight), s2 = _mm256_sub_epi32(s1, eight),
                s3 = _mm256_sub_epi32(s2, eight);
  const __m256 zero = _mm256_setzero_ps();
  for (int pass = 0; pass < 2; ++pass) {  // 64 rows (two words) per pass: 8 accumulators
    __m256 a[8];
    for (int g = 0; g < 8; ++g) a[g] = zero;
    for (int64_t l = 0; l < len; ++l) {
      const __m256 v = _mm256_set1_ps(w[l]);
      for (int h = 0; h < 2; ++h) {
        const __m256i bc = _mm256_set1_epi32(static_cast<int>(bits[(2 * pass + h) * kChunk + l]));
        a[4 * h + 0] = _mm256_add_ps(a[4 * h + 0], _mm256_blendv_ps(zero, v, _mm256_castsi256_ps(_mm256_sllv_epi32(bc, s0))));
        a[4 * h + 1] = _mm256_add_ps(a[4 * h + 1], _mm256_blendv_ps(zero, v, _mm256_castsi256_ps(_mm256_sllv_epi32(bc, s1))));
        a[4 * h + 2] = _mm256_add_ps(a[4 * h + 2], _mm256_blendv_ps(zero, v, _mm256_castsi256_ps(_mm256_sllv_epi32(bc, s2))));
        a[4 * h + 3] = _mm256_add_ps(a[4 * h + 3], _mm256_blendv_ps(zero, v, _mm256_castsi256_ps(_mm256_sllv_epi32(bc, s3))));
      }
    }
    for (int g = 0; g < 8; ++g) _mm256_storeu_ps(out + 64 * pass + 8 * g, a[g]);
  }
}

__attribute__((target("avx2")))
void fwd_block_avx2(const double* w, const uint32_t* bits, int64_t len, double* out) {
  // One word (32 rows) per pass; sllv by 63 - (4g + k) moves bit 4g + k to lane k's sign.
  __m256i sh[8];
  for (int g = 0; g < 8; ++g)
    sh[g] = _mm256_setr_epi64x(63 - 4 * g, 62 - 4 * g, 61 - 4 * g, 60 - 4 * g);
  const __m256d zero = _mm256_setzero_pd();
  for (int q = 0; q < 4; ++q) {
    __m256d a[8];
    for (int g = 0; g < 8; ++g) a[g] = zero;
    for (int64_t l = 0; l < len; ++l) {
      const __m256d v = _mm256_set1_pd(w[l]);
      const __m256i bc = _mm256_set1_epi64x(static_cast<long long>(bits[q * kChunk + l]));
#pragma GCC unroll 8
      for (int g = 0; g < 8; ++g)
        a[g] = _mm256_add_pd(a[g], _mm256_blendv_pd(zero, v, _mm256_castsi256_pd(_mm256_sllv_epi64(bc, sh[g]))));
    }
    for (int g = 0; g < 8; ++g) _mm256_storeu_pd(out + 32 * q + 4 * g, a[g]);
  }
}
#endif  // NNMARK_X86

template <typename Acc>
void fwd_block(Isa isa, const Acc* w, const uint32_t* bits, int64_t len, Acc* out) {
#if NNMARK_X86
  // float32 on AVX-512 takes the fixed-point kernel (forward_run<float, true>).
  if constexpr (std::is_same<Acc, double>::value) {
    if (isa == Isa::kAvx512) return fwd_block_avx512(w, bits, len, out);
  }
  if (isa != Isa::kGeneric) return fwd_block_avx2(w, bits, len, out);
#endif
  (void)isa;
  fwd_block_generic(w, bits, len, out);
}

// ------------------------------------------------ backward: masked row sums
// gw[l] = 2 * sum_b sum_{r : bit r of block b set} g[128 b + r] - G, l < len.
// bits: [nblk, 4, kChunk]; g: [nblk * 128], zero past T.
template <typename Acc>
void bwd_chunk_generic(const uint32_t* bits, int64_t len, int64_t nblk, const Acc* g, Acc G, Acc* gw) {
  for (int64_t l = 0; l < len; ++l) {
    Acc s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (int64_t b = 0; b < nblk; ++b) {
      const uint32_t* blk = bits + 4 * kChunk * b;
      const uint32_t q[4] = {blk[l], blk[kChunk + l], blk[2 * kChunk + l], blk[3 * kChunk + l]};
      const Acc* gb = g + kBlock * b;
      for (int j = 0; j < 32; ++j) {
        s0 += ((q[0] >> j) & 1u) ? gb[j] : Acc(0);
        s1 += ((q[1] >> j) & 1u) ? gb[32 + j] : Acc(0);
        s2 += ((q[2] >> j) & 1u) ? gb[64 + j] : Acc(0);
        s3 += ((q[3] >> j) & 1u) ? gb[96 + j] : Acc(0);
      }
    }
    gw[l] = Acc(2) * ((s0 + s1) + (s2 + s3)) - G;
  }
}

#if NNMARK_X86
__attribute__((target("avx512f")))
void bwd_chunk_avx512(const uint32_t* bits, int64_t len, int64_t nblk, const float* g, float G, float* gw) {
  for (int64_t l = 0; l < len; ++l) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;  // four chains hide add latency
    for (int64_t b = 0; b < nblk; ++b) {
      const uint32_t* blk = bits + 4 * kChunk * b;
      const uint32_t q[4] = {blk[l], blk[kChunk + l], blk[2 * kChunk + l], blk[3 * kChunk + l]};
      const float* gb = g + kBlock * b;
      a0 = _mm512_mask_add_ps(a0, static_cast<__mmask16>(q[0]), a0, _mm512_loadu_ps(gb + 0));
      a1 = _mm512_mask_add_ps(a1, static_cast<__mmask16>(q[0] >> 16), a1, _mm512_loadu_ps(gb + 16));
      a2 = _mm512_mask_add_ps(a2, static_cast<__mmask16>(q[1]), a2, _mm512_loadu_ps(gb + 32));
      a3 = _mm512_mask_add_ps(a3, static_cast<__mmask16>(q[1] >> 16), a3, _mm512_loadu_ps(gb + 48));
      a0 = _mm512_mask_add_ps(a0, static_cast<__mmask16>(q[2]), a0, _mm512_loadu_ps(gb + 64));
      a1 = _mm512_mask_add_ps(a1, static_cast<__mmask16>(q[2] >> 16), a1, _mm512_loadu_ps(gb + 80));
      a2 = _mm512_mask_add_ps(a2, static_cast<__mmask16>(q[3]), a2, _mm512_loadu_ps(gb + 96));
      a3 = _mm512_mask_add_ps(a3, static_cast<__mmask16>(q[3] >> 16), a3, _mm512_loadu_ps(gb + 112));
    }
    const float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    gw[l] = 2.0f * s - G;
  }
}

__attribute__((target("avx512f")))
void bwd_chunk_avx512(const uint32_t* bits, int64_t len, int64_t nblk, const double* g, double G, double* gw) {
  for (int64_t l = 0; l < len; ++l) {
    __m512d a[4];
    for (int k = 0; k < 4; ++k) a[k] = _mm512_setzero_pd();
    for (int64_t b = 0; b < nblk; ++b) {
      const uint32_t* blk = bits + 4 * kChunk * b;
      const uint32_t q[4] = {blk[l], blk[kChunk + l], blk[2 * kChunk + l], blk[3 * kChunk + l]};
      const double* gb = g + kBlock * b;
#pragma GCC unroll 16
      for (int m = 0; m < 16; ++m)
        a[m & 3] = _mm512_mask_add_pd(a[m & 3], static_cast<__mmask8>(q[m >> 2] >> (8 * (m & 3))),
                                      a[m & 3], _mm512_loadu_pd(gb + 8 * m));
    }
    const double s = _mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(a[0], a[1]), _mm512_add_pd(a[2], a[3])));
    gw[l] = 2.0 * s - G;
  }
}

__attribute__((target("avx2")))
void bwd_chunk_avx2(const uint32_t* bits, int64_t len, int64_t nblk, const float* g, float G, float* gw) {
  const __m256i s0 = _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24);
  const __m256i eight = _mm256_set1_epi32(8);
  const __m256i s1 = _mm256_sub_epi32(s0, eight), s2 = _mm256_sub_epi32(s1, eight),
                s3 = _mm256_sub_epi32(s2, eight);
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t l = 0; l < len; ++l) {
    __m256 a0 = zero, a1 = zero, a2 = zero, a3 = zero;
    for (int64_t b = 0; b < nblk; ++b) {
      const uint32_t* blk = bits + 4 * kChunk * b;
      const uint32_t q[4] = {blk[l], blk[kChunk + l], blk[2 * kChunk + l], blk[3 * kChunk + l]};
      const float* gb = g + kBlock * b;
      for (int m = 0; m < 4; ++m) {
        const __m256i bc = _mm256_set1_epi32(static_cast<int>(q[m]));
        const float* gm = gb + 32 * m;
        a0 = _mm256_add_ps(a0, _mm256_blendv_ps(zero, _mm256_loadu_ps(gm + 0), _mm256_castsi256_ps(_mm256_sllv_epi32(bc, s0))));
        a1 = _mm256_add_ps(a1, _mm256_blendv_ps(zero, _mm256_loadu_ps(gm + 8), _mm256_castsi256_ps(_mm256_sllv_epi32(bc, s1))));
        a2 = _mm256_add_ps(a2, _mm256_blendv_ps(zero, _mm256_loadu_ps(gm + 16), _mm256_castsi256_ps(_mm256_sllv_epi32(bc, s2))));
        a3 = _mm256_add_ps(a3, _mm256_blendv_ps(zero, _mm256_loadu_ps(gm + 24), _mm256_castsi256_ps(_mm256_sllv_epi32(bc, s3))));
      }
    }
    const __m256 t = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    gw[l] = 2.0f * _mm_cvtss_f32(h) - G;
  }
}
#endif  // NNMARK_X86

template <typename Acc>
void bwd_chunk(Isa isa, const uint32_t* bits, int64_t len, int64_t nblk, const Acc* g, Acc G, Acc* gw) {
#if NNMARK_X86
  if (isa == Isa::kAvx512) return bwd_chunk_avx512(bits, len, nblk, g, G, gw);
  if constexpr (std::is_same<Acc, float>::value) {
    if (isa == Isa::kAvx2) return bwd_chunk_avx2(bits, len, nblk, g, G, gw);
  }
#endif
  (void)isa;
  bwd_chunk_generic(bits, len, nblk, g, G, gw);
}

// Converts len elements of a row (dtype d) starting at column i0 into dst; returns their sum
// (four partial sums: one serial chain of double adds would cost more than the projection).
template <typename Acc>
double load_row(const void* row, int d, int64_t i0, int64_t len, Acc* dst) {
  switch (d) {
    case kFloat32: {
      const float* p = static_cast<const float*>(row) + i0;
      for (int64_t l = 0; l < len; ++l) dst[l] = static_cast<Acc>(p[l]);
      break;
    }
    case kFloat64: {
      const double* p = static_cast<const double*>(row) + i0;
      for (int64_t l = 0; l < len; ++l) dst[l] = static_cast<Acc>(p[l]);
      break;
    }
    default:
      for (int64_t l = 0; l < len; ++l) dst[l] = load_as<Acc>(row, d, i0 + l);
  }
  double s[4] = {0, 0, 0, 0};
  int64_t l = 0;
  for (; l + 4 <= len; l += 4)
    for (int k = 0; k < 4; ++k) s[k] += static_cast<double>(dst[l + k]);
  for (; l < len; ++l) s[0] += static_cast<double>(dst[l]);
  return (s[0] + s[1]) + (s[2] + s[3]);
}

// Scales a float chunk by 2^k so that max |q| <= 2^22 and rounds to int32 (nearest
// even): 22-23 significant bits for the largest element (float32 has 24), and sums of
// up to kChunk values fit in int32 exactly. Returns 2^-k (exact); *sum gets the sum of
// the quantised values (so 2A - S stays consistent). An all-zero chunk gives zeros.
#if NNMARK_X86
__attribute__((target("avx512f")))
double quantize_chunk(const float* w, int64_t len, int32_t* q, double* sum) {
  __m512 m = _mm512_setzero_ps();
  int64_t l = 0;
  for (; l + 16 <= len; l += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(w + l)));
  float mx = _mm512_reduce_max_ps(m);
  for (; l < len; ++l) mx = std::max(mx, std::fabs(w[l]));
  int e = 0;
  if (mx > 0.0f) std::frexp(mx, &e);  // mx < 2^e
  const __m512 scale = _mm512_set1_ps(std::ldexp(1.0f, 22 - e));
  __m512i acc = _mm512_setzero_si512();
  for (l = 0; l + 16 <= len; l += 16) {
    const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(w + l), scale));
    _mm512_storeu_si512(q + l, v);
    acc = _mm512_add_epi32(acc, v);
  }
  if (l < len) {
    const __mmask16 k = static_cast<__mmask16>((1u << (len - l)) - 1);
    const __m512i v = _mm512_maskz_cvtps_epi32(k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, w + l), scale));
    _mm512_mask_storeu_epi32(q + l, k, v);
    acc = _mm512_add_epi32(acc, v);
  }
  const double inv = std::ldexp(1.0, e - 22);
  *sum = static_cast<double>(_mm512_reduce_add_epi32(acc)) * inv;
  return inv;
}
#endif

// Columns per thread range: enough sign-adds that a thread start (~20 us) pays off.
int64_t column_grain(int64_t Tpad, int64_t C) {
  return std::max<int64_t>(kChunk, (int64_t{1} << 21) / std::max<int64_t>(1, Tpad * C));
}

template <typename Acc, bool kFixed>
void forward_run(const ProjectionForwardArgs& a) {
  const int64_t C = a.C, N = a.N, T = a.T;
  const int64_t nblk = (T + kBlock - 1) / kBlock, Tpad = nblk * kBlock;
  const Isa isa = active_isa();
  const int64_t grain = column_grain(Tpad, C);
  const int ranges = std::max(1, plan_ranges(N, grain));
  // Per-range partial sums: O(ranges * C * T) extra memory, independent of N.
  std::vector<double> partA(static_cast<size_t>(ranges) * C * Tpad, 0.0);
  std::vector<double> partS(static_cast<size_t>(ranges) * C, 0.0);
  const int64_t esize = dtype_size(a.w_dtype);
  parallel_ranges(N, grain, [&](int64_t ib, int64_t ie, int worker) {
    std::vector<Acc> wc(static_cast<size_t>(C) * kChunk);
    std::vector<uint32_t> bits(4 * kChunk);
    alignas(64) Acc out[kBlock];
    alignas(64) int32_t outq[kBlock];
    std::vector<int32_t> wq(kFixed ? static_cast<size_t>(C) * kChunk : 0);
    std::vector<double> inv(kFixed ? static_cast<size_t>(C) : 0);
    double* A = partA.data() + static_cast<size_t>(worker) * C * Tpad;
    double* S = partS.data() + static_cast<size_t>(worker) * C;
    for (int64_t i0 = ib; i0 < ie; i0 += kChunk) {
      const int64_t len = std::min(kChunk, ie - i0);
      for (int64_t c = 0; c < C; ++c) {
        const char* row = static_cast<const char*>(a.w) + c * N * esize;
        if constexpr (kFixed) {
#if NNMARK_X86
          // float32 rows are quantised in place; other dtypes are converted first.
          const float* src = a.w_dtype == kFloat32 ? reinterpret_cast<const float*>(row) + i0 : wc.data() + c * kChunk;
          if (a.w_dtype != kFloat32) load_row<Acc>(row, a.w_dtype, i0, len, wc.data() + c * kChunk);
          double qs = 0;
          inv[c] = quantize_chunk(src, len, wq.data() + c * kChunk, &qs);
          S[c] += qs;
#endif
        } else {
          S[c] += load_row<Acc>(row, a.w_dtype, i0, len, wc.data() + c * kChunk);
        }
      }
      for (int64_t b = 0; b < nblk; ++b) {
        philox_fill(isa, static_cast<uint64_t>(a.col0 + i0), len, static_cast<uint32_t>(b), a.k0, a.k1, bits.data());
        for (int64_t c = 0; c < C; ++c) {
          double* Ac = A + c * Tpad + b * kBlock;
          if constexpr (kFixed) {
#if NNMARK_X86
            fwd_block_avx512(wq.data() + c * kChunk, bits.data(), len, outq);
#endif
            for (int64_t r = 0; r < kBlock; ++r) Ac[r] += static_cast<double>(outq[r]) * inv[c];
          } else {
            fwd_block<Acc>(isa, wc.data() + c * kChunk, bits.data(), len, out);
            for (int64_t r = 0; r < kBlock; ++r) Ac[r] += static_cast<double>(out[r]);
          }
        }
      }
    }
  });
  Acc* p = static_cast<Acc*>(a.p);
  for (int64_t c = 0; c < C; ++c) {
    double S = 0;
    for (int w = 0; w < ranges; ++w) S += partS[static_cast<size_t>(w) * C + c];
    for (int64_t t = 0; t < T; ++t) {
      double A = 0;
      for (int w = 0; w < ranges; ++w) A += partA[(static_cast<size_t>(w) * C + c) * Tpad + t];
      p[c * T + t] = static_cast<Acc>(2.0 * A - S);
    }
  }
}

template <typename Acc>
void backward_impl(const ProjectionBackwardArgs& a) {
  const int64_t C = a.C, N = a.N, T = a.T;
  const int64_t nblk = (T + kBlock - 1) / kBlock, Tpad = nblk * kBlock;
  const Isa isa = active_isa();
  const Acc* gp = static_cast<const Acc*>(a.gp);
  std::vector<Acc> g(static_cast<size_t>(C) * Tpad, Acc(0));  // zero-padded past T
  std::vector<Acc> G(static_cast<size_t>(C));
  for (int64_t c = 0; c < C; ++c) {
    double s = 0;
    for (int64_t t = 0; t < T; ++t) { g[c * Tpad + t] = gp[c * T + t]; s += gp[c * T + t]; }
    G[c] = static_cast<Acc>(s);
  }
  Acc* gw = static_cast<Acc*>(a.gw);
  parallel_ranges(N, column_grain(Tpad, C), [&](int64_t ib, int64_t ie, int) {
    std::vector<uint32_t> bits(static_cast<size_t>(nblk) * kChunk * 4);
    for (int64_t i0 = ib; i0 < ie; i0 += kChunk) {
      const int64_t len = std::min(kChunk, ie - i0);
      for (int64_t b = 0; b < nblk; ++b)
        philox_fill(isa, static_cast<uint64_t>(a.col0 + i0), len, static_cast<uint32_t>(b), a.k0, a.k1,
                    bits.data() + b * kChunk * 4);
      for (int64_t c = 0; c < C; ++c)
        bwd_chunk<Acc>(isa, bits.data(), len, nblk, g.data() + c * Tpad, G[c], gw + c * N + i0);
    }
  });
}

// fwd_block for float64 limited to the first `rows` rows (out[r] valid for r < rows): a key
// search at T <= 64 needs half the masked adds or fewer. Each row's sum is the one the full
// block computes (rows are independent lanes), so results stay equal to projection_forward.
#if NNMARK_X86
template <int G>  // G groups of 8 rows
__attribute__((target("avx512f")))
void fwd_rows_avx512(const double* w /* [len] */, const uint32_t* bits /* [4, kChunk] */, int64_t len,
                     double* out /* [8 G] */) {
  __m512d a[G];
  for (int g = 0; g < G; ++g) a[g] = _mm512_setzero_pd();
  for (int64_t l = 0; l < len; ++l) {
    const __m512d v = _mm512_set1_pd(w[l]);
    const uint32_t q[4] = {bits[l], bits[kChunk + l], bits[2 * kChunk + l], bits[3 * kChunk + l]};
#pragma GCC unroll 16
    for (int g = 0; g < G; ++g)  // lane k of a[g] is row 8g + k
      a[g] = _mm512_mask_add_pd(a[g], static_cast<__mmask8>(q[g >> 2] >> (8 * (g & 3))), a[g], v);
  }
  for (int g = 0; g < G; ++g) _mm512_storeu_pd(out + 8 * g, a[g]);
}
#endif

void fwd_rows(Isa isa, const double* w /* [len] */, const uint32_t* bits /* [4, kChunk] */, int64_t len, int64_t rows,
              double* out /* [128] */) {
#if NNMARK_X86
  if (isa == Isa::kAvx512) {
    if (rows <= 16) return fwd_rows_avx512<2>(w, bits, len, out);
    if (rows <= 32) return fwd_rows_avx512<4>(w, bits, len, out);
    if (rows <= 64) return fwd_rows_avx512<8>(w, bits, len, out);
  }
#endif
  (void)rows;
  fwd_block<double>(isa, w, bits, len, out);
}

// One carrier under K subkeys: keys are split over threads, and each key runs the column
// loop forward_run<double, false> runs on one thread (same chunks, same blocks, same sums),
// so p[k] equals projection_forward of a float64 carrier under subkeys[k] on one thread.
void many_keys_run(const ProjectionManyKeysArgs& a) {
  const int64_t K = a.K, N = a.N, T = a.T;
  const int64_t nblk = (T + kBlock - 1) / kBlock, Tpad = nblk * kBlock;
  const Isa isa = active_isa();
  double S = 0;  // sum of w, chunk by chunk as forward_run adds it
  {
    std::vector<double> scratch(kChunk);
    for (int64_t i0 = 0; i0 < N; i0 += kChunk)
      S += load_row<double>(a.w, kFloat64, i0, std::min(kChunk, N - i0), scratch.data());
  }
  // Keys per range: enough masked adds that a thread start pays off.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 21) / std::max<int64_t>(1, Tpad * N));
  parallel_ranges(K, grain, [&](int64_t kb, int64_t ke, int) {
    std::vector<uint32_t> bits(4 * kChunk);  // [4, kChunk] one chunk's Philox words
    std::vector<double> A(static_cast<size_t>(Tpad));  // [Tpad] masked sums of one key
    alignas(64) double out[kBlock];  // [128] one block's masked sums of one chunk
    for (int64_t k = kb; k < ke; ++k) {
      const uint32_t k0 = a.subkeys[2 * k], k1 = a.subkeys[2 * k + 1];
      std::fill(A.begin(), A.end(), 0.0);
      for (int64_t i0 = 0; i0 < N; i0 += kChunk) {
        const int64_t len = std::min(kChunk, N - i0);
        for (int64_t b = 0; b < nblk; ++b) {
          philox_fill(isa, static_cast<uint64_t>(i0), len, static_cast<uint32_t>(b), k0, k1, bits.data());
          const int64_t rows = std::min(kBlock, T - b * kBlock);
          fwd_rows(isa, a.w + i0, bits.data(), len, rows, out);
          double* Ab = A.data() + b * kBlock;
          for (int64_t r = 0; r < rows; ++r) Ab[r] += out[r];
        }
      }
      double* pk = a.p + k * T;  // [T] row k of the output
      for (int64_t t = 0; t < T; ++t) pk[t] = 2.0 * A[t] - S;
    }
  });
}

}  // namespace

void projection_forward_cpu(const ProjectionForwardArgs& a) {
  check_projection_args(a);
  if (a.w_dtype == kFloat64) forward_run<double, false>(a);
#if NNMARK_X86
  else if (active_isa() == Isa::kAvx512) forward_run<float, true>(a);
#endif
  else forward_run<float, false>(a);
}

void projection_backward_cpu(const ProjectionBackwardArgs& a) {
  check_projection_args(a);
  if (a.gp_dtype == kFloat64) backward_impl<double>(a);
  else backward_impl<float>(a);
}

void projection_many_keys_cpu(const ProjectionManyKeysArgs& a) {
  check_projection_args(a);
  many_keys_run(a);
}

}  // namespace nnmark
