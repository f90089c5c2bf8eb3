#include "common/cpu_vec.h"

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <string>

#ifdef __x86_64__
#include <cpuid.h>
#include <immintrin.h>
#endif

// Each loop is compiled twice, for AVX2 + FMA (+ F16C, which every AVX2 CPU has) and for baseline x86-64, and
// the AVX2 version is called where the CPU has it. (GCC's target_clones picks clones by CPU model for "arch="
// targets, which misses AMD CPUs; this checks the features themselves.) The loops are forced inline so each
// copy is compiled for its target. The environment variable MAMBA_ADAPTOR_CPU_CAPABILITY ("default", "avx2" or
// "avx512", like torch's ATEN_CPU_CAPABILITY) caps the build used, so one machine can test them all.
#define MA_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) && defined(__GNUC__)
#define MA_HAS_AVX2_PATH 1
#define MA_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

namespace mamba_adaptor::cpu {

namespace {

// Bytes bytes of T. at(p) is the vector at p, which needs only T's alignment and may alias T.
template <typename T, int Bytes>
struct Vec {
  typedef T type __attribute__((vector_size(Bytes)));
  typedef T unaligned __attribute__((vector_size(Bytes), aligned(alignof(T)), may_alias));
  static constexpr int64_t lanes = Bytes / sizeof(T);
  static MA_INLINE const unaligned& at(const T* p) { return *reinterpret_cast<const unaligned*>(p); }
  static MA_INLINE unaligned& at(T* p) { return *reinterpret_cast<unaligned*>(p); }
};

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

// Sums run in 16 independent partial sums (lanes[i % 16] += term i), added pairwise at the end: vectorisable,
// and the same order on every run.
constexpr int64_t kSumLanes = 16;

template <typename T>
MA_INLINE T add_lanes(T* lanes) {
  for (int64_t width = kSumLanes / 2; width > 0; width /= 2) {
    for (int64_t j = 0; j < width; ++j) lanes[j] += lanes[j + width];
  }
  return lanes[0];
}

template <typename T>
MA_INLINE T dot_impl(const T* __restrict a, const T* __restrict x, int64_t n) {
  T lanes[kSumLanes] = {};
  int64_t i = 0;
  for (; i + kSumLanes <= n; i += kSumLanes) {
    for (int64_t j = 0; j < kSumLanes; ++j) lanes[j] += a[i + j] * x[i + j];
  }
  for (int64_t j = 0; i + j < n; ++j) lanes[j] += a[i + j] * x[i + j];
  return add_lanes(lanes);
}

// U vectors of y at a time in registers, while every row adds to them.
template <int Bytes, int U, typename T>
MA_INLINE int64_t combine_block(T* y, const T* const* rows, const T* coefs, int64_t m, int64_t i, int64_t n) {
  using V = Vec<T, Bytes>;
  for (; i + U * V::lanes <= n; i += U * V::lanes) {
    typename V::type acc[U] = {};
    for (int64_t j = 0; j < m; ++j) {
      for (int u = 0; u < U; ++u) acc[u] += coefs[j] * V::at(rows[j] + i + u * V::lanes);
    }
    for (int u = 0; u < U; ++u) V::at(y + i + u * V::lanes) = acc[u];
  }
  return i;
}

template <int Bytes = 16, typename T>
MA_INLINE void combine_impl(T* y, const T* const* rows, const T* coefs, int64_t m, int64_t n) {
  int64_t i = combine_block<Bytes, 4>(y, rows, coefs, m, 0, n);
  i = combine_block<Bytes, 1>(y, rows, coefs, m, i, n);
  for (; i < n; ++i) {
    T sum = 0;
    for (int64_t j = 0; j < m; ++j) sum += coefs[j] * rows[j][i];
    y[i] = sum;
  }
}

// M dot products sharing x: M independent vector accumulators, so that the additions of one do not wait on
// the previous ones (a single dot of a short row is bound by that latency).
template <int Bytes, int M, typename T>
MA_INLINE void dots_group(T* out, const T* __restrict x, const T* const* rows, int64_t n) {
  using V = Vec<T, Bytes>;
  typename V::type acc[M] = {};
  int64_t i = 0;
  for (; i + V::lanes <= n; i += V::lanes) {
    const typename V::type xi = V::at(x + i);
    for (int j = 0; j < M; ++j) acc[j] += xi * V::at(rows[j] + i);
  }
  for (int j = 0; j < M; ++j) {
    T sum = 0;
    for (int64_t l = 0; l < V::lanes; ++l) sum += acc[j][l];
    for (int64_t t = i; t < n; ++t) sum += x[t] * rows[j][t];
    out[j] = sum;
  }
}

// Groups of up to 8 rows, each in one pass over x.
template <int Bytes = 16, typename T>
MA_INLINE void dots_impl(T* out, const T* x, const T* const* rows, int64_t m, int64_t n) {
  for (int64_t j = 0; j < m; j += 8) {
    switch (std::min<int64_t>(8, m - j)) {
      case 1: dots_group<Bytes, 1>(out + j, x, rows + j, n); break;
      case 2: dots_group<Bytes, 2>(out + j, x, rows + j, n); break;
      case 3: dots_group<Bytes, 3>(out + j, x, rows + j, n); break;
      case 4: dots_group<Bytes, 4>(out + j, x, rows + j, n); break;
      case 5: dots_group<Bytes, 5>(out + j, x, rows + j, n); break;
      case 6: dots_group<Bytes, 6>(out + j, x, rows + j, n); break;
      case 7: dots_group<Bytes, 7>(out + j, x, rows + j, n); break;
      default: dots_group<Bytes, 8>(out + j, x, rows + j, n);
    }
  }
}

template <typename T>
MA_INLINE T sum_impl(const T* __restrict x, int64_t n) {
  T lanes[kSumLanes] = {};
  int64_t i = 0;
  for (; i + kSumLanes <= n; i += kSumLanes) {
    for (int64_t j = 0; j < kSumLanes; ++j) lanes[j] += x[i + j];
  }
  for (int64_t j = 0; i + j < n; ++j) lanes[j] += x[i + j];
  return add_lanes(lanes);
}

// From i = 1 (w[0] = 0): the terms of g, a, x at i + 1 and of h at i.
template <typename T>
MA_INLINE T scan_decay_grad_impl(T* __restrict y, T s, const T* __restrict g, const T* __restrict a,
                                 const T* __restrict h, const T* __restrict x, int64_t n) {
  T lanes[kSumLanes] = {};
  ++y, ++g, ++a, ++x, --n;
  int64_t i = 0;
  for (; i + kSumLanes <= n; i += kSumLanes) {
    for (int64_t j = 0; j < kSumLanes; ++j) {
      const T w = g[i + j] * a[i + j] * h[i + j];
      y[i + j] += s * w;
      lanes[j] += w * x[i + j];
    }
  }
  for (int64_t j = 0; i + j < n; ++j) {
    const T w = g[i + j] * a[i + j] * h[i + j];
    y[i + j] += s * w;
    lanes[j] += w * x[i + j];
  }
  return add_lanes(lanes);
}

template <typename T>
MA_INLINE void fma_add_impl(T* __restrict y, const T* __restrict a, const T* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a[i] * x[i];
}

// In blocks of kTransposeBlock x kTransposeBlock, whose rows and columns stay in cache.
constexpr int64_t kTransposeBlock = 8;

template <typename T>
MA_INLINE void transpose_block(T* __restrict y, int64_t ldy, const T* __restrict x, int64_t ldx, int64_t rows,
                               int64_t cols) {
  for (int64_t j = 0; j < cols; ++j) {
    for (int64_t i = 0; i < rows; ++i) y[j * ldy + i] = x[i * ldx + j];
  }
}

template <typename T>
MA_INLINE void transpose_impl(T* y, int64_t ldy, const T* x, int64_t ldx, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; i += kTransposeBlock) {
    for (int64_t j = 0; j < cols; j += kTransposeBlock) {
      transpose_block(y + j * ldy + i, ldy, x + i * ldx + j, ldx, std::min(kTransposeBlock, rows - i),
                      std::min(kTransposeBlock, cols - j));
    }
  }
}

// 16-bit <-> float. bfloat16 is the top half of a float: the loops below are torch's conversions written so
// that they vectorise. Half has no such trick: its baseline loops convert one value at a time, the AVX2 build
// uses the F16C instructions.
MA_INLINE void convert_impl(float* __restrict y, const BFloat16* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = static_cast<uint32_t>(x[i].x) << 16;
    std::memcpy(y + i, &bits, sizeof(float));
  }
}

