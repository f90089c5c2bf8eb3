// Vector loops of the CPU kernels, compiled twice (AVX2+FMA and baseline x86-64) and picked at run time, so
// one wheel runs everywhere and uses wide vectors where the CPU has them.
#pragma once

#include <cstdint>

namespace mamba_adaptor::cpu {

// y[i] += a * x[i]
void axpy(float* y, float a, const float* x, int64_t n);
void axpy(double* y, double a, const double* x, int64_t n);
// y[i] += sum_{j < k} w[j] * x[i + j * step], for k in {1, 3, 5, 7} (one row of a convolution kernel)
void row_taps(float* y, const float* w, int64_t k, const float* x, int64_t step, int64_t n);
void row_taps(double* y, const double* w, int64_t k, const double* x, int64_t step, int64_t n);
// sum_i a[i] * x[i], in a fixed order (the same result on every run)
float dot(const float* a, const float* x, int64_t n);
double dot(const double* a, const double* x, int64_t n);

}  // namespace mamba_adaptor::cpu
