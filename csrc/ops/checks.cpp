// Argument rules shared by the CPU and CUDA twins of each op (compiled into both modules).
#include "common/dtype.h"
#include "ops/dense_projection.h"
#include "ops/projection.h"
#include "ops/trigger_verify.h"

namespace nnmark {

void check_projection_args(const ProjectionForwardArgs& a) {
  check_dtype(a.w_dtype, "carrier w");
  NNMARK_CHECK_ARG(a.C >= 1, "number of carriers C must be >= 1, got ", a.C);
  NNMARK_CHECK_ARG(a.N >= 1, "carrier length N must be >= 1, got ", a.N);
  NNMARK_CHECK_ARG(a.T >= 1 && a.T <= (int64_t{1} << 37), "bit count T must be in [1, 2^37], got ", a.T);
  NNMARK_CHECK_ARG(a.w != nullptr && a.p != nullptr, "null data pointer");
  NNMARK_CHECK_ARG(a.col0 >= 0, "first column index col0 must be >= 0, got ", a.col0);
}

void check_projection_args(const ProjectionBackwardArgs& a) {
  NNMARK_CHECK_ARG(a.gp_dtype == kFloat32 || a.gp_dtype == kFloat64,
                   "gradient gp must be float32 or float64, got ", dtype_name(a.gp_dtype));
  NNMARK_CHECK_ARG(a.C >= 1, "number of carriers C must be >= 1, got ", a.C);
  NNMARK_CHECK_ARG(a.N >= 1, "carrier length N must be >= 1, got ", a.N);
  NNMARK_CHECK_ARG(a.T >= 1 && a.T <= (int64_t{1} << 37), "bit count T must be in [1, 2^37], got ", a.T);
  NNMARK_CHECK_ARG(a.gp != nullptr && a.gw != nullptr, "null data pointer");
  NNMARK_CHECK_ARG(a.col0 >= 0, "first column index col0 must be >= 0, got ", a.col0);
}

void check_projection_args(const ProjectionManyKeysArgs& a) {
  NNMARK_CHECK_ARG(a.K >= 1, "number of keys K must be >= 1, got ", a.K);
  NNMARK_CHECK_ARG(a.N >= 1, "carrier length N must be >= 1, got ", a.N);
  NNMARK_CHECK_ARG(a.T >= 1 && a.T <= (int64_t{1} << 37), "bit count T must be in [1, 2^37], got ", a.T);
  NNMARK_CHECK_ARG(a.w != nullptr && a.subkeys != nullptr && a.p != nullptr, "null data pointer");
}

void check_dense_args(const DenseForwardArgs& a) {
  NNMARK_CHECK_ARG(a.x_dtype == kFloat32 || a.x_dtype == kFloat64,
                   "projection matrix X must be float32 or float64, got ", dtype_name(a.x_dtype));
  check_dtype(a.w_dtype, "carrier w");
  NNMARK_CHECK_ARG(a.x_dtype == kFloat32 || a.w_dtype == kFloat64,
                   "a float64 X needs float64 carriers, got ", dtype_name(a.w_dtype));
  NNMARK_CHECK_ARG(a.C >= 1 && a.N >= 1 && a.T >= 1, "sizes must be >= 1, got C=", a.C,
                   " N=", a.N, " T=", a.T);
  NNMARK_CHECK_ARG(a.x && a.w && a.p, "null data pointer");
}

void check_dense_args(const DenseBackwardArgs& a) {
  NNMARK_CHECK_ARG(a.x_dtype == kFloat32 || a.x_dtype == kFloat64,
                   "projection matrix X must be float32 or float64, got ", dtype_name(a.x_dtype));
  NNMARK_CHECK_ARG(a.C >= 1 && a.N >= 1 && a.T >= 1, "sizes must be >= 1, got C=", a.C,
                   " N=", a.N, " T=", a.T);
  NNMARK_CHECK_ARG(a.x && a.gp && a.gw, "null data pointer");
}

void check_trigger_verify_args(const TriggerVerifyArgs& a) {
  check_dtype(a.logits_dtype, "logits");
  NNMARK_CHECK_ARG(a.K >= 1, "number of checkpoints K must be >= 1, got ", a.K);
  NNMARK_CHECK_ARG(a.B >= 1, "number of triggers B must be >= 1, got ", a.B);
  NNMARK_CHECK_ARG(a.C >= 2, "number of classes C must be >= 2, got ", a.C);
  NNMARK_CHECK_ARG(a.null_rate > 0.0 && a.null_rate < 1.0, "null hit rate must be in (0, 1), got ", a.null_rate);
  NNMARK_CHECK_ARG(a.logits && a.labels && a.hits && a.margin && a.p_value, "null data pointer");
}

}  // namespace nnmark