MA_INLINE void convert_impl(BFloat16* __restrict y, const float* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, x + i, sizeof(float));
    const bool nan = (bits & 0x7fffffffu) > 0x7f800000u;
    y[i].x = static_cast<uint16_t>(nan ? 0x7fc0u : (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
  }
}

MA_INLINE void convert_impl(float* __restrict y, const Half* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = static_cast<float>(x[i]);
}

MA_INLINE void convert_impl(Half* __restrict y, const float* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = static_cast<Half>(x[i]);
}

// exp and softplus, branch-free so that their loops vectorise.

// The IEEE layout of float and double: unsigned type of the same width, mantissa bits, exponent bias.
template <typename T>
struct Ieee;
template <>
struct Ieee<float> {
  using U = uint32_t;
  static constexpr int kMantissa = 23, kBias = 127;
};
template <>
struct Ieee<double> {
  using U = uint64_t;
  static constexpr int kMantissa = 52, kBias = 1023;
};

template <typename T>
MA_INLINE typename Ieee<T>::U to_bits(T x) {
  typename Ieee<T>::U u;
  std::memcpy(&u, &x, sizeof x);
  return u;
}

template <typename T>
MA_INLINE T from_bits(typename Ieee<T>::U u) {
  T x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

constexpr long double kLn2 = 0.693147180559945309417232121458176568L;

// c[0] + c[1] x + c[2] x^2 + ...: Horner's scheme in x^2 over the pairs c[2j] + c[2j+1] x, half as many dependent
// steps as in x (long dependency chains, more than the operation count, bound the loops below).
template <typename T, size_t K>
MA_INLINE T poly(T x, const std::array<T, K>& c) {
  auto pair = [&](size_t j) { return 2 * j + 1 < K ? c[2 * j] + c[2 * j + 1] * x : c[2 * j]; };
  const T x2 = x * x;
  T p = pair((K - 1) / 2);
  for (size_t j = (K - 1) / 2; j-- > 0;) p = p * x2 + pair(j);
  return p;
}

// 1/2!, 1/3!, ..., 1/(K+1)!: exp(r) = 1 + r + r^2 (1/2! + r/3! + ...)
template <typename T, size_t K>
constexpr std::array<T, K> exp_series() {
  std::array<T, K> c{};
  long double f = 1;
  for (size_t i = 0; i < K; ++i) c[i] = static_cast<T>(1 / (f *= static_cast<long double>(i + 2)));
  return c;
}

// 2/3, 2/5, ..., 2/(2K+1): 2 atanh(s) = 2s + s w (2/3 + 2/5 w + ...), w = s^2
template <typename T, size_t K>
constexpr std::array<T, K> atanh_series() {
  std::array<T, K> c{};
  for (size_t i = 0; i < K; ++i) c[i] = static_cast<T>(2.0L / (2 * i + 3));
  return c;
}

// exp(x), within ~1 ulp. x = k ln2 + r with |r| <= ln2/2 (k ln2_hi is exact for the k in range), exp(r) by its
// Taylor series (to r^7 for float, r^13 for double: truncation < 0.1 ulp), times 2^k applied as 2^(k/2) 2^(k - k/2)
// so that subnormal results and those just below overflow need no special case. x is first clamped to where the
// result is already 0 or inf; NaN stays NaN.
template <typename T>
MA_INLINE T exp_impl(T x) {
  using U = typename Ieee<T>::U;
  constexpr int kBits = Ieee<T>::kMantissa, kBias = Ieee<T>::kBias;
  constexpr bool kFloat = sizeof(T) == 4;
  constexpr T kLo = kFloat ? -104 : -746, kHi = kFloat ? 89 : 710;
  constexpr T kLog2e = static_cast<T>(1 / kLn2);
  constexpr T kLn2Hi = static_cast<T>(static_cast<int64_t>(kLn2 * (int64_t(1) << (kBits - 11)) + 0.5L)) /
                       static_cast<T>(int64_t(1) << (kBits - 11));  // 12 bits fewer than T: k ln2_hi is exact
  constexpr T kLn2Lo = static_cast<T>(kLn2 - kLn2Hi);
  constexpr T kRound = static_cast<T>(U(3) << (kBits - 1));  // 1.5 * 2^kBits: adding it rounds to an integer
  constexpr auto kSeries = exp_series<T, kFloat ? 6 : 12>();
  x = x < kLo ? kLo : x;
  x = x > kHi ? kHi : x;
  const T shifted = x * kLog2e + kRound;  // k in the low mantissa bits
  const T k = shifted - kRound;
  const T r = (x - k * kLn2Hi) - k * kLn2Lo;
  const T e = (r + r * r * poly(r, kSeries)) + T(1);
  const U biased = to_bits(shifted) - to_bits(kRound) + U(2 * kBias);  // k + 2 bias, > 0 after the clamp
  const U half = biased >> 1;                                           // floor(k / 2) + bias
  return e * from_bits<T>(half << kBits) * from_bits<T>((biased - half) << kBits);
}

// log1p(z) for z in [0, 1] (NaN stays NaN), within ~1 ulp. u = 1 + z = 2^k (1 + f) with k in {0, 1} and f in
// [sqrt(1/2) - 1, sqrt(2) - 1]; c = z - (u - 1) is the rounding error of u, so log1p(z) = k ln2 + log1p(f) + c / u.
// log1p(f) = 2 atanh(s) with s = f / (2 + f), written f - f^2/2 + s (f^2/2 + R) as in fdlibm, R by the atanh series
// (|s| <= 0.172; 4 terms for float, 10 for double: truncation < 0.05 ulp).
template <typename T>
MA_INLINE T log1p_unit(T z) {
  constexpr bool kFloat = sizeof(T) == 4;
  constexpr T kLn2Hi = static_cast<T>(kLn2);
  constexpr T kLn2Lo = static_cast<T>(kLn2 - kLn2Hi);
  constexpr T kSqrt2 = static_cast<T>(1.41421356237309504880168872420969808L);
  constexpr auto kSeries = atanh_series<T, kFloat ? 4 : 10>();
  const T u = T(1) + z;
  const T c = z - (u - T(1));
  const T k = u > kSqrt2 ? T(1) : T(0);  // selects between constants only: GCC then keeps one copy of what follows
  const T scale = T(1) - T(0.5) * k;     // 2^-k
  const T f = u * scale - T(1);
  const T s = f / (T(2) + f), w = s * s;
  const T hf = T(0.5) * f * f;
  const T log1p_f = f - hf + s * (hf + w * poly(w, kSeries));
  return k * kLn2Hi + (log1p_f + (k * kLn2Lo + c / u));
}

// softplus(v) = max(v, 0) + log1p(exp(-|v|)), and v itself above the threshold; NaN gives NaN, -inf gives 0. exp and
// log1p run as two loops over blocks: one loop doing both is bound by the latency of its long dependency chain and
// runs ~1.4x slower.
template <typename T>
MA_INLINE void softplus_impl(T* y, const T* x, T b, int64_t n) {
  constexpr int64_t kBlock = 256;
  T z[kBlock];
  for (int64_t begin = 0; begin < n; begin += kBlock) {
    const int64_t m = std::min(kBlock, n - begin);
    const T* xb = x + begin;
    for (int64_t i = 0; i < m; ++i) {
      const T v = xb[i] + b;
      z[i] = exp_impl(v < 0 ? v : -v);
    }
    for (int64_t i = 0; i < m; ++i) {
      const T v = xb[i] + b;
      const T sp = (v > 0 ? v : T(0)) + log1p_unit(z[i]);
      y[begin + i] = v > T(kSoftplusThreshold) ? v : sp;
    }
  }
}

// NaN gives NaN, -inf gives 0 (exp(inf) clamps to inf).
template <typename T>
MA_INLINE void softplus_grad_impl(T* y, const T* x, T b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const T v = x[i] + b;
    const T s = T(1) / (T(1) + exp_impl(-v));
    y[i] = v > T(kSoftplusThreshold) ? T(1) : s;
  }
}

