// CPU radix select over the magnitudes of a list of tensors (see ops/magnitude_select.h).
// Keys are the bit patterns of |w|, which order like the values for non-negative
// floats. All-float32 lists of 1M+ weights take a sampled fast path first (one
// streaming pass, see select_sampled_f32); otherwise, and whenever that misses: 32-bit keys when every tensor is float32/float16/bfloat16 (three passes of
// 11/11/10 bits), 64-bit keys (of |w| as double) when any tensor is float64 (four
// passes of 16 bits). Extra memory: one histogram per thread (16 KiB or 512 KiB).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define NNMARK_X86 1
#endif

#include "common/dtype.h"
#include "cpu/isa.h"
#include "cpu/parallel.h"
#include "ops/magnitude_select.h"

namespace nnmark {
namespace {

inline uint32_t key32(const void* base, int d, int64_t i) {
  uint32_t u;
  float f;
  switch (d) {
    case kFloat32: std::memcpy(&u, static_cast<const float*>(base) + i, 4); return u & 0x7FFFFFFFu;
    case kBFloat16: return (static_cast<uint32_t>(static_cast<const uint16_t*>(base)[i]) << 16) & 0x7FFFFFFFu;
    default:
      f = half_to_float(static_cast<const uint16_t*>(base)[i]);
      std::memcpy(&u, &f, 4);
      return u & 0x7FFFFFFFu;
  }
}

inline uint64_t key64(const void* base, int d, int64_t i) {
  double v = d == kFloat64 ? static_cast<const double*>(base)[i] : static_cast<double>(load_as<float>(base, d, i));
  uint64_t u;
  std::memcpy(&u, &v, 8);
  return u & 0x7FFFFFFFFFFFFFFFull;
}

template <typename Key>
Key key_of(const void* base, int d, int64_t i) {
  if constexpr (sizeof(Key) == 4) return key32(base, d, i);
  else return key64(base, d, i);
}

template <typename Key>
double key_value(Key k) {
  if constexpr (sizeof(Key) == 4) {
    float f;
    std::memcpy(&f, &k, 4);
    return f;
  } else {
    double v;
    std::memcpy(&v, &k, 8);
    return v;
  }
}

// Calls fn(data, dtype, i0, i1, tensor) for the pieces of tensors covering global
// elements [begin, end) (the list flattened in order).
template <typename F>
void for_pieces(const MagnitudeList& list, const std::vector<int64_t>& offsets, int64_t begin, int64_t end, F&& fn) {
  int64_t t = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
  for (; t < list.L && offsets[t] < end; ++t) {
    const int64_t i0 = std::max<int64_t>(begin, offsets[t]) - offsets[t];
    const int64_t i1 = std::min<int64_t>(end, offsets[t] + list.sizes[t]) - offsets[t];
    if (i1 > i0) fn(list.data[t], list.dtypes[t], i0, i1, t);
  }
}

std::vector<int64_t> check_and_offsets(const MagnitudeList& list) {
  NNMARK_CHECK_ARG(list.L >= 1, "the list of tensors is empty");
  std::vector<int64_t> offsets(static_cast<size_t>(list.L) + 1, 0);
  for (int64_t t = 0; t < list.L; ++t) {
    check_dtype(list.dtypes[t], "tensor");
    NNMARK_CHECK_ARG(list.sizes[t] >= 0, "tensor ", t, " has negative size ", list.sizes[t]);
    NNMARK_CHECK_ARG(list.sizes[t] == 0 || list.data[t] != nullptr, "tensor ", t, " has a null data pointer");
    offsets[t + 1] = offsets[t] + list.sizes[t];
  }
  return offsets;
}

constexpr int64_t kGrain = 1 << 16;

template <typename Key>
MagnitudeSelection select(const MagnitudeList& list, const std::vector<int64_t>& offsets, int64_t k) {
  constexpr int kKeyBits = sizeof(Key) == 4 ? 31 : 63;  // the sign bit is always clear
  constexpr int kDigit = sizeof(Key) == 4 ? 11 : 16;
  const int64_t total = offsets[list.L];
  const int ranges = std::max(1, plan_ranges(total, kGrain));
  Key prefix = 0, mask = 0;
  int64_t rank = k, below = 0, equal = 0;
  for (int hi = kKeyBits; hi > 0; hi -= kDigit) {
    const int bits = std::min(kDigit, hi), shift = hi - bits;
    const int64_t nb = int64_t{1} << bits;
    std::vector<int64_t> hist(static_cast<size_t>(ranges) * nb, 0);  // [range, bucket]
    parallel_ranges(total, kGrain, [&](int64_t b, int64_t e, int w) {
      int64_t* h = hist.data() + static_cast<size_t>(w) * nb;
      for_pieces(list, offsets, b, e, [&](const void* data, int d, int64_t i0, int64_t i1, int64_t) {
        if (sizeof(Key) == 4 && d == kFloat32) {  // the common case, without a dtype switch per element
          const uint32_t* u = static_cast<const uint32_t*>(data);
          for (int64_t i = i0; i < i1; ++i) {
            const Key key = static_cast<Key>(u[i] & 0x7FFFFFFFu);
            if ((key & mask) == prefix) ++h[(key >> shift) & static_cast<Key>(nb - 1)];
          }
          return;
        }
        for (int64_t i = i0; i < i1; ++i) {
          const Key key = key_of<Key>(data, d, i);
          if ((key & mask) == prefix) ++h[(key >> shift) & static_cast<Key>(nb - 1)];
        }
      });
    });
    for (int w = 1; w < ranges; ++w)
      for (int64_t j = 0; j < nb; ++j) hist[j] += hist[static_cast<size_t>(w) * nb + j];
    int64_t j = 0;
    while (rank > hist[j]) {  // the bucket holding rank k among the candidates
      rank -= hist[j];
      below += hist[j];
      ++j;
    }
    prefix |= static_cast<Key>(j) << shift;
    mask |= static_cast<Key>(nb - 1) << shift;
    equal = hist[j];
  }
  return MagnitudeSelection{key_value<Key>(prefix), below, equal};
}

template <typename Key>
void prune(const MagnitudeList& list, const std::vector<int64_t>& offsets, int64_t k, const MagnitudeSelection& sel) {
  const int64_t total = offsets[list.L];
  const int64_t ties = k - sel.below;  // ties to prune, in order
  Key tkey;
  if constexpr (sizeof(Key) == 4) {
    const float f = static_cast<float>(sel.threshold);
    std::memcpy(&tkey, &f, 4);
  } else {
    std::memcpy(&tkey, &sel.threshold, 8);
  }
  const int ranges = std::max(1, plan_ranges(total, kGrain));
  // |w| == 0 ties are zero already: all are taken (a -0.0 turns +0.0), as on CUDA.
  const bool all_ties = ties >= sel.equal || tkey == 0;
  // Ties before each range, so every range knows which of its ties are pruned.
  std::vector<int64_t> tie_start(static_cast<size_t>(ranges) + 1, 0);
  if (ties > 0 && !all_ties) {
    parallel_ranges(total, kGrain, [&](int64_t b, int64_t e, int w) {
      int64_t c = 0;
      for_pieces(list, offsets, b, e, [&](const void* data, int d, int64_t i0, int64_t i1, int64_t) {
        for (int64_t i = i0; i < i1; ++i) c += key_of<Key>(data, d, i) == tkey;
      });
      tie_start[w + 1] = c;
    });
    for (int w = 0; w < ranges; ++w) tie_start[w + 1] += tie_start[w];
  }
  parallel_ranges(total, kGrain, [&](int64_t b, int64_t e, int w) {
    int64_t seen = tie_start[w];
    for_pieces(list, offsets, b, e, [&](const void* data, int d, int64_t i0, int64_t i1, int64_t) {
      const int64_t es = dtype_size(d);
      char* base = static_cast<char*>(const_cast<void*>(data));
      for (int64_t i = i0; i < i1; ++i) {
        const Key key = key_of<Key>(data, d, i);
        bool zero = key < tkey;
        if (key == tkey) zero = ties > 0 && (all_ties || seen++ < ties);
        if (zero) std::memset(base + i * es, 0, static_cast<size_t>(es));
      }
    });
  });
}

// ---- float32 fast path: bracket, one pass, finish on the candidates -----------------
// A sample of the keys brackets rank k in [lo, hi]; one streaming pass counts the keys
// below lo and gathers those inside; nth_element on the gathered few finishes. The
// bracket is wide enough (6 sigma of the sample rank) that a miss is rare; a miss only
// costs the radix select after it, never a wrong answer.
constexpr int64_t kSampledMin = int64_t{1} << 20;  // below this the radix select is quick anyway
constexpr int kLine = 16;                           // samples come in runs of 16: one cache line

inline uint64_t splitmix64(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Counts keys < lo into *below and appends keys in [lo, hi] to buf (room for cap + 16
// more); returns the new fill, or -1 once it would pass cap.
int64_t gather_scalar(const uint32_t* u, int64_t n, uint32_t lo, uint32_t hi, uint32_t* buf, int64_t fill,
                      int64_t cap, int64_t* below) {
  int64_t b = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t key = u[i] & 0x7FFFFFFFu;
    b += key < lo;
    if (key >= lo && key <= hi) {
      if (fill >= cap) return -1;
      buf[fill++] = key;
    }
  }
  *below += b;
  return fill;
}

#if NNMARK_X86
// Branch-free: every 16 keys are compressed in a register and stored whole (a
// memory-destination compress is microcoded on Zen 4), the fill advancing by the count.
__attribute__((target("avx512f,popcnt")))
int64_t gather_avx512(const uint32_t* u, int64_t n, uint32_t lo, uint32_t hi, uint32_t* buf, int64_t fill,
                      int64_t cap, int64_t* below) {
  const __m512i abs = _mm512_set1_epi32(0x7FFFFFFF), vlo = _mm512_set1_epi32(static_cast<int>(lo)),
                vhi = _mm512_set1_epi32(static_cast<int>(hi)), one = _mm512_set1_epi32(1);
  __m512i cnt = _mm512_setzero_si512();  // per-lane counts of keys < lo (< 2^31 per lane for n < 2^35)
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i key = _mm512_and_si512(_mm512_loadu_si512(u + i), abs);
    const __mmask16 lt = _mm512_cmplt_epu32_mask(key, vlo);
    const __mmask16 in = _mm512_mask_cmple_epu32_mask(static_cast<__mmask16>(~lt), key, vhi);
    cnt = _mm512_mask_add_epi32(cnt, lt, cnt, one);
    _mm512_storeu_si512(buf + fill, _mm512_maskz_compress_epi32(in, key));
    fill += _mm_popcnt_u32(in);
    if (fill > cap) return -1;
  }
  alignas(64) uint32_t lanes[16];
  _mm512_store_si512(lanes, cnt);
  for (int l = 0; l < 16; ++l) *below += lanes[l];
  if (fill < 0) return -1;
  return gather_scalar(u + i, n - i, lo, hi, buf, fill, cap, below);
}
#endif

bool all_float32(const MagnitudeList& list) {
  for (int64_t t = 0; t < list.L; ++t)
    if (list.dtypes[t] != kFloat32) return false;
  return true;
}

bool select_sampled_f32(const MagnitudeList& list, const std::vector<int64_t>& offsets, int64_t k,
                        MagnitudeSelection* out) {
  const int64_t total = offsets[list.L];
  // Sample runs of kLine keys at pseudo-random places (fixed seed: results never depend
  // on it, only the time does).
  const int64_t m = std::min<int64_t>(int64_t{1} << 20, std::max<int64_t>(int64_t{1} << 16, total / 100));
  std::vector<uint32_t> sample;
  sample.reserve(static_cast<size_t>(m));
  uint64_t seed = 0x6E6E6D61726Bull ^ static_cast<uint64_t>(total);
  const int64_t lines = (total - kLine) + 1;
  while (static_cast<int64_t>(sample.size()) + kLine <= m) {
    const int64_t g = static_cast<int64_t>(splitmix64(seed) % static_cast<uint64_t>(lines));
    for_pieces(list, offsets, g, g + kLine, [&](const void* data, int, int64_t i0, int64_t i1, int64_t) {
      const uint32_t* u = static_cast<const uint32_t*>(data);
      for (int64_t i = i0; i < i1; ++i) sample.push_back(u[i] & 0x7FFFFFFFu);
    });
  }
  const int64_t ms = static_cast<int64_t>(sample.size());
  const double q = static_cast<double>(k) / static_cast<double>(total);
  // Five standard deviations of the sample rank each side (plus a little for neighbours
  // in a run not being quite independent).
  const double half = 5 * std::sqrt(static_cast<double>(ms) * q * (1 - q)) + 4 * kLine;
  const double r = q * static_cast<double>(ms);
  const int64_t lo_r = static_cast<int64_t>(std::floor(r - half));
  const int64_t hi_r = static_cast<int64_t>(std::ceil(r + half));
  uint32_t lo = 0, hi = 0xFFFFFFFFu;
  auto from = sample.begin();
  if (lo_r > 0) {
    std::nth_element(sample.begin(), sample.begin() + lo_r, sample.end());
    lo = sample[static_cast<size_t>(lo_r)];
    from = sample.begin() + lo_r;  // what is left above lo
  }
  if (hi_r < ms - 1) {
    std::nth_element(from, sample.begin() + hi_r, sample.end());
    hi = sample[static_cast<size_t>(hi_r)];
  }
  if (lo == 0 && hi == 0xFFFFFFFFu) return false;  // no narrowing: the radix select does better
  // Room for twice the expected candidates, per range in proportion to its length.
  const double frac = static_cast<double>(std::min(hi_r, ms) - std::max<int64_t>(lo_r, 0) + 1) / static_cast<double>(ms);
  const int ranges = std::max(1, plan_ranges(total, kGrain));
  const int64_t per_range = (total + ranges - 1) / ranges;
  const int64_t cap = static_cast<int64_t>(2 * frac * static_cast<double>(per_range)) + 4096;
  if (cap * ranges > total / 4) return false;  // a bracket this wide saves nothing
  std::vector<uint32_t> buf(static_cast<size_t>(ranges) * static_cast<size_t>(cap + 16));  // [range, cap + 16]
  std::vector<int64_t> fill(static_cast<size_t>(ranges), 0), below(static_cast<size_t>(ranges), 0);
  std::atomic<bool> missed{false};
#if NNMARK_X86
  const bool avx512 = active_isa() == Isa::kAvx512;
#endif
  parallel_ranges(total, kGrain, [&](int64_t b, int64_t e, int w) {
    uint32_t* mine = buf.data() + static_cast<size_t>(w) * static_cast<size_t>(cap + 16);
    int64_t f = 0, bl = 0;
    for_pieces(list, offsets, b, e, [&](const void* data, int, int64_t i0, int64_t i1, int64_t) {
      if (f < 0 || missed.load(std::memory_order_relaxed)) return;
      const uint32_t* u = static_cast<const uint32_t*>(data) + i0;
#if NNMARK_X86
      if (avx512) {
        f = gather_avx512(u, i1 - i0, lo, hi, mine, f, cap, &bl);
        return;
      }
#endif
      f = gather_scalar(u, i1 - i0, lo, hi, mine, f, cap, &bl);
    });
    if (f < 0) missed.store(true, std::memory_order_relaxed);
    fill[w] = f;
    below[w] = bl;
  });
  if (missed.load()) return false;
  int64_t n_below = 0, n_in = 0;
  for (int w = 0; w < ranges; ++w) {  // pack the ranges' candidates together
    std::memmove(buf.data() + n_in, buf.data() + static_cast<size_t>(w) * static_cast<size_t>(cap + 16),
                 static_cast<size_t>(fill[w]) * 4);
    n_in += fill[w];
    n_below += below[w];
  }
  if (!(n_below < k && k <= n_below + n_in)) return false;  // rank k fell outside the bracket
  const int64_t rank = k - n_below;  // 1-based among the candidates
  std::nth_element(buf.begin(), buf.begin() + (rank - 1), buf.begin() + n_in);
  const uint32_t t = buf[static_cast<size_t>(rank - 1)];
  int64_t less = 0, equal = 0;
  for (int64_t i = 0; i < n_in; ++i) {
    less += buf[i] < t;
    equal += buf[i] == t;
  }
  *out = MagnitudeSelection{key_value<uint32_t>(t), n_below + less, equal};
  return true;
}

// Zeroes every float32 with |w| < t (or <= t with `ties`), in place; with `eq`, also
// notes where |w| == t (the caller zeroes the first few of those, in order).
void prune_below_f32(float* p, int64_t n, uint32_t t, bool ties, std::vector<uint32_t*>* eq) {
  uint32_t* u = reinterpret_cast<uint32_t*>(p);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t key = u[i] & 0x7FFFFFFFu;
    if (key < t || (ties && key == t)) u[i] = 0;
    else if (eq != nullptr && key == t) eq->push_back(u + i);
  }
}

#if NNMARK_X86
__attribute__((target("avx512f")))
void prune_below_f32_avx512(float* p, int64_t n, uint32_t t, bool ties, std::vector<uint32_t*>* eq) {
  uint32_t* u = reinterpret_cast<uint32_t*>(p);
  const __m512i abs = _mm512_set1_epi32(0x7FFFFFFF), vt = _mm512_set1_epi32(static_cast<int>(t)),
                zero = _mm512_setzero_si512();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i key = _mm512_and_si512(_mm512_loadu_si512(u + i), abs);
    const __mmask16 z = ties ? _mm512_cmple_epu32_mask(key, vt) : _mm512_cmplt_epu32_mask(key, vt);
    if (z) _mm512_mask_storeu_epi32(u + i, z, zero);  // only the lines that change are written
    if (eq != nullptr) {
      for (unsigned m = _mm512_cmpeq_epu32_mask(key, vt); m != 0; m &= m - 1) eq->push_back(u + i + __builtin_ctz(m));
    }
  }
  prune_below_f32(p + i, n - i, t, ties, eq);
}
#endif

