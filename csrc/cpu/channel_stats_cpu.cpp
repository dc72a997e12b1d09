// CPU per-channel activation statistics (ops/channel_stats.h): a streaming read of x,
// each element widened exactly to float64 and added, x > 0 counted in int32 lanes.
//
// Two loops:
//   rows     [B, C, S] with S >= kShortRow: every (b, c) row is a contiguous run of S
//            elements, summed by a SIMD row kernel into one (sum, count). Rows longer
//            than kRun are cut into segments of kRun.
//   columns  [B, S, C] (channels_last) or S = 1: R = B * S rows of C contiguous
//            channels; a column kernel adds whole rows into per-column accumulators
//            (kept in L1), so the SIMD lanes run across channels. Short NCHW rows
//            (S < kShortRow) are read the same way, as B rows of C * S columns, and each
//            channel's S columns are added at the end.
// Work pieces are fixed by the sizes alone (never by the thread count); each piece writes
// its own partials, and the partials are added per channel in piece order at the end:
// the same result for any number of threads.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define NNMARK_X86 1
#endif

#include "common/dtype.h"
#include "cpu/isa.h"
#include "cpu/parallel.h"
#include "ops/channel_stats.h"

namespace nnmark {
namespace {

constexpr int64_t kRun = 16384;           // longest row segment of one row-kernel call
constexpr int64_t kUnit = 65536;          // elements a work piece aims for
constexpr int64_t kColUnit = 1 << 18;     // columns loop: larger pieces, fewer partials [nrb, W]
constexpr int64_t kMaxBlocks = 64;        // batch (row) blocks at most: bounds the partials
constexpr int64_t kChannelBlock = 2048;   // columns loop: columns per piece (L1-sized accumulators)
constexpr int64_t kThreadWork = 1 << 18;  // elements per thread before another one pays off
constexpr int64_t kClaim = 1 << 20;       // elements a thread claims at a time
constexpr size_t kKeepPartials = 1 << 19; // partial entries kept between calls (8 MiB)
constexpr int64_t kOneRowCols = 512;      // columns loop: narrower rows are added one at a time
constexpr int64_t kShortRow = 48;         // NCHW rows shorter than this take the columns loop

struct RowStat {
  double sum;
  int64_t pos;
};

// Row kernel: sum and count of n contiguous elements. Column kernel: for `rows` rows of
// stride ld, acc[c] += x[r, c] and cnt[c] += (x[r, c] > 0) for c < cw.
using RowFn = RowStat (*)(const void* x /* [n] */, int64_t n);
using ColFn = void (*)(const void* x /* [rows, ld], first cw columns read */, int64_t rows, int64_t ld,
                       int64_t cw, double* acc /* [cw] */, int32_t* cnt /* [cw] */);

// ------------------------------------------------------------------ portable
struct F32 {
  using T = float;
  static double get(T v) { return v; }
};
struct F64 {
  using T = double;
  static double get(T v) { return v; }
};
struct F16 {
  using T = uint16_t;
  static double get(T v) { return half_to_float(v); }
};
struct BF16 {
  using T = uint16_t;
  static double get(T v) { return bf16_to_float(v); }
};

template <class D>
RowStat row_generic(const void* p, int64_t n) {
  const auto* x = static_cast<const typename D::T*>(p);
  double s[4] = {0, 0, 0, 0};  // four chains, so the adds are not one latency-bound chain
  int64_t k = 0, i = 0;
  for (; i + 4 <= n; i += 4) {
    for (int j = 0; j < 4; ++j) {
      const double v = D::get(x[i + j]);
      s[j] += v;
      k += v > 0;
    }
  }
  for (; i < n; ++i) {
    const double v = D::get(x[i]);
    s[0] += v;
    k += v > 0;
  }
  return {(s[0] + s[1]) + (s[2] + s[3]), k};
}

template <class D>
void cols_generic(const void* p, int64_t rows, int64_t ld, int64_t cw, double* acc, int32_t* cnt) {
  const auto* x = static_cast<const typename D::T*>(p);
  for (int64_t r = 0; r < rows; ++r) {
    const auto* row = x + r * ld;
    for (int64_t c = 0; c < cw; ++c) {
      const double v = D::get(row[c]);
      acc[c] += v;
      cnt[c] += v > 0;
    }
  }
}

#if NNMARK_X86
// ------------------------------------------------------------------ AVX-512
// 16 elements as float32 (exact for float16 / bfloat16); load_n reads the first n < 16
// and zero-fills the rest. Masked 16-bit loads need AVX-512BW/VL (every AVX-512 CPU but
// Xeon Phi has them): they are called, not inlined, so the kernels stay plain AVX-512F;
// without them the tail goes through a zeroed buffer.
const bool g_avx512bw = [] {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
}();

__attribute__((target("avx512f,avx512bw,avx512vl"), noinline)) __m256i load_n_u16_bw(const uint16_t* p, int n) {
  return _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1), p);
}
__attribute__((target("avx512f"))) inline __m256i load_n_u16(const uint16_t* p, int n) {
  if (g_avx512bw) return load_n_u16_bw(p, n);
  alignas(32) uint16_t buf[16] = {};
  std::memcpy(buf, p, sizeof(uint16_t) * n);
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(buf));
}