template <typename T>
MA_INLINE void exp_scaled_impl(T* __restrict y, T a, const T* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = exp_impl(a * x[i]);
}

// R rows at once: their dependency chains overlap.
template <int R, typename T>
MA_INLINE void linear_recurrence_rows(T* h, const T* a, const T* x, int64_t n) {
  T carry[R] = {};
  for (int64_t i = 0; i < n; ++i) {
    for (int j = 0; j < R; ++j) h[j * n + i] = carry[j] = a[j * n + i] * carry[j] + x[j * n + i];
  }
}

template <int R, typename T>
MA_INLINE void linear_recurrence_reverse_rows(T* h, const T* a, const T* x, int64_t n) {
  T carry[R] = {}, decay[R] = {};  // h[j, i + 1], a[j, i + 1]
  for (int64_t i = n - 1; i >= 0; --i) {
    for (int j = 0; j < R; ++j) {
      h[j * n + i] = carry[j] = decay[j] * carry[j] + x[j * n + i];
      decay[j] = a[j * n + i];
    }
  }
}

// Groups of R rows, then the rest (fewer than R) as one group; forward or, with kReverse, backward along i.
template <bool kReverse, int R, typename T>
MA_INLINE void linear_recurrence_groups(T* h, const T* a, const T* x, int64_t n, int64_t rows) {
  if constexpr (R > 0) {
    for (; rows >= R; rows -= R, h += R * n, a += R * n, x += R * n) {
      if constexpr (kReverse) {
        linear_recurrence_reverse_rows<R>(h, a, x, n);
      } else {
        linear_recurrence_rows<R>(h, a, x, n);
      }
    }
    linear_recurrence_groups<kReverse, R - 1>(h, a, x, n, rows);
  }
}

