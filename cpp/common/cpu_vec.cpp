#include "common/cpu_vec.h"

// Each loop is compiled twice, for AVX2 + FMA and for baseline x86-64, and the AVX2 version is called where
// the CPU has it. (GCC's target_clones picks clones by CPU model for "arch=" targets, which misses AMD CPUs;
// this checks the features themselves.) The loops are forced inline so each copy is compiled for its target.
#define MA_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) && defined(__GNUC__)
#define MA_HAS_AVX2_PATH 1
#define MA_AVX2 __attribute__((target("avx2,fma")))
#endif

namespace mamba_adaptor::cpu {

namespace {

template <typename T>
MA_INLINE void axpy_impl(T* __restrict y, T a, const T* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

template <int K, typename T>
MA_INLINE void row_taps_k(T* __restrict y, const T* __restrict w, const T* __restrict x, int64_t step, int64_t n) {
  T wk[K];
  for (int j = 0; j < K; ++j) wk[j] = w[j];
  for (int64_t i = 0; i < n; ++i) {
    T sum = y[i];
    for (int j = 0; j < K; ++j) sum += wk[j] * x[i + j * step];
    y[i] = sum;
  }
}

template <typename T>
MA_INLINE void row_taps_impl(T* y, const T* w, int64_t k, const T* x, int64_t step, int64_t n) {
  switch (k) {
    case 1: row_taps_k<1>(y, w, x, step, n); break;
    case 3: row_taps_k<3>(y, w, x, step, n); break;
    case 5: row_taps_k<5>(y, w, x, step, n); break;
    case 7: row_taps_k<7>(y, w, x, step, n); break;
    default:
      for (int64_t j = 0; j < k; ++j) axpy_impl(y, w[j], x + j * step, n);
  }
}

// 16 independent partial sums, added pairwise at the end: vectorisable, and the same order on every run.
template <typename T>
MA_INLINE T dot_impl(const T* __restrict a, const T* __restrict x, int64_t n) {
  constexpr int64_t kLanes = 16;
  T lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) lanes[j] += a[i + j] * x[i + j];
  }
  for (int64_t j = 0; i + j < n; ++j) lanes[j] += a[i + j] * x[i + j];
  for (int64_t width = kLanes / 2; width > 0; width /= 2) {
    for (int64_t j = 0; j < width; ++j) lanes[j] += lanes[j + width];
  }
  return lanes[0];
}

#ifdef MA_HAS_AVX2_PATH
template <typename T>
MA_AVX2 void axpy_avx2(T* y, T a, const T* x, int64_t n) { axpy_impl(y, a, x, n); }
template <typename T>
MA_AVX2 void row_taps_avx2(T* y, const T* w, int64_t k, const T* x, int64_t step, int64_t n) {
  row_taps_impl(y, w, k, x, step, n);
}
template <typename T>
MA_AVX2 T dot_avx2(const T* a, const T* x, int64_t n) { return dot_impl(a, x, n); }

bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#define MA_DISPATCH(name, ...) return has_avx2() ? name##_avx2(__VA_ARGS__) : name##_impl(__VA_ARGS__)
#else
#define MA_DISPATCH(name, ...) return name##_impl(__VA_ARGS__)
#endif

}  // namespace

void axpy(float* y, float a, const float* x, int64_t n) { MA_DISPATCH(axpy, y, a, x, n); }
void axpy(double* y, double a, const double* x, int64_t n) { MA_DISPATCH(axpy, y, a, x, n); }
void row_taps(float* y, const float* w, int64_t k, const float* x, int64_t step, int64_t n) {
  MA_DISPATCH(row_taps, y, w, k, x, step, n);
}
void row_taps(double* y, const double* w, int64_t k, const double* x, int64_t step, int64_t n) {
  MA_DISPATCH(row_taps, y, w, k, x, step, n);
}
float dot(const float* a, const float* x, int64_t n) { MA_DISPATCH(dot, a, x, n); }
double dot(const double* a, const double* x, int64_t n) { MA_DISPATCH(dot, a, x, n); }

}  // namespace mamba_adaptor::cpu