// float32 pruning in one vector pass. When only some ties go (0 < k - below < equal),
// the pass notes where the ties are and the first k - below of them, in order, are
// zeroed after it. Returns false where that list would be too long (then the generic
// two-pass prune runs).
bool prune_f32(const MagnitudeList& list, const std::vector<int64_t>& offsets, int64_t k,
               const MagnitudeSelection& sel) {
  const int64_t ties = k - sel.below;
  const float f = static_cast<float>(sel.threshold);
  uint32_t t;
  std::memcpy(&t, &f, 4);
  // |w| == 0 ties are zero already (a -0.0 turns +0.0): take them all.
  const bool all_ties = ties == sel.equal || t == 0;
  const bool partial = ties > 0 && !all_ties;
  if (partial && sel.equal > (int64_t{1} << 22)) return false;
  const int ranges = std::max(1, plan_ranges(offsets[list.L], kGrain));
  std::vector<std::vector<uint32_t*>> eq(static_cast<size_t>(ranges));  // [range] tie positions, in order
#if NNMARK_X86
  const bool avx512 = active_isa() == Isa::kAvx512;
#endif
  parallel_ranges(offsets[list.L], kGrain, [&](int64_t b, int64_t e, int w) {
    std::vector<uint32_t*>* mine = partial ? &eq[static_cast<size_t>(w)] : nullptr;
    for_pieces(list, offsets, b, e, [&](const void* data, int, int64_t i0, int64_t i1, int64_t) {
      float* p = static_cast<float*>(const_cast<void*>(data)) + i0;
#if NNMARK_X86
      if (avx512) return prune_below_f32_avx512(p, i1 - i0, t, all_ties && ties > 0, mine);
#endif
      prune_below_f32(p, i1 - i0, t, all_ties && ties > 0, mine);
    });
  });
  int64_t left = partial ? ties : 0;
  for (size_t w = 0; w < eq.size() && left > 0; ++w)
    for (size_t j = 0; j < eq[w].size() && left > 0; ++j, --left) *eq[w][j] = 0;
  return true;
}