template <typename T>
MA_INLINE void linear_recurrence_impl(T* h, const T* a, const T* x, int64_t n, int64_t rows) {
  linear_recurrence_groups<false, kRecurrenceRows>(h, a, x, n, rows);
}

template <typename T>
MA_INLINE void linear_recurrence_reverse_impl(T* h, const T* a, const T* x, int64_t n, int64_t rows) {
  linear_recurrence_groups<true, kRecurrenceRows>(h, a, x, n, rows);
}

#ifdef MA_HAS_AVX2_PATH
template <typename T>
MA_AVX2 void axpy_avx2(T* y, T a, const T* x, int64_t n) { axpy_impl(y, a, x, n); }
template <typename T>
MA_AVX2 void row_taps_avx2(T* y, const T* w, int64_t k, const T* x, int64_t step, int64_t n) {
  row_taps_impl(y, w, k, x, step, n);
}
template <typename T>
MA_AVX2 void combine_avx2(T* y, const T* const* rows, const T* coefs, int64_t m, int64_t n) {
  combine_impl<32>(y, rows, coefs, m, n);
}
template <typename T>
MA_AVX2 void dots_avx2(T* out, const T* x, const T* const* rows, int64_t m, int64_t n) {
  dots_impl<32>(out, x, rows, m, n);
}
template <typename T>
MA_AVX2 T dot_avx2(const T* a, const T* x, int64_t n) { return dot_impl(a, x, n); }
template <typename T>
MA_AVX2 void fma_add_avx2(T* y, const T* a, const T* x, int64_t n) { fma_add_impl(y, a, x, n); }
template <typename T>
MA_AVX2 void softplus_avx2(T* y, const T* x, T b, int64_t n) { softplus_impl(y, x, b, n); }
template <typename T>
MA_AVX2 void exp_scaled_avx2(T* y, T a, const T* x, int64_t n) { exp_scaled_impl(y, a, x, n); }
template <typename T>
MA_AVX2 void linear_recurrence_avx2(T* h, const T* a, const T* x, int64_t n, int64_t rows) {
  linear_recurrence_impl(h, a, x, n, rows);
}
template <typename T>
MA_AVX2 void linear_recurrence_reverse_avx2(T* h, const T* a, const T* x, int64_t n, int64_t rows) {
  linear_recurrence_reverse_impl(h, a, x, n, rows);
}
template <typename T>
MA_AVX2 void softplus_grad_avx2(T* y, const T* x, T b, int64_t n) { softplus_grad_impl(y, x, b, n); }
template <typename T>
MA_AVX2 T sum_avx2(const T* x, int64_t n) { return sum_impl(x, n); }
template <typename T>
MA_AVX2 T scan_decay_grad_avx2(T* y, T s, const T* g, const T* a, const T* h, const T* x, int64_t n) {
  return scan_decay_grad_impl(y, s, g, a, h, x, n);
}
template <typename T>
MA_AVX2 void transpose_avx2(T* y, int64_t ldy, const T* x, int64_t ldx, int64_t rows, int64_t cols) {
  transpose_impl(y, ldy, x, ldx, rows, cols);
}
// Full 8 x 8 float blocks in eight registers (unpack pairs of rows, shuffle pairs of pairs, swap 128-bit halves).
template <>
MA_AVX2 void transpose_avx2(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t rows, int64_t cols) {
  static_assert(kTransposeBlock == 8);
  for (int64_t i = 0; i < rows; i += 8) {
    for (int64_t j = 0; j < cols; j += 8) {
      float* yb = y + j * ldy + i;
      const float* xb = x + i * ldx + j;
      if (i + 8 > rows || j + 8 > cols) {
        transpose_block(yb, ldy, xb, ldx, std::min<int64_t>(8, rows - i), std::min<int64_t>(8, cols - j));
        continue;
      }
      __m256 r[8], t[8], s[8];
      for (int k = 0; k < 8; ++k) r[k] = _mm256_loadu_ps(xb + k * ldx);
      for (int k = 0; k < 8; k += 2) {
        t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);
        t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
      }
      for (int k = 0; k < 8; k += 4) {
        s[k] = _mm256_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(1, 0, 1, 0));
        s[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(3, 2, 3, 2));
        s[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(1, 0, 1, 0));
        s[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(3, 2, 3, 2));
      }
      for (int k = 0; k < 4; ++k) {
        _mm256_storeu_ps(yb + k * ldy, _mm256_permute2f128_ps(s[k], s[k + 4], 0x20));
        _mm256_storeu_ps(yb + (k + 4) * ldy, _mm256_permute2f128_ps(s[k], s[k + 4], 0x31));
      }
    }
  }
}
MA_AVX2 void convert_avx2(float* y, const BFloat16* x, int64_t n) { convert_impl(y, x, n); }
MA_AVX2 void convert_avx2(BFloat16* y, const float* x, int64_t n) { convert_impl(y, x, n); }
MA_AVX2 void convert_avx2(float* y, const Half* x, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(y + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i))));
  }
  convert_impl(y + i, x + i, n - i);
}
MA_AVX2 void convert_avx2(Half* y, const float* x, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  convert_impl(y + i, x + i, n - i);
}

