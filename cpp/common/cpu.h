// Helpers for the CPU kernels: dtype dispatch, the float32 (float64) accumulation type, parallel loops.
#pragma once

#include <torch/csrc/stable/ops.h>

#include <cstdint>
#include <type_traits>

#include "common/cpu_vec.h"  // Half, BFloat16
#include "common/dtype.h"

namespace mamba_adaptor::cpu {

// Calls f(T{}) with T the C++ type of `dtype`.
template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: f(float{}); break;
    case DType::Float64: f(double{}); break;
    case DType::Float16: f(Half{}); break;
    case DType::BFloat16: f(BFloat16{}); break;
  }
}

// Every kernel accumulates in float32, and in float64 for float64 inputs.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// The n values at x as Acc: x itself when T is Acc, else converted into `buffer`.
template <typename T>
const acc_t<T>* as_acc(const T* x, acc_t<T>* buffer, int64_t n) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    return x;
  } else {
    convert(buffer, x, n);
    return buffer;
  }
}

// Where output values are computed in Acc: in the output itself when T is Acc, else in `buffer`, then stored to
// the output by store_out.
template <typename T>
acc_t<T>* acc_out(T* out, acc_t<T>* buffer) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    return out;
  } else {
    return buffer;
  }
}

template <typename T>
void store_out(T* out, const acc_t<T>* values, int64_t n) {
  if constexpr (!std::is_same_v<T, acc_t<T>>) convert(out, values, n);
}

// Runs f(begin, end) on ranges that cover [0, n), spread over torch's intra-op threads (one range per thread);
// `cost` is a rough count of operations of one index, so that tiny problems stay on one thread.
template <typename F>
void parallel_ranges(int64_t n, int64_t cost, const F& f) {
  const int64_t grain = cost >= 32768 ? 1 : (32768 + cost - 1) / (cost < 1 ? 1 : cost);
  torch::stable::parallel_for(0, n, grain, f);
}

// Runs f(i) for i in [0, n), as parallel_ranges.
template <typename F>
void parallel_over(int64_t n, int64_t cost, const F& f) {
  parallel_ranges(n, cost, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) f(i);
  });
}

}  // namespace mamba_adaptor::cpu