struct V512F32 {
  using T = float;
  __attribute__((target("avx512f"))) static __m512 load(const T* p) { return _mm512_loadu_ps(p); }
  __attribute__((target("avx512f"))) static __m512 load_n(const T* p, int n) {
    return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
  }
};
struct V512F16 {
  using T = uint16_t;
  __attribute__((target("avx512f"))) static __m512 cvt(__m256i h) { return _mm512_cvtph_ps(h); }
  __attribute__((target("avx512f"))) static __m512 load(const T* p) {
    return cvt(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  __attribute__((target("avx512f"))) static __m512 load_n(const T* p, int n) { return cvt(load_n_u16(p, n)); }
};
struct V512BF16 {
  using T = uint16_t;
  __attribute__((target("avx512f"))) static __m512 cvt(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  __attribute__((target("avx512f"))) static __m512 load(const T* p) {
    return cvt(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  __attribute__((target("avx512f"))) static __m512 load_n(const T* p, int n) { return cvt(load_n_u16(p, n)); }
};

__attribute__((target("avx512f"))) inline __m512d lo_pd(__m512 v) {
  return _mm512_cvtps_pd(_mm512_castps512_ps256(v));
}
__attribute__((target("avx512f"))) inline __m512d hi_pd(__m512 v) {
  return _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

__attribute__((target("avx512f"))) inline double hsum512(__m512d v) {
  const __m256d h = _mm256_add_pd(_mm512_castpd512_pd256(v), _mm512_extractf64x4_pd(v, 1));
  const __m128d q = _mm_add_pd(_mm256_castpd256_pd128(h), _mm256_extractf128_pd(h, 1));
  return _mm_cvtsd_f64(_mm_add_sd(q, _mm_unpackhi_pd(q, q)));
}

// Counts are popcounts of the compare masks (scalar ports, idle otherwise), so a short
// row ends with one horizontal add, not two.
template <class V>
__attribute__((target("avx512f,popcnt"))) RowStat row_avx512(const void* p, int64_t n) {
  const auto* x = static_cast<const typename V::T*>(p);
  const __m512 zero = _mm512_setzero_ps();
  __m512d a0 = _mm512_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
  int64_t k = 0, i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512 v0 = V::load(x + i), v1 = V::load(x + i + 16);
    a0 = _mm512_add_pd(a0, lo_pd(v0));
    a1 = _mm512_add_pd(a1, hi_pd(v0));
    a2 = _mm512_add_pd(a2, lo_pd(v1));
    a3 = _mm512_add_pd(a3, hi_pd(v1));
    k += __builtin_popcount(_mm512_cmp_ps_mask(v0, zero, _CMP_GT_OQ)) +
         __builtin_popcount(_mm512_cmp_ps_mask(v1, zero, _CMP_GT_OQ));
  }
  if (i + 16 <= n) {
    const __m512 v = V::load(x + i);
    a0 = _mm512_add_pd(a0, lo_pd(v));
    a1 = _mm512_add_pd(a1, hi_pd(v));
    k += __builtin_popcount(_mm512_cmp_ps_mask(v, zero, _CMP_GT_OQ));
    i += 16;
  }
  if (i < n) {  // zero-filled tail: adds 0, counts nothing
    const __m512 v = V::load_n(x + i, static_cast<int>(n - i));
    a2 = _mm512_add_pd(a2, lo_pd(v));
    a3 = _mm512_add_pd(a3, hi_pd(v));
    k += __builtin_popcount(_mm512_cmp_ps_mask(v, zero, _CMP_GT_OQ));
  }
  return {hsum512(_mm512_add_pd(_mm512_add_pd(a0, a1), _mm512_add_pd(a2, a3))), k};
}

__attribute__((target("avx512f,popcnt"))) RowStat row_avx512_f64(const void* p, int64_t n) {
  const auto* x = static_cast<const double*>(p);
  const __m512d zero = _mm512_setzero_pd();
  __m512d a0 = zero, a1 = zero, a2 = zero, a3 = zero;
  int64_t k = 0, i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512d v0 = _mm512_loadu_pd(x + i), v1 = _mm512_loadu_pd(x + i + 8);
    const __m512d v2 = _mm512_loadu_pd(x + i + 16), v3 = _mm512_loadu_pd(x + i + 24);
    a0 = _mm512_add_pd(a0, v0);
    a1 = _mm512_add_pd(a1, v1);
    a2 = _mm512_add_pd(a2, v2);
    a3 = _mm512_add_pd(a3, v3);
    const unsigned m = _mm512_cmp_pd_mask(v0, zero, _CMP_GT_OQ) | (_mm512_cmp_pd_mask(v1, zero, _CMP_GT_OQ) << 8) |
                       (_mm512_cmp_pd_mask(v2, zero, _CMP_GT_OQ) << 16) |
                       (static_cast<unsigned>(_mm512_cmp_pd_mask(v3, zero, _CMP_GT_OQ)) << 24);
    k += __builtin_popcount(m);
  }
  for (; i < n; i += 8) {
    const int m = static_cast<int>(std::min<int64_t>(8, n - i));
    const __m512d v = _mm512_maskz_loadu_pd(static_cast<__mmask8>((1u << m) - 1), x + i);
    a0 = _mm512_add_pd(a0, v);
    k += __builtin_popcount(_mm512_cmp_pd_mask(v, zero, _CMP_GT_OQ));
  }
  return {hsum512(_mm512_add_pd(_mm512_add_pd(a0, a1), _mm512_add_pd(a2, a3))), k};
}

// Columns: wide rows (more than kOneRowCols columns) four rows at a time, so the
// accumulators are read and written once per four rows (the four widened rows are
// added pairwise first, a fixed order); narrow rows one at a time, which reads memory
// in order (four narrow rows at once measured up to 2x slower from DRAM on Zen 4).
template <class V, bool kTail>
__attribute__((target("avx512f"), always_inline)) inline void cols4_step_avx512(
    const typename V::T* x0, int64_t ld, int n /* lanes, kTail only */, double* acc, int32_t* cnt) {
  const __m512 zero = _mm512_setzero_ps();
  const __m512i one = _mm512_set1_epi32(1);
  __m512 v[4];
  for (int j = 0; j < 4; ++j) v[j] = kTail ? V::load_n(x0 + j * ld, n) : V::load(x0 + j * ld);
  const __m512d lo = _mm512_add_pd(_mm512_add_pd(lo_pd(v[0]), lo_pd(v[1])), _mm512_add_pd(lo_pd(v[2]), lo_pd(v[3])));
  const __m512d hi = _mm512_add_pd(_mm512_add_pd(hi_pd(v[0]), hi_pd(v[1])), _mm512_add_pd(hi_pd(v[2]), hi_pd(v[3])));
  const __mmask16 m = static_cast<__mmask16>(kTail ? (1u << n) - 1 : 0xFFFFu);
  const __mmask8 ml = static_cast<__mmask8>(m), mh = static_cast<__mmask8>(m >> 8);
  _mm512_mask_storeu_pd(acc, ml, _mm512_add_pd(_mm512_maskz_loadu_pd(ml, acc), lo));
  _mm512_mask_storeu_pd(acc + 8, mh, _mm512_add_pd(_mm512_maskz_loadu_pd(mh, acc + 8), hi));
  __m512i k = _mm512_maskz_loadu_epi32(m, cnt);
  for (int j = 0; j < 4; ++j) k = _mm512_mask_add_epi32(k, _mm512_cmp_ps_mask(v[j], zero, _CMP_GT_OQ), k, one);
  _mm512_mask_storeu_epi32(cnt, m, k);
}

template <class V, bool kTail>
__attribute__((target("avx512f"), always_inline)) inline void cols1_step_avx512(const typename V::T* x0, int n,
                                                                              double* acc, int32_t* cnt) {
  const __m512 v = kTail ? V::load_n(x0, n) : V::load(x0);
  const __mmask16 m = static_cast<__mmask16>(kTail ? (1u << n) - 1 : 0xFFFFu);
  const __mmask8 ml = static_cast<__mmask8>(m), mh = static_cast<__mmask8>(m >> 8);
  _mm512_mask_storeu_pd(acc, ml, _mm512_add_pd(_mm512_maskz_loadu_pd(ml, acc), lo_pd(v)));
  _mm512_mask_storeu_pd(acc + 8, mh, _mm512_add_pd(_mm512_maskz_loadu_pd(mh, acc + 8), hi_pd(v)));
  const __m512i k = _mm512_maskz_loadu_epi32(m, cnt);
  _mm512_mask_storeu_epi32(cnt, m, _mm512_mask_add_epi32(k, _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GT_OQ),
                                                         k, _mm512_set1_epi32(1)));
}

template <class V>
__attribute__((target("avx512f"))) void cols_avx512(const void* p, int64_t rows, int64_t ld, int64_t cw,
                                                   double* acc, int32_t* cnt) {
  const auto* x = static_cast<const typename V::T*>(p);
  const int64_t full = cw & ~int64_t{15};
  const int tail = static_cast<int>(cw - full);
  int64_t r = 0;
  if (cw > kOneRowCols) {
    for (; r + 4 <= rows; r += 4) {
      const auto* row = x + r * ld;
      for (int64_t c = 0; c < full; c += 16) cols4_step_avx512<V, false>(row + c, ld, 16, acc + c, cnt + c);
      if (tail) cols4_step_avx512<V, true>(row + full, ld, tail, acc + full, cnt + full);
    }
  }
  for (; r < rows; ++r) {
    const auto* row = x + r * ld;
    for (int64_t c = 0; c < full; c += 16) cols1_step_avx512<V, false>(row + c, 16, acc + c, cnt + c);
    if (tail) cols1_step_avx512<V, true>(row + full, tail, acc + full, cnt + full);
  }
}

__attribute__((target("avx512f"))) void cols_avx512_f64(const void* p, int64_t rows, int64_t ld, int64_t cw,
                                                       double* acc, int32_t* cnt) {
  const auto* x = static_cast<const double*>(p);
  const __m512d zero = _mm512_setzero_pd();
  const __m512i one = _mm512_set1_epi32(1);
  const int64_t step = cw > kOneRowCols ? 4 : 1;
  for (int64_t r = 0; r < rows; r += step) {
    const int nr = static_cast<int>(std::min<int64_t>(step, rows - r));
    const double* row = x + r * ld;
    for (int64_t c = 0; c < cw; c += 8) {
      const int m = static_cast<int>(std::min<int64_t>(8, cw - c));
      const __mmask8 km = static_cast<__mmask8>((1u << m) - 1);
      __m512d v[4];
      for (int j = 0; j < 4; ++j) v[j] = j < nr ? _mm512_maskz_loadu_pd(km, row + j * ld + c) : zero;
      const __m512d s = _mm512_add_pd(_mm512_add_pd(v[0], v[1]), _mm512_add_pd(v[2], v[3]));
      _mm512_mask_storeu_pd(acc + c, km, _mm512_add_pd(_mm512_maskz_loadu_pd(km, acc + c), s));
      // The 8 counts sit in the low int32 lanes of a 512-bit vector (no AVX-512VL needed).
      __m512i k = _mm512_maskz_loadu_epi32(km, cnt + c);
      for (int j = 0; j < 4; ++j) k = _mm512_mask_add_epi32(k, _mm512_cmp_pd_mask(v[j], zero, _CMP_GT_OQ), k, one);
      _mm512_mask_storeu_epi32(cnt + c, km, k);
    }
  }
}

// ------------------------------------------------------------------ AVX2
// 8 elements as float32. float16 needs F16C (every AVX2 CPU so far has it; checked anyway).
struct V256F32 {
  using D = F32;
  using T = float;
  __attribute__((target("avx2"))) static __m256 load(const T* p) { return _mm256_loadu_ps(p); }
};
struct V256F16 {
  using D = F16;
  using T = uint16_t;
  __attribute__((target("avx2,f16c"))) static __m256 load(const T* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
};
struct V256BF16 {
  using D = BF16;
  using T = uint16_t;
  __attribute__((target("avx2"))) static __m256 load(const T* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
};

__attribute__((target("avx2"))) inline double hsum256(__m256d v) {
  const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}
__attribute__((target("avx2"))) inline int64_t hsum256_epi32(__m256i v) {
  alignas(32) int32_t t[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(t), v);
  int64_t s = 0;
  for (int j = 0; j < 8; ++j) s += t[j];
  return s;
}

template <class V>
__attribute__((target("avx2,f16c,popcnt"))) RowStat row_avx2(const void* p, int64_t n) {
  const auto* x = static_cast<const typename V::T*>(p);
  const __m256 zero = _mm256_setzero_ps();
  __m256d a0 = _mm256_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
  int64_t k = 0, i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 v0 = V::load(x + i), v1 = V::load(x + i + 8);
    a0 = _mm256_add_pd(a0, _mm256_cvtps_pd(_mm256_castps256_ps128(v0)));
    a1 = _mm256_add_pd(a1, _mm256_cvtps_pd(_mm256_extractf128_ps(v0, 1)));
    a2 = _mm256_add_pd(a2, _mm256_cvtps_pd(_mm256_castps256_ps128(v1)));
    a3 = _mm256_add_pd(a3, _mm256_cvtps_pd(_mm256_extractf128_ps(v1, 1)));
    k += __builtin_popcount(_mm256_movemask_ps(_mm256_cmp_ps(v0, zero, _CMP_GT_OQ))) +
         __builtin_popcount(_mm256_movemask_ps(_mm256_cmp_ps(v1, zero, _CMP_GT_OQ)));
  }
  if (i + 8 <= n) {
    const __m256 v = V::load(x + i);
    a0 = _mm256_add_pd(a0, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    a1 = _mm256_add_pd(a1, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
    k += __builtin_popcount(_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_GT_OQ)));
    i += 8;
  }
  double ts = 0;  // the last < 8 elements
  for (; i < n; ++i) {
    const double v = V::D::get(x[i]);
    ts += v;
    k += v > 0;
  }
  return {hsum256(_mm256_add_pd(_mm256_add_pd(a0, a1), _mm256_add_pd(a2, a3))) + ts, k};
}

__attribute__((target("avx2"))) RowStat row_avx2_f64(const void* p, int64_t n) {
  const auto* x = static_cast<const double*>(p);
  const __m256d zero = _mm256_setzero_pd();
  __m256d a0 = zero, a1 = zero, a2 = zero, a3 = zero;
  __m256i k0 = _mm256_setzero_si256(), k1 = k0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256d v0 = _mm256_loadu_pd(x + i), v1 = _mm256_loadu_pd(x + i + 4);
    const __m256d v2 = _mm256_loadu_pd(x + i + 8), v3 = _mm256_loadu_pd(x + i + 12);
    a0 = _mm256_add_pd(a0, v0);
    a1 = _mm256_add_pd(a1, v1);
    a2 = _mm256_add_pd(a2, v2);
    a3 = _mm256_add_pd(a3, v3);
    k0 = _mm256_sub_epi64(k0, _mm256_castpd_si256(_mm256_cmp_pd(v0, zero, _CMP_GT_OQ)));
    k1 = _mm256_sub_epi64(k1, _mm256_castpd_si256(_mm256_cmp_pd(v1, zero, _CMP_GT_OQ)));
    k0 = _mm256_sub_epi64(k0, _mm256_castpd_si256(_mm256_cmp_pd(v2, zero, _CMP_GT_OQ)));
    k1 = _mm256_sub_epi64(k1, _mm256_castpd_si256(_mm256_cmp_pd(v3, zero, _CMP_GT_OQ)));
  }
  double ts = 0;
  int64_t tk = 0;
  for (; i < n; ++i) {
    ts += x[i];
    tk += x[i] > 0;
  }
  alignas(32) int64_t kk[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(kk), _mm256_add_epi64(k0, k1));
  const double s = hsum256(_mm256_add_pd(_mm256_add_pd(a0, a1), _mm256_add_pd(a2, a3)));
  return {s + ts, (kk[0] + kk[1]) + (kk[2] + kk[3]) + tk};
}

template <class V>
__attribute__((target("avx2,f16c"))) void cols_avx2(const void* p, int64_t rows, int64_t ld, int64_t cw,
                                                   double* acc, int32_t* cnt) {
  const auto* x = static_cast<const typename V::T*>(p);
  const __m256 zero = _mm256_setzero_ps();
  const int64_t full = cw & ~int64_t{7};
  int64_t r = 0;
  for (; cw > kOneRowCols && r + 4 <= rows; r += 4) {  // four rows at a time, as cols_avx512
    const auto* row = x + r * ld;
    for (int64_t c = 0; c < full; c += 8) {
      __m256 v[4];
      for (int j = 0; j < 4; ++j) v[j] = V::load(row + j * ld + c);
      __m256d lo[4], hi[4];
      for (int j = 0; j < 4; ++j) {
        lo[j] = _mm256_cvtps_pd(_mm256_castps256_ps128(v[j]));
        hi[j] = _mm256_cvtps_pd(_mm256_extractf128_ps(v[j], 1));
      }
      const __m256d sl = _mm256_add_pd(_mm256_add_pd(lo[0], lo[1]), _mm256_add_pd(lo[2], lo[3]));
      const __m256d sh = _mm256_add_pd(_mm256_add_pd(hi[0], hi[1]), _mm256_add_pd(hi[2], hi[3]));
      _mm256_storeu_pd(acc + c, _mm256_add_pd(_mm256_loadu_pd(acc + c), sl));
      _mm256_storeu_pd(acc + c + 4, _mm256_add_pd(_mm256_loadu_pd(acc + c + 4), sh));
      __m256i k = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cnt + c));
      for (int j = 0; j < 4; ++j) k = _mm256_sub_epi32(k, _mm256_castps_si256(_mm256_cmp_ps(v[j], zero, _CMP_GT_OQ)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(cnt + c), k);
    }
    for (int64_t c = full; c < cw; ++c) {
      double v[4];
      for (int j = 0; j < 4; ++j) v[j] = V::D::get(row[j * ld + c]);
      acc[c] += (v[0] + v[1]) + (v[2] + v[3]);
      for (int j = 0; j < 4; ++j) cnt[c] += v[j] > 0;
    }
  }
  for (; r < rows; ++r) {
    const auto* row = x + r * ld;
    for (int64_t c = 0; c < full; c += 8) {
      const __m256 v = V::load(row + c);
      _mm256_storeu_pd(acc + c, _mm256_add_pd(_mm256_loadu_pd(acc + c), _mm256_cvtps_pd(_mm256_castps256_ps128(v))));
      _mm256_storeu_pd(acc + c + 4,
                       _mm256_add_pd(_mm256_loadu_pd(acc + c + 4), _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1))));
      const __m256i k = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cnt + c));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(cnt + c),
                          _mm256_sub_epi32(k, _mm256_castps_si256(_mm256_cmp_ps(v, zero, _CMP_GT_OQ))));
    }
    for (int64_t c = full; c < cw; ++c) {
      const double v = V::D::get(row[c]);
      acc[c] += v;
      cnt[c] += v > 0;
    }
  }
}
#endif  // NNMARK_X86

