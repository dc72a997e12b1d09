// CPU trigger-set verification (ops/trigger_verify.h).
//
// Work items are (checkpoint k, tile j of kTriggerTileRows rows), flattened as
// k * tiles + j and split over threads with parallel_ranges. Each item walks its rows
// in order and writes a partial (hits, margin sum, margin count); a second pass over
// the checkpoints sums the partials in tile order and computes the exact p-value.
// The summation order is fixed, so the result does not depend on the thread count
// (and matches the CUDA twin, which tiles the rows the same way).
//
// A row is read twice as fast loops: the maximum over the classes before the label
// and the maximum over those after it, each with a NaN flag. In the accumulation
// type (float for float32/float16/bfloat16, double for float64) the comparisons are
// exact, and the margin is formed in double from the exact float64 values.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/dtype.h"
#include "cpu/parallel.h"
#include "ops/trigger_verify.h"

namespace nnmark {
namespace {

struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

inline float to_acc(float v) { return v; }
inline double to_acc(double v) { return v; }
inline float to_acc(Half v) { return half_to_float(v.bits); }
inline float to_acc(BFloat16 v) { return bf16_to_float(v.bits); }

template <typename In> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

struct Partial {
  int64_t hits = 0;   // hit rows in the tile
  int64_t count = 0;  // rows with a non-NaN margin
  double sum = 0;     // sum of those margins, in row order
};

// Largest value of row[begin, end) ignoring NaNs (-inf when empty); sets `nan` on any NaN.
template <typename In, typename Acc>
inline Acc max_of(const In* row, int64_t begin, int64_t end, bool& nan) {
  Acc m = -std::numeric_limits<Acc>::infinity();
  bool any_nan = false;
  for (int64_t c = begin; c < end; ++c) {
    const Acc v = to_acc(row[c]);
    any_nan |= (v != v);
    m = v > m ? v : m;
  }
  nan |= any_nan;
  return m;
}

template <typename In>
Partial verify_tile(const In* logits,  // [rows, C] of one checkpoint, from row b0
                    const int64_t* labels,  // [rows], from row b0
                    int64_t rows, int64_t C) {
  using Acc = typename AccOf<In>::type;
  Partial part;
  for (int64_t r = 0; r < rows; ++r) {
    const In* row = logits + r * C;
    const int64_t y = labels[r];
    const Acc lab = to_acc(row[y]);
    bool nan = lab != lab;
    const Acc before = max_of<In, Acc>(row, 0, y, nan);      // classes [0, y)
    const Acc after = max_of<In, Acc>(row, y + 1, C, nan);   // classes (y, C)
    if (nan) continue;  // a miss, and its margin is NaN: left out of the mean
    // Top-1 with ties to the lowest index: the label wins iff it beats every earlier
    // class strictly and every later class or ties with it.
    const bool hit = (y == 0 || lab > before) && lab >= after;
    part.hits += hit;
    const double m = static_cast<double>(lab) - static_cast<double>(before > after ? before : after);
    if (m == m) {  // label and runner-up both +inf (or both -inf) give NaN: left out
      part.sum += m;
      part.count += 1;
    }
  }
  return part;
}

template <typename In>
void run(const TriggerVerifyArgs& a) {
  const In* logits = static_cast<const In*>(a.logits);
  const int64_t tiles = (a.B + kTriggerTileRows - 1) / kTriggerTileRows;
  const int64_t items = a.K * tiles;
  std::vector<Partial> parts(static_cast<size_t>(items));
  // About 64K logits per thread range at least, so small problems stay on one thread.
  const int64_t item_elems = std::min(a.B, kTriggerTileRows) * a.C;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, item_elems));
  parallel_ranges(items, grain, [&](int64_t begin, int64_t end, int) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t k = t / tiles, b0 = (t % tiles) * kTriggerTileRows;
      const int64_t rows = std::min(kTriggerTileRows, a.B - b0);
      parts[static_cast<size_t>(t)] = verify_tile<In>(logits + (k * a.B + b0) * a.C, a.labels + b0, rows, a.C);
    }
  });
  // Per checkpoint: partials in tile order, then the p-value (up to ~B steps each).
  parallel_ranges(a.K, 64, [&](int64_t begin, int64_t end, int) {
    for (int64_t k = begin; k < end; ++k) {
      Partial total;
      for (int64_t j = 0; j < tiles; ++j) {
        const Partial& p = parts[static_cast<size_t>(k * tiles + j)];
        total.hits += p.hits;
        total.count += p.count;
        total.sum += p.sum;
      }
      a.hits[k] = total.hits;
      a.margin[k] = total.count > 0 ? total.sum / static_cast<double>(total.count)
                                    : std::numeric_limits<double>::quiet_NaN();
      a.p_value[k] = binomial_sf(total.hits, a.B, a.null_rate);
    }
  });
}

}  // namespace

void trigger_verify_cpu(const TriggerVerifyArgs& a) {
  check_trigger_verify_args(a);
  for (int64_t b = 0; b < a.B; ++b) {
    const int64_t y = a.labels[b];
    NNMARK_CHECK_ARG(y >= 0 && y < a.C, "label at index ", b, " is ", y, ", expected in [0, ", a.C, ")");
  }
  switch (a.logits_dtype) {
    case kFloat32: return run<float>(a);
    case kFloat64: return run<double>(a);
    case kFloat16: return run<Half>(a);
    default: return run<BFloat16>(a);
  }
}

}  // namespace nnmark