// The widest build this CPU runs, capped by MAMBA_ADAPTOR_CPU_CAPABILITY.
enum class Capability { kDefault, kAvx2, kAvx512 };

// F16C is read from CPUID (leaf 1, ECX) itself: GCC before 11 has no __builtin_cpu_supports("f16c").
bool has_f16c() {
  unsigned eax, ebx, ecx, edx;
  return __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C) != 0;
}

Capability capability() {
  static const Capability picked = [] {
    Capability best = Capability::kDefault;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && has_f16c()) {
      best = __builtin_cpu_supports("avx512f") ? Capability::kAvx512 : Capability::kAvx2;
    }
    const char* cap = std::getenv("MAMBA_ADAPTOR_CPU_CAPABILITY");
    if (cap == nullptr || *cap == '\0') return best;
    const std::string value(cap);  // the Python package rejects other values at import
    const Capability wanted = value == "default" ? Capability::kDefault
                              : value == "avx2"  ? Capability::kAvx2
                                                 : Capability::kAvx512;
    return std::min(best, wanted);
  }();
  return picked;
}

bool has_avx2() { return capability() >= Capability::kAvx2; }
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
void combine(float* y, const float* const* rows, const float* coefs, int64_t m, int64_t n) {
  MA_DISPATCH(combine, y, rows, coefs, m, n);
}
void combine(double* y, const double* const* rows, const double* coefs, int64_t m, int64_t n) {
  MA_DISPATCH(combine, y, rows, coefs, m, n);
}
void dots(float* out, const float* x, const float* const* rows, int64_t m, int64_t n) {
  MA_DISPATCH(dots, out, x, rows, m, n);
}
void dots(double* out, const double* x, const double* const* rows, int64_t m, int64_t n) {
  MA_DISPATCH(dots, out, x, rows, m, n);
}
float dot(const float* a, const float* x, int64_t n) { MA_DISPATCH(dot, a, x, n); }
double dot(const double* a, const double* x, int64_t n) { MA_DISPATCH(dot, a, x, n); }
void fma_add(float* y, const float* a, const float* x, int64_t n) { MA_DISPATCH(fma_add, y, a, x, n); }
void fma_add(double* y, const double* a, const double* x, int64_t n) { MA_DISPATCH(fma_add, y, a, x, n); }
void transpose(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t rows, int64_t cols) {
  MA_DISPATCH(transpose, y, ldy, x, ldx, rows, cols);
}
void transpose(double* y, int64_t ldy, const double* x, int64_t ldx, int64_t rows, int64_t cols) {
  MA_DISPATCH(transpose, y, ldy, x, ldx, rows, cols);
}
void softplus(float* y, const float* x, float b, int64_t n) { MA_DISPATCH(softplus, y, x, b, n); }
void softplus(double* y, const double* x, double b, int64_t n) { MA_DISPATCH(softplus, y, x, b, n); }
void exp_scaled(float* y, float a, const float* x, int64_t n) { MA_DISPATCH(exp_scaled, y, a, x, n); }
void exp_scaled(double* y, double a, const double* x, int64_t n) { MA_DISPATCH(exp_scaled, y, a, x, n); }
void linear_recurrence(float* h, const float* a, const float* x, int64_t n, int64_t rows) {
  MA_DISPATCH(linear_recurrence, h, a, x, n, rows);
}
void linear_recurrence(double* h, const double* a, const double* x, int64_t n, int64_t rows) {
  MA_DISPATCH(linear_recurrence, h, a, x, n, rows);
}
void linear_recurrence_reverse(float* h, const float* a, const float* x, int64_t n, int64_t rows) {
  MA_DISPATCH(linear_recurrence_reverse, h, a, x, n, rows);
}
void linear_recurrence_reverse(double* h, const double* a, const double* x, int64_t n, int64_t rows) {
  MA_DISPATCH(linear_recurrence_reverse, h, a, x, n, rows);
}
void softplus_grad(float* y, const float* x, float b, int64_t n) { MA_DISPATCH(softplus_grad, y, x, b, n); }
void softplus_grad(double* y, const double* x, double b, int64_t n) { MA_DISPATCH(softplus_grad, y, x, b, n); }
float sum(const float* x, int64_t n) { MA_DISPATCH(sum, x, n); }
double sum(const double* x, int64_t n) { MA_DISPATCH(sum, x, n); }
float scan_decay_grad(float* y, float s, const float* g, const float* a, const float* h, const float* x, int64_t n) {
  MA_DISPATCH(scan_decay_grad, y, s, g, a, h, x, n);
}
double scan_decay_grad(double* y, double s, const double* g, const double* a, const double* h, const double* x,
                       int64_t n) {
  MA_DISPATCH(scan_decay_grad, y, s, g, a, h, x, n);
}
void convert(float* y, const Half* x, int64_t n) { MA_DISPATCH(convert, y, x, n); }
void convert(float* y, const BFloat16* x, int64_t n) { MA_DISPATCH(convert, y, x, n); }
void convert(Half* y, const float* x, int64_t n) { MA_DISPATCH(convert, y, x, n); }
void convert(BFloat16* y, const float* x, int64_t n) { MA_DISPATCH(convert, y, x, n); }

}  // namespace mamba_adaptor::cpu

