// CPU radix select over the magnitudes of a list of tensors (see ops/magnitude_select.h).
// Keys are the bit patterns of |w|, which order like the values for non-negative
// floats: 32-bit keys when every tensor is float32/float16/bfloat16 (three passes of
// 11/11/10 bits), 64-bit keys (of |w| as double) when any tensor is float64 (four
// passes of 16 bits). Extra memory: one histogram per thread (16 KiB or 512 KiB).
#include <algorithm>
#include <cstring>
#include <vector>

#include "common/dtype.h"
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
  // Ties before each range, so every range knows which of its ties are pruned.
  std::vector<int64_t> tie_start(static_cast<size_t>(ranges) + 1, 0);
  if (ties > 0 && ties < sel.equal) {
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
        if (key == tkey) zero = (ties >= sel.equal) || (seen++ < ties);
        if (zero) std::memset(base + i * es, 0, static_cast<size_t>(es));
      }
    });
  });
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
  return needs_64bit(list) ? select<uint64_t>(list, offsets, k) : select<uint32_t>(list, offsets, k);
}

void magnitude_prune_cpu(const MagnitudeList& list, int64_t k, const MagnitudeSelection& sel) {
  const std::vector<int64_t> offsets = check_and_offsets(list);
  NNMARK_CHECK_ARG(k >= 0 && k <= offsets[list.L], "k must be in [0, ", offsets[list.L], "], got ", k);
  if (k == 0) return;
  NNMARK_CHECK_ARG(sel.below < k && k <= sel.below + sel.equal, "selection does not hold rank k=", k,
                   " (below=", sel.below, ", equal=", sel.equal, ")");
  if (needs_64bit(list)) prune<uint64_t>(list, offsets, k, sel);
  else prune<uint32_t>(list, offsets, k, sel);
}

}  // namespace nnmark
