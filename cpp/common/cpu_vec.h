// Vector loops of the CPU kernels, compiled twice (AVX2+FMA and baseline x86-64) and picked at run time, so
// one wheel runs everywhere and uses wide vectors where the CPU has them.
#pragma once

#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <cstdint>

namespace mamba_adaptor::cpu {

using Half = torch::headeronly::Half;
using BFloat16 = torch::headeronly::BFloat16;

// y[i] += a * x[i]
void axpy(float* y, float a, const float* x, int64_t n);
void axpy(double* y, double a, const double* x, int64_t n);
// y[i] += sum_{j < k} w[j] * x[i + j * step], for k in {1, 3, 5, 7} (one row of a convolution kernel)
void row_taps(float* y, const float* w, int64_t k, const float* x, int64_t step, int64_t n);
void row_taps(double* y, const double* w, int64_t k, const double* x, int64_t step, int64_t n);
// y[i] = sum_{j < m} coefs[j] * rows[j][i] for i < n, summed in order of j (rows may alias each other, not y)
void combine(float* y, const float* const* rows, const float* coefs, int64_t m, int64_t n);
void combine(double* y, const double* const* rows, const double* coefs, int64_t m, int64_t n);
// out[j] = sum_{i < n} x[i] * rows[j][i] for j < m, in a fixed order: m dot products sharing x, in one pass
void dots(float* out, const float* x, const float* const* rows, int64_t m, int64_t n);
void dots(double* out, const double* x, const double* const* rows, int64_t m, int64_t n);
// sum_i a[i] * x[i], in a fixed order (the same result on every run)
float dot(const float* a, const float* x, int64_t n);
double dot(const double* a, const double* x, int64_t n);
// y[i] += a[i] * x[i]
void fma_add(float* y, const float* a, const float* x, int64_t n);
void fma_add(double* y, const double* a, const double* x, int64_t n);

// y[j * ldy + i] = x[i * ldx + j] for i < rows, j < cols: y holds the transpose of the (rows, cols) block at x
void transpose(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t rows, int64_t cols);
void transpose(double* y, int64_t ldy, const double* x, int64_t ldx, int64_t rows, int64_t cols);

// torch.nn.functional.softplus's threshold: softplus(x) = x above it.
constexpr double kSoftplusThreshold = 20;
// y[i] = softplus(x[i] + b) = log1p(exp(x[i] + b)), or x[i] + b above kSoftplusThreshold, within ~2.5 ulp; y may be x
void softplus(float* y, const float* x, float b, int64_t n);
void softplus(double* y, const double* x, double b, int64_t n);
// y[i] = exp(a * x[i]), within ~1 ulp (subnormal results included)
void exp_scaled(float* y, float a, const float* x, int64_t n);
void exp_scaled(double* y, double a, const double* x, int64_t n);
// h[j, i] = a[j, i] * h[j, i - 1] + x[j, i] from h[j, -1] = 0, in order along i, for `rows` independent rows j of
// n values (shapes (rows, n)), whose dependency chains run kRecurrenceRows at a time; h may be x
constexpr int64_t kRecurrenceRows = 4;
void linear_recurrence(float* h, const float* a, const float* x, int64_t n, int64_t rows);
void linear_recurrence(double* h, const double* a, const double* x, int64_t n, int64_t rows);
// The same run backwards: h[j, i] = a[j, i + 1] * h[j, i + 1] + x[j, i] from h[j, n] = 0, in order of decreasing i
// (the adjoint of linear_recurrence); h may be x
void linear_recurrence_reverse(float* h, const float* a, const float* x, int64_t n, int64_t rows);
void linear_recurrence_reverse(double* h, const double* a, const double* x, int64_t n, int64_t rows);
// y[i] = d softplus(x[i] + b) / dx = sigmoid(x[i] + b) = 1 / (1 + exp(-x[i] - b)), or 1 above kSoftplusThreshold; y may
// be x
void softplus_grad(float* y, const float* x, float b, int64_t n);
void softplus_grad(double* y, const double* x, double b, int64_t n);
// sum_i x[i], in a fixed order
float sum(const float* x, int64_t n);
double sum(const double* x, int64_t n);
// The decay terms of one chain of selective_scan's backward, shapes (n,): with w[i] = g[i] * a[i] * h[i - 1] and
// h[-1] = 0, y[i] += s * w[i]; returns sum_i w[i] * x[i], in a fixed order
float scan_decay_grad(float* y, float s, const float* g, const float* a, const float* h, const float* x, int64_t n);
double scan_decay_grad(double* y, double s, const double* g, const double* a, const double* h, const double* x,
                       int64_t n);

// y[i] = x[i] between float and the 16-bit types, bit for bit as torch converts them (widening is exact,
// narrowing rounds to nearest even), NaN payloads aside; the same-type overloads copy. The kernels load their
// inputs into float rows and store float rows back through these.
void convert(float* y, const Half* x, int64_t n);
void convert(float* y, const BFloat16* x, int64_t n);
void convert(Half* y, const float* x, int64_t n);
void convert(BFloat16* y, const float* x, int64_t n);
template <typename T>
void convert(T* y, const T* x, int64_t n) {
  std::copy_n(x, n, y);
}

}  // namespace mamba_adaptor::cpu

namespace mamba_adaptor::cpu {

// Depthwise convolution rows in channels_last: n pixels of C channels (C a multiple of 16), pixel i at i * C;
// x[j] is the input row read by tap j, already shifted by the tap's offset.
// y[i, c] = b[c] + sum_{j < taps} w[j][c] * x[j][i * C + c]
void channels_last_taps(float* y, const float* b, int64_t n, int64_t C, const float* const* x, const float* const* w,
                        int64_t taps);
void channels_last_taps(double* y, const double* b, int64_t n, int64_t C, const double* const* x,
                        const double* const* w, int64_t taps);
// Its backward from the same rows read with flipped offsets: g[j] is the output gradient row read by tap j, x the
// input row at the pixels of gx. gx[i, c] = sum_j w[j][c] * g[j][i * C + c] and
// gw[j][c] += sum_{i < n} x[i * C + c] * g[j][i * C + c], summed in a fixed order (the same result on every run)
void channels_last_taps_backward(float* gx, float* const* gw, const float* x, int64_t n, int64_t C,
                                 const float* const* g, const float* const* w, int64_t taps);
void channels_last_taps_backward(double* gx, double* const* gw, const double* x, int64_t n, int64_t C,
                                 const double* const* g, const double* const* w, int64_t taps);
// s[c] += sum_{i < n} x[i * C + c], in a fixed order
void channels_last_sum(float* s, const float* x, int64_t n, int64_t C);
void channels_last_sum(double* s, const double* x, int64_t n, int64_t C);

}  // namespace mamba_adaptor::cpu