// The channels-last loops below come in three builds, picked at run time: AVX-512 (64-byte vectors), AVX2 +
// FMA (32 bytes) and the baseline build (16 bytes).
#ifdef MA_HAS_AVX2_PATH
#define MA_AVX512 __attribute__((target("avx512f,avx2,fma")))
#endif

namespace mamba_adaptor::cpu {

namespace {

// Keeps a loaded vector in a register: without it GCC reloads a vector used by two FMAs as a memory operand
// of each, twice the loads.
template <typename V>
MA_INLINE void keep_in_register(V& v) {
#if defined(__x86_64__) && defined(__GNUC__)
  asm("" : "+v"(v));
#endif
}

// Pixels i .. i + P - 1, channels c .. c + lanes - 1: P accumulators in registers over all taps.
template <int P, int Bytes, typename T>
MA_INLINE void channels_last_taps_block(T* y, const T* b, int64_t C, const T* const* x, const T* const* w,
                                        int64_t taps, int64_t i, int64_t c) {
  using V = Vec<T, Bytes>;
  typename V::type acc[P];
  for (int p = 0; p < P; ++p) acc[p] = V::at(b + c);
  for (int64_t j = 0; j < taps; ++j) {
    const typename V::type wj = V::at(w[j] + c);
    const T* xj = x[j] + i * C + c;
    for (int p = 0; p < P; ++p) acc[p] += wj * V::at(xj + p * C);
  }
  for (int p = 0; p < P; ++p) V::at(y + (i + p) * C + c) = acc[p];
}

template <int Bytes, typename T>
MA_INLINE void channels_last_taps_impl(T* y, const T* b, int64_t n, int64_t C, const T* const* x, const T* const* w,
                                       int64_t taps) {
  // Pixels outermost: the inputs a block reads stay in L1 for the next channels and the next pixels.
  constexpr int64_t lanes = Vec<T, Bytes>::lanes;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int64_t c = 0; c < C; c += lanes) channels_last_taps_block<8, Bytes>(y, b, C, x, w, taps, i, c);
  }
  for (; i + 2 <= n; i += 2) {
    for (int64_t c = 0; c < C; c += lanes) channels_last_taps_block<2, Bytes>(y, b, C, x, w, taps, i, c);
  }
  for (; i < n; ++i) {
    for (int64_t c = 0; c < C; c += lanes) channels_last_taps_block<1, Bytes>(y, b, C, x, w, taps, i, c);
  }
}

