// Device-side helpers shared by the CUDA kernels: dtype dispatch, float conversion, launch checks.
// Torch-free (kernel files see only params structs from cpp/).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.h"

namespace mamba_adaptor::cuda {

// Throws std::runtime_error naming `what` when `err` is not cudaSuccess.
void check(cudaError_t err, const char* what);
// Checks the last kernel launch.
inline void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }
// Number of SMs of the current device (cached per device).
int sm_count();

[[noreturn]] void unsupported_float64(const char* op);

// Calls f(T{}) with T the device type of `dtype`: float, __half or __nv_bfloat16. float64 is CPU-only.
template <typename F>
void dispatch_dtype(DType dtype, const char* op, F&& f) {
  switch (dtype) {
    case DType::Float32: f(float{}); break;
    case DType::Float16: f(__half{}); break;
    case DType::BFloat16: f(__nv_bfloat16{}); break;
    default: unsupported_float64(op);
  }
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace mamba_adaptor::cuda
