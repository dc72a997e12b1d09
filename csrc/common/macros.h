// Shared macros: host/device qualifiers and checks that throw with the failing
// expression and the actual values (never exit(), never status codes).
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#define NNMARK_HD __host__ __device__ __forceinline__
#else
#define NNMARK_HD inline
#endif

namespace nnmark {

template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

}  // namespace nnmark

// Bad argument from the caller -> std::invalid_argument (ValueError in Python).
#define NNMARK_CHECK_ARG(cond, ...)                                              \
  do {                                                                           \
    if (!(cond))                                                                 \
      throw std::invalid_argument(::nnmark::concat("nnmark: check `", #cond,     \
                                                   "` failed: ", __VA_ARGS__));  \
  } while (0)

// Failure while running -> std::runtime_error (RuntimeError in Python).
#define NNMARK_CHECK_RT(cond, ...)                                               \
  do {                                                                           \
    if (!(cond))                                                                 \
      throw std::runtime_error(::nnmark::concat("nnmark: check `", #cond,        \
                                                "` failed: ", __VA_ARGS__));     \
  } while (0)
