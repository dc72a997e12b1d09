// CPU dense projection with an explicit X[T, N] (imported keys). Sizes are small
// in practice (Uchida: T=256, N=576), so plain loops the compiler vectorises.
#include <algorithm>
#include <vector>

#include "common/dtype.h"
#include "cpu/parallel.h"
#include "ops/dense_projection.h"

namespace nnmark {
namespace {

template <typename Acc>
void forward_impl(const DenseForwardArgs& a) {
  const int64_t C = a.C, N = a.N, T = a.T;
  const Acc* x = static_cast<const Acc*>(a.x);
  Acc* p = static_cast<Acc*>(a.p);
  // Carriers converted once to Acc: [C, N].
  std::vector<Acc> w(static_cast<size_t>(C) * N);
  for (int64_t c = 0; c < C; ++c)
    for (int64_t i = 0; i < N; ++i) w[c * N + i] = load_as<Acc>(a.w, a.w_dtype, c * N + i);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, N * C));
  parallel_ranges(T, grain, [&](int64_t tb, int64_t te, int) {
    for (int64_t t = tb; t < te; ++t) {
      const Acc* xt = x + t * N;
      for (int64_t c = 0; c < C; ++c) {
        const Acc* wc = w.data() + c * N;
        // Eight partial sums: vectorisable without reassociating one long chain.
        double s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t i = 0;
        for (; i + 8 <= N; i += 8)
          for (int k = 0; k < 8; ++k) s[k] += static_cast<double>(xt[i + k]) * wc[i + k];
        for (; i < N; ++i) s[0] += static_cast<double>(xt[i]) * wc[i];
        p[c * T + t] = static_cast<Acc>(((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])));
      }
    }
  });
}

template <typename Acc>
void backward_impl(const DenseBackwardArgs& a) {
  const int64_t C = a.C, N = a.N, T = a.T;
  const Acc* x = static_cast<const Acc*>(a.x);
  const Acc* gp = static_cast<const Acc*>(a.gp);
  Acc* gw = static_cast<Acc*>(a.gw);
  const int64_t grain = std::max<int64_t>(256, (int64_t{1} << 18) / std::max<int64_t>(1, T * C));
  parallel_ranges(N, grain, [&](int64_t ib, int64_t ie, int) {
    for (int64_t c = 0; c < C; ++c) {
      Acc* g = gw + c * N;
      for (int64_t i = ib; i < ie; ++i) g[i] = Acc(0);
      for (int64_t t = 0; t < T; ++t) {
        const Acc s = gp[c * T + t];
        const Acc* xt = x + t * N;
        for (int64_t i = ib; i < ie; ++i) g[i] += s * xt[i];
      }
    }
  });
}

}  // namespace

void dense_forward_cpu(const DenseForwardArgs& a) {
  check_dense_args(a);
  if (a.x_dtype == kFloat64) forward_impl<double>(a);
  else forward_impl<float>(a);
}

void dense_backward_cpu(const DenseBackwardArgs& a) {
  check_dense_args(a);
  if (a.x_dtype == kFloat64) backward_impl<double>(a);
  else backward_impl<float>(a);
}

}  // namespace nnmark