// The backward of a block: each tap's g vectors are loaded once for both gradients. gx stays in P registers
// over all taps; each tap's sum over the P pixels (two partial sums, even and odd pixels) is added to gw[j].
template <int P, int Bytes, typename T>
MA_INLINE void channels_last_taps_backward_block(T* gx, T* const* gw, const T* x, int64_t C, const T* const* g,
                                                 const T* const* w, int64_t taps, int64_t i, int64_t c) {
  using V = Vec<T, Bytes>;
  typename V::type acc[P] = {}, xv[P];
  for (int p = 0; p < P; ++p) xv[p] = V::at(x + (i + p) * C + c);
  for (int64_t j = 0; j < taps; ++j) {
    const typename V::type wj = V::at(w[j] + c);
    const T* gj = g[j] + i * C + c;
    typename V::type sum[2] = {};
    for (int p = 0; p < P; ++p) {
      typename V::type gv = V::at(gj + p * C);
      keep_in_register(gv);
      acc[p] += wj * gv;
      sum[p % 2] += xv[p] * gv;
    }
    V::at(gw[j] + c) += sum[0] + sum[1];
  }
  for (int p = 0; p < P; ++p) V::at(gx + (i + p) * C + c) = acc[p];
}

template <int Bytes, typename T>
MA_INLINE void channels_last_taps_backward_impl(T* gx, T* const* gw, const T* x, int64_t n, int64_t C,
                                                const T* const* g, const T* const* w, int64_t taps) {
  constexpr int P = Bytes == 64 ? 8 : 4;  // 2 P + 4 vector registers: 32 with AVX-512, 16 otherwise
  int64_t i = 0;
  for (; i + P <= n; i += P) {
    for (int64_t c = 0; c < C; c += Vec<T, Bytes>::lanes) {
      channels_last_taps_backward_block<P, Bytes>(gx, gw, x, C, g, w, taps, i, c);
    }
  }
  for (; i < n; ++i) {
    for (int64_t c = 0; c < C; c += Vec<T, Bytes>::lanes) {
      channels_last_taps_backward_block<1, Bytes>(gx, gw, x, C, g, w, taps, i, c);
    }
  }
}