struct Kernels {
  RowFn row;
  ColFn cols;
};

Kernels pick_kernels(Isa isa, int dtype) {
#if NNMARK_X86
  if (isa == Isa::kAvx512) {
    switch (dtype) {
      case kFloat32: return {row_avx512<V512F32>, cols_avx512<V512F32>};
      case kFloat16: return {row_avx512<V512F16>, cols_avx512<V512F16>};
      case kBFloat16: return {row_avx512<V512BF16>, cols_avx512<V512BF16>};
      default: return {row_avx512_f64, cols_avx512_f64};
    }
  }
  if (isa == Isa::kAvx2) {
    static const bool f16c = __builtin_cpu_supports("f16c");
    switch (dtype) {
      case kFloat32: return {row_avx2<V256F32>, cols_avx2<V256F32>};
      case kFloat16:
        if (f16c) return {row_avx2<V256F16>, cols_avx2<V256F16>};
        break;
      case kBFloat16: return {row_avx2<V256BF16>, cols_avx2<V256BF16>};
      default: return {row_avx2_f64, cols_generic<F64>};  // float64 columns: rare, left portable
    }
  }
#endif
  (void)isa;
  switch (dtype) {
    case kFloat32: return {row_generic<F32>, cols_generic<F32>};
    case kFloat16: return {row_generic<F16>, cols_generic<F16>};
    case kBFloat16: return {row_generic<BF16>, cols_generic<BF16>};
    default: return {row_generic<F64>, cols_generic<F64>};
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rows of a block of work: at least `unit` elements (so pieces are not tiny) and at
// most kMaxBlocks blocks over `n` rows (so the partials stay O(kMaxBlocks * C)).
int64_t block_rows(int64_t n, int64_t per_row, int64_t unit) {
  const int64_t want = ceil_div(unit, std::max<int64_t>(per_row, 1));
  return std::min(n, std::max(ceil_div(n, kMaxBlocks), want));
}

// Runs fn(p) for every piece p < pieces, on as many threads as give each kThreadWork
// elements. Threads claim runs of consecutive pieces (about kClaim elements, so each
// thread still streams long stretches of memory) from a shared counter rather than
// fixed ranges: on a shared machine one slowed core would otherwise hold up the call.
// Which thread runs a piece does not matter: each piece writes only its own partials.
template <class Fn>
void for_pieces(int64_t pieces, int64_t piece_elems, const Fn& fn) {
  piece_elems = std::max<int64_t>(piece_elems, 1);
  const int workers = plan_ranges(pieces, std::max<int64_t>(1, kThreadWork / piece_elems));
  if (workers <= 1) {
    for (int64_t p = 0; p < pieces; ++p) fn(p);
    return;
  }
  // At least 8 claims per worker, so the last claims even out the finish.
  const int64_t step = std::max<int64_t>(1, std::min(kClaim / piece_elems, pieces / (8 * workers)));
  std::atomic<int64_t> next{0};
  parallel_ranges(workers, 1, [&](int64_t, int64_t, int) {
    for (int64_t p0 = next.fetch_add(step, std::memory_order_relaxed); p0 < pieces;
         p0 = next.fetch_add(step, std::memory_order_relaxed))
      for (int64_t p = p0; p < std::min(pieces, p0 + step); ++p) fn(p);
  });
}

// sums[c] += sum over blocks q < nq, then j < J, of psum[(q * C + c) * J + j]; the same
// for the counts. The order per channel is fixed (q, then j); the loops run over
// channels innermost so the adds of different channels overlap.
void add_partials(const double* psum /* [nq, C, J] */, const int64_t* ppos /* [nq, C, J] */, int64_t nq,
                  int64_t C, int64_t J, const ChannelStatsArgs& a) {
  std::vector<double> t(static_cast<size_t>(C), 0.0);
  std::vector<int64_t> k(static_cast<size_t>(C), 0);
  for (int64_t q = 0; q < nq; ++q)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t j = 0; j < J; ++j) {
        t[static_cast<size_t>(c)] += psum[(q * C + c) * J + j];
        k[static_cast<size_t>(c)] += ppos[(q * C + c) * J + j];
      }
  for (int64_t c = 0; c < C; ++c) {
    a.sums[c] += t[static_cast<size_t>(c)];
    a.positives[c] += k[static_cast<size_t>(c)];
  }
}

// Zeroed partials [n] (sums and counts). Kept per calling thread between calls up to
// kKeepPartials entries: a fresh multi-megabyte vector each call is fresh pages from the
// kernel, faulted in and zeroed every time. (Worker threads never take partials.)
class Partials {
 public:
  explicit Partials(size_t n) {
    thread_local std::vector<double> keep_sum;
    thread_local std::vector<int64_t> keep_pos;
    std::vector<double>& vs = n <= kKeepPartials ? keep_sum : own_sum_;
    std::vector<int64_t>& vp = n <= kKeepPartials ? keep_pos : own_pos_;
    if (vs.size() < n) {
      vs.resize(n);
      vp.resize(n);
    }
    std::fill_n(vs.begin(), n, 0.0);
    std::fill_n(vp.begin(), n, int64_t{0});
    sum = vs.data();
    pos = vp.data();
  }
  double* sum;
  int64_t* pos;

 private:
  std::vector<double> own_sum_;
  std::vector<int64_t> own_pos_;
};

// [B, C, S], S > 1. A piece is (batch block bb, channel block cb, segment sc); a channel
// block is one channel when rows are cut into segments (S > kRun), else enough channels
// for a kUnit-long contiguous stretch per sample, so that a piece is one run of memory
// where it can be. Partials are [nbb, C, nsc].
void run_rows(const ChannelStatsArgs& a, RowFn row) {
  const int64_t B = a.B, C = a.C, S = a.S;
  const int64_t nsc = ceil_div(S, kRun), seg = std::min(S, kRun);
  const int64_t cblock = nsc > 1 ? 1 : std::min(C, ceil_div(kUnit, S));
  const int64_t ncb = ceil_div(C, cblock);
  const int64_t bblock = block_rows(B, cblock * seg, kUnit), nbb = ceil_div(B, bblock);
  const int64_t pieces = nbb * ncb * nsc;
  Partials part(static_cast<size_t>(nbb * C * nsc));
  double* psum = part.sum;
  int64_t* ppos = part.pos;
  const char* x = static_cast<const char*>(a.x);
  const int64_t es = dtype_size(a.x_dtype);
  for_pieces(pieces, bblock * cblock * seg, [&](int64_t p) {
    const int64_t sc = p % nsc, cb = (p / nsc) % ncb, bb = p / (nsc * ncb);
    const int64_t s0 = sc * kRun, len = std::min(kRun, S - s0);
    const int64_t c0 = cb * cblock, c1 = std::min(C, c0 + cblock);
    const int64_t b0 = bb * bblock, b1 = std::min(B, b0 + bblock);
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t c = c0; c < c1; ++c) {
        const RowStat r = row(x + ((b * C + c) * S + s0) * es, len);
        const int64_t q = (bb * C + c) * nsc + sc;
        psum[q] += r.sum;
        ppos[q] += r.pos;
      }
    }
  });
  add_partials(psum, ppos, nbb, C, nsc, a);
}