bool needs_64bit(const MagnitudeList& list) {
  for (int64_t t = 0; t < list.L; ++t)
    if (list.dtypes[t] == kFloat64) return true;
  return false;
}

}  // namespace

MagnitudeSelection magnitude_select_cpu(const MagnitudeList& list, int64_t k) {
  const std::vector<int64_t> offsets = check_and_offsets(list);
  NNMARK_CHECK_ARG(k >= 1 && k <= offsets[list.L], "k must be in [1, ", offsets[list.L], "], got ", k);
  if (needs_64bit(list)) return select<uint64_t>(list, offsets, k);
  MagnitudeSelection sel;
  if (offsets[list.L] >= kSampledMin && all_float32(list) && select_sampled_f32(list, offsets, k, &sel)) return sel;
  return select<uint32_t>(list, offsets, k);
}

void magnitude_prune_cpu(const MagnitudeList& list, int64_t k, const MagnitudeSelection& sel) {
  const std::vector<int64_t> offsets = check_and_offsets(list);
  NNMARK_CHECK_ARG(k >= 0 && k <= offsets[list.L], "k must be in [0, ", offsets[list.L], "], got ", k);
  if (k == 0) return;
  NNMARK_CHECK_ARG(sel.below < k && k <= sel.below + sel.equal, "selection does not hold rank k=", k,
                   " (below=", sel.below, ", equal=", sel.equal, ")");
  if (needs_64bit(list)) return prune<uint64_t>(list, offsets, k, sel);
  if (all_float32(list) && prune_f32(list, offsets, k, sel)) return;
  prune<uint32_t>(list, offsets, k, sel);
}

}  // namespace nnmark