// Four partial sums (pixels i % 4 while four are left), added in a fixed order.
template <int Bytes, typename T>
MA_INLINE void channels_last_sum_impl(T* s, const T* x, int64_t n, int64_t C) {
  using V = Vec<T, Bytes>;
  for (int64_t c = 0; c < C; c += V::lanes) {
    typename V::type sum[4] = {};
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
      for (int u = 0; u < 4; ++u) sum[u] += V::at(x + (i + u) * C + c);
    }
    for (; i < n; ++i) sum[0] += V::at(x + i * C + c);
    V::at(s + c) += (sum[0] + sum[1]) + (sum[2] + sum[3]);
  }
}

#ifdef MA_HAS_AVX2_PATH
template <typename T>
MA_AVX512 void channels_last_taps_avx512(T* y, const T* b, int64_t n, int64_t C, const T* const* x,
                                         const T* const* w, int64_t taps) {
  channels_last_taps_impl<64>(y, b, n, C, x, w, taps);
}
template <typename T>
MA_AVX2 void channels_last_taps_avx2(T* y, const T* b, int64_t n, int64_t C, const T* const* x, const T* const* w,
                                     int64_t taps) {
  channels_last_taps_impl<32>(y, b, n, C, x, w, taps);
}
template <typename T>
MA_AVX512 void channels_last_taps_backward_avx512(T* gx, T* const* gw, const T* x, int64_t n, int64_t C,
                                                  const T* const* g, const T* const* w, int64_t taps) {
  channels_last_taps_backward_impl<64>(gx, gw, x, n, C, g, w, taps);
}
template <typename T>
MA_AVX2 void channels_last_taps_backward_avx2(T* gx, T* const* gw, const T* x, int64_t n, int64_t C,
                                              const T* const* g, const T* const* w, int64_t taps) {
  channels_last_taps_backward_impl<32>(gx, gw, x, n, C, g, w, taps);
}
template <typename T>
MA_AVX512 void channels_last_sum_avx512(T* s, const T* x, int64_t n, int64_t C) {
  channels_last_sum_impl<64>(s, x, n, C);
}
template <typename T>
MA_AVX2 void channels_last_sum_avx2(T* s, const T* x, int64_t n, int64_t C) {
  channels_last_sum_impl<32>(s, x, n, C);
}

bool has_avx512() { return capability() >= Capability::kAvx512; }
#define MA_DISPATCH_WIDE(name, ...)                                                                   \
  return has_avx512() ? name##_avx512(__VA_ARGS__)                                                    \
                      : has_avx2() ? name##_avx2(__VA_ARGS__) : name##_impl<16>(__VA_ARGS__)
#else
#define MA_DISPATCH_WIDE(name, ...) return name##_impl<16>(__VA_ARGS__)
#endif

}  // namespace

void channels_last_taps(float* y, const float* b, int64_t n, int64_t C, const float* const* x, const float* const* w,
                        int64_t taps) {
  MA_DISPATCH_WIDE(channels_last_taps, y, b, n, C, x, w, taps);
}
void channels_last_taps(double* y, const double* b, int64_t n, int64_t C, const double* const* x,
                        const double* const* w, int64_t taps) {
  MA_DISPATCH_WIDE(channels_last_taps, y, b, n, C, x, w, taps);
}
void channels_last_taps_backward(float* gx, float* const* gw, const float* x, int64_t n, int64_t C,
                                 const float* const* g, const float* const* w, int64_t taps) {
  MA_DISPATCH_WIDE(channels_last_taps_backward, gx, gw, x, n, C, g, w, taps);
}
void channels_last_taps_backward(double* gx, double* const* gw, const double* x, int64_t n, int64_t C,
                                 const double* const* g, const double* const* w, int64_t taps) {
  MA_DISPATCH_WIDE(channels_last_taps_backward, gx, gw, x, n, C, g, w, taps);
}
void channels_last_sum(float* s, const float* x, int64_t n, int64_t C) {
  MA_DISPATCH_WIDE(channels_last_sum, s, x, n, C);
}
void channels_last_sum(double* s, const double* x, int64_t n, int64_t C) {
  MA_DISPATCH_WIDE(channels_last_sum, s, x, n, C);
}

}  // namespace mamba_adaptor::cpu