// Rows of W contiguous columns: R = B * S rows of the C channels (channels_last, or
// S = 1: F = 1), or, for short NCHW rows, B rows of C * S columns whose runs of F = S
// columns fold into one channel at the end. A piece is (row block rb, column block cb);
// partials are [nrb, W].
void run_columns(const ChannelStatsArgs& a, ColFn cols, int64_t R, int64_t F) {
  const int64_t C = a.C, W = C * F;
  const int64_t cw = std::min(W, kChannelBlock), ncb = ceil_div(W, cw);
  // int32 lane counts: a row block stays below 2^31 rows.
  const int64_t rblock = std::min<int64_t>(block_rows(R, cw, kColUnit), int64_t{1} << 30), nrb = ceil_div(R, rblock);
  const int64_t pieces = nrb * ncb;
  Partials part(static_cast<size_t>(nrb * W));
  double* psum = part.sum;
  int64_t* ppos = part.pos;
  const char* x = static_cast<const char*>(a.x);
  const int64_t es = dtype_size(a.x_dtype);
  // A piece counts in int32 lanes (its row block has < 2^31 rows), then stores int64.
  for_pieces(pieces, rblock * cw, [&](int64_t p) {
    const int64_t cb = p % ncb, rb = p / ncb;
    const int64_t c0 = cb * cw, w = std::min(cw, W - c0);
    const int64_t r0 = rb * rblock, r1 = std::min(R, r0 + rblock);
    int32_t cnt[kChannelBlock] = {};
    double* acc = psum + rb * W + c0;
    cols(x + (r0 * W + c0) * es, r1 - r0, W, w, acc, cnt);
    for (int64_t c = 0; c < w; ++c) ppos[rb * W + c0 + c] = cnt[c];
  });
  add_partials(psum, ppos, nrb, C, F, a);
}

}  // namespace

void channel_stats_cpu(const ChannelStatsArgs& a) {
  check_channel_stats_args(a);
  const Kernels k = pick_kernels(active_isa(), a.x_dtype);
  if (a.channels_last || a.S == 1) {
    run_columns(a, k.cols, a.B * a.S, 1);
  } else if (a.S < kShortRow && (a.B >= 4 || a.C * a.S <= kUnit)) {
    // Short rows: a horizontal add per row would cost as much as the row. The partials
    // [row blocks, C * S] stay below a quarter of x's elements with 4 samples or more.
    run_columns(a, k.cols, a.B, a.S);
  } else {
    run_rows(a, k.row);
  }
}

}  // namespace nnmark
