// Black-box (trigger-set) verification of K checkpoints in one call.
//
// For each checkpoint k and trigger row b of logits[k, b, :] (C classes):
//   top-1:  argmax over the C logits, ties resolved to the LOWEST index (as torch.argmax);
//   hit:    top-1 == labels[b]; a row holding any NaN logit is a miss;
//   margin: logits[k, b, label] - max over the other C - 1 classes, in float64.
// Outputs per checkpoint:
//   hits[k]    = number of hit rows (0..B);
//   margin[k]  = mean row margin, float64 accumulation. Rows whose margin is NaN (a NaN
//                logit in the row, or the label and runner-up both the same infinity)
//                are left out of the mean; NaN when no row is left;
//   p_value[k] = P[Binomial(B, null_rate) >= hits[k]], exact, in double (1.0 for 0 hits).
// The mean is summed in a fixed order (rows in tiles of kTriggerTileRows, tiles in order),
// the same on the CPU and on CUDA and independent of the thread count.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace nnmark {

struct TriggerVerifyArgs {
  const void* logits;     // [K, B, C] dense, C-contiguous, dtype logits_dtype
  int logits_dtype;       // DType code (float32, float64, float16, bfloat16)
  const int64_t* labels;  // [B] trigger labels, each in [0, C)
  int64_t K, B, C;        // checkpoints, triggers, classes (C >= 2)
  double null_rate;       // hit probability of one row under the null, in (0, 1)
  int64_t* hits;          // [K] out: rows whose top-1 equals the label
  double* margin;         // [K] out: mean margin over the rows (NaN margins left out)
  double* p_value;        // [K] out: P[Binomial(B, null_rate) >= hits]
};

// Rows per partial sum: both twins sum margins over these tiles in row order, then
// the tiles in order, so CPU and CUDA (and any thread count) give the same mean.
constexpr int64_t kTriggerTileRows = 256;

// CPU: all pointers on the host. Checks every label (std::invalid_argument naming it).
void trigger_verify_cpu(const TriggerVerifyArgs& a);
// CUDA: logits, labels and the three outputs on the current device; launched on
// `stream` (a cudaStream_t as an integer). Labels are not checked here (the Python
// layer does); a label out of range makes its row a miss with a NaN margin.
void trigger_verify_cuda(const TriggerVerifyArgs& a, uintptr_t stream);

// Sizes, dtype, null rate and pointers; throws std::invalid_argument.
void check_trigger_verify_args(const TriggerVerifyArgs& a);

// ------------------------------------------------------------------ exact binomial tail
// Shared host/device math (no lgamma): the pmf at one point by Loader's saddle-point
// form (as R's dbinom), log(pmf) = stirlerr(n) - stirlerr(x) - stirlerr(n - x)
// - bd0(x, np) - bd0(n - x, nq) - log(2 pi x (n - x) / n) / 2, then the tail by the
// pmf ratio recurrence, always summing the side that is the smaller tail:
//   hits > n p:  sf = pmf(h) * sum_{k >= h} pmf(k) / pmf(h)       (terms fall with k)
//   hits <= n p: sf = 1 - pmf(h-1) * sum_{k < h} pmf(k) / pmf(h-1) (sf > 1/2 here)
// The sums are relative to their first term, so tails far below DBL_MIN of the
// individual terms do not underflow before the final exp (results down to ~1e-308).
namespace binomial_detail {

// log(n!) - log(sqrt(2 pi n) (n / e)^n) for an integer n >= 0 (0 at n = 0).
NNMARK_HD double stirlerr(double n) {
  constexpr double kSmall[16] = {
      0.0,                       0.08106146679532725822,   0.041340695955409294094,
      0.027677925684998339149,   0.020790672103765093112,  0.016644691189821192163,
      0.013876128823070747999,   0.011896709945891770095,  0.010411265261972096497,
      0.0092554621827127329177,  0.0083305634333628712565, 0.007573675487951840795,
      0.0069428401072095298657,  0.0064089941880042070684, 0.0059513701127588477356,
      0.005554733551962801371};
  if (n <= 15.0) return kSmall[static_cast<int>(n)];
  const double S0 = 1.0 / 12, S1 = 1.0 / 360, S2 = 1.0 / 1260, S3 = 1.0 / 1680, S4 = 1.0 / 1188;
  const double nn = n * n;
  if (n > 500) return (S0 - S1 / nn) / n;
  if (n > 80) return (S0 - (S1 - S2 / nn) / nn) / n;
  if (n > 35) return (S0 - (S1 - (S2 - S3 / nn) / nn) / nn) / n;
  return (S0 - (S1 - (S2 - (S3 - S4 / nn) / nn) / nn) / nn) / n;
}

// x log(x / m) + m - x, without the cancellation near x = m (series in v = (x-m)/(x+m)).
NNMARK_HD double bd0(double x, double m) {
  if (fabs(x - m) < 0.1 * (x + m)) {
    double v = (x - m) / (x + m);
    double s = (x - m) * v;
    double ej = 2 * x * v;
    v *= v;
    for (int j = 1; j < 1000; ++j) {
      ej *= v;
      const double s1 = s + ej / (2 * j + 1);
      if (s1 == s) return s1;
      s = s1;
    }
    return s;
  }
  return x * log(x / m) + m - x;
}

// log P[X = x] for X ~ Binomial(n, p), 0 <= x <= n, q = 1 - p.
NNMARK_HD double log_pmf(double x, double n, double p, double q) {
  if (x == 0) return n * log1p(-p);
  if (x == n) return n * log(p);
  const double lc = stirlerr(n) - stirlerr(x) - stirlerr(n - x) - bd0(x, n * p) - bd0(n - x, n * q);
  const double lf = 1.8378770664093454836 /* log(2 pi) */ + log(x) + log1p(-x / n);
  return lc - 0.5 * lf;
}

}  // namespace binomial_detail

// Exact P[X >= h] for X ~ Binomial(n, p): n >= 1, 0 < p < 1. 1 for h <= 0, 0 for h > n.
NNMARK_HD double binomial_sf(int64_t h, int64_t n, double p) {
  using namespace binomial_detail;
  if (h <= 0) return 1.0;
  if (h > n) return 0.0;
  const double q = 1.0 - p, dn = static_cast<double>(n);
  // Stop once the rest of the (geometrically falling) terms is below 2^-60 of the sum.
  const double tiny = 8.673617379884035e-19;
  if (static_cast<double>(h) > dn * p) {  // upper tail: terms fall from k = h on
    const double pq = p / q;
    double r = 1, s = 1;
    for (int64_t k = h; k < n; ++k) {
      const double rho = static_cast<double>(n - k) * pq / static_cast<double>(k + 1);
      r *= rho;
      s += r;
      if (rho < 1 && r * rho < tiny * s * (1 - rho)) break;
    }
    return exp(log_pmf(static_cast<double>(h), dn, p, q) + log(s));
  }
  // lower side: sf = 1 - P[X <= h - 1], terms fall from k = h - 1 down.
  const double qp = q / p;
  double r = 1, s = 1;
  for (int64_t k = h - 1; k > 0; --k) {
    const double rho = static_cast<double>(k) * qp / static_cast<double>(n - k + 1);
    r *= rho;
    s += r;
    if (rho < 1 && r * rho < tiny * s * (1 - rho)) break;
  }
  const double cdf = exp(log_pmf(static_cast<double>(h - 1), dn, p, q) + log(s));
  return cdf >= 1 ? 0.0 : 1.0 - cdf;
}

}  // namespace nnmark
