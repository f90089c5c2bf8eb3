// Device-side helpers shared by the CUDA kernels: dtype dispatch, float conversion, launch checks, ordered sums.
// Torch-free (kernel files see only params structs from cpp/).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/dtype.h"

namespace mamba_adaptor::cuda {

// Throws std::runtime_error naming `what` when `err` is not cudaSuccess.
void check(cudaError_t err, const char* what);
// Checks the last kernel launch.
inline void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }
// Number of SMs of the current device (cached per device and thread).
int sm_count();
// The most shared memory, static and dynamic together, one block may use on the current device
// (cudaDevAttrMaxSharedMemoryPerBlockOptin: 163 KiB on sm_80, 227 KiB on sm_90, 99 KiB on sm_86, sm_89 and
// sm_120; cached per device and thread). The kernels' shared-memory plans are computed from it.
size_t max_block_smem();

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

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Calls f(std::true_type{}) or f(std::false_type{}): a run-time flag as a compile-time constant
// (decltype(flag)::value inside f), for choosing a kernel instantiation.
template <typename F>
void bool_switch(bool flag, F&& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// The float values of the 4 / sizeof(T) elements of T packed in one 32-bit word, the lower address first.
__device__ __forceinline__ void unpack_word(uint32_t word, float* out, float) { out[0] = __uint_as_float(word); }
__device__ __forceinline__ void unpack_word(uint32_t word, float* out, __half) {
  out[0] = __half2float(__ushort_as_half(static_cast<unsigned short>(word & 0xffffu)));
  out[1] = __half2float(__ushort_as_half(static_cast<unsigned short>(word >> 16)));
}
__device__ __forceinline__ void unpack_word(uint32_t word, float* out, __nv_bfloat16) {
  out[0] = __uint_as_float(word << 16);
  out[1] = __uint_as_float(word & 0xffff0000u);
}
// The word of the 4 / sizeof(T) elements v rounded to T, v[0] at the lower address.
__device__ __forceinline__ uint32_t pack_word(const float (&v)[1], float) { return __float_as_uint(v[0]); }
__device__ __forceinline__ uint32_t pack_word(const float (&v)[2], __half) {
  return static_cast<uint32_t>(__half_as_ushort(__float2half_rn(v[0]))) |
         static_cast<uint32_t>(__half_as_ushort(__float2half_rn(v[1]))) << 16;
}
__device__ __forceinline__ uint32_t pack_word(const float (&v)[2], __nv_bfloat16) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(v[0]))) |
         static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(v[1]))) << 16;
}

// ---- K items of T held as 32-bit words ----------------------------------------------------------------------

// K consecutive items of type T, held as the 32-bit words that hold them in memory (two 16-bit items a word, the
// lower address first), so that a 16-bit item takes half a register; x[i] is item i as float. Words, not T[K]:
// the compiler gives each element of a T[K] a register of its own.
template <typename T, int K>
struct alignas(16) Items {
  static constexpr int kPerWord = 4 / sizeof(T);
  static constexpr int kWords = K / kPerWord;
  static_assert(K % kPerWord == 0, "K items must be whole words");
  uint32_t w[kWords];

  __device__ __forceinline__ float operator[](int i) const {
    float v[kPerWord];
    unpack_word(w[i / kPerWord], v, T{});
    return v[i % kPerWord];
  }
};

// A T's bits in the low bytes of a word, for loads and stores of one item at a time: T-typed memory accesses, and
// memcpy between registers (a memcpy from memory would read byte by byte).
template <typename T>
__device__ __forceinline__ uint32_t bits_of(T value) {
  uint32_t bits = 0;
  memcpy(&bits, &value, sizeof(T));
  return bits;
}

// x = the K items at p, in loads of V (p aligned to sizeof(V)).
template <typename V, typename T, int K>
__device__ __forceinline__ void load_vectors(const T* p, Items<T, K>& x) {
  constexpr int kWordsPerVector = sizeof(V) / 4;
  static_assert(sizeof(V) % 4 == 0 && Items<T, K>::kWords % kWordsPerVector == 0, "K items must be whole vectors");
  const V* src = reinterpret_cast<const V*>(p);
#pragma unroll
  for (int k = 0; k < Items<T, K>::kWords / kWordsPerVector; ++k) {
    const V v = __ldg(src + k);
    memcpy(x.w + k * kWordsPerVector, &v, sizeof(V));
  }
}

// The first `count` of K items from p, p + step, p + 2 step, ..., one item per load; 0 past them.
template <int K, typename T, typename Offset>
__device__ __forceinline__ Items<T, K> load_items_by_one(const T* p, Offset step, int count) {
  Items<T, K> x;
#pragma unroll
  for (int j = 0; j < Items<T, K>::kWords; ++j) x.w[j] = 0;
#pragma unroll
  for (int i = 0; i < K; ++i) {
    if (i < count) x.w[i / Items<T, K>::kPerWord] |= bits_of(p[i * step]) << (8 * sizeof(T) * (i % Items<T, K>::kPerWord));
  }
  return x;
}

// The first `count` of kW items from p, `step` elements apart (0 past them), as the words of Items: where count
// covers all kW, in aligned loads of kV items where kV > 1 (the items are then adjacent), else one item per load.
// Chunks of a staged tile or window: one over a plane's last column or a tensor's last channel is read item by item,
// and a single 16-bit item (kV = 1, kW = 2) fills the low half of its word.
template <int kV, int kW, typename T, typename Offset>
__device__ __forceinline__ Items<T, kW> load_chunk(const T* p, Offset step, int count) {
  if (count >= kW) {
    if constexpr (kV > 1) {
      constexpr int kBytes = kV * static_cast<int>(sizeof(T));
      using V = std::conditional_t<kBytes == 16, uint4, std::conditional_t<kBytes == 8, uint2, unsigned int>>;
      Items<T, kW> x;
      load_vectors<V>(p, x);
      return x;
    } else {
      return load_items_by_one<kW>(p, step, kW);
    }
  }
  return load_items_by_one<kW>(p, step, count);
}

// Lets `kernel`, which declares `static_bytes` of static shared memory, be launched with `bytes` of dynamic
// shared memory where the two together exceed the default 48 KiB. The caller's plan keeps
// static_bytes + bytes <= max_block_smem(). The attribute is set to all the device allows,
// max_block_smem() - static_bytes, the same value on every call: a launch on another thread never finds it
// lowered by a smaller one.
template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, size_t bytes, size_t static_bytes) {
  if (static_bytes + bytes > 48 * 1024) {
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(max_block_smem() - static_bytes)),
          "cudaFuncSetAttribute");
  }
}

// `blocks` as a 1-D grid size; throws naming `kernel` when it exceeds the grid limit 2^31 - 1.
unsigned grid_size(int64_t blocks, const char* kernel);

// The column sums of a (rows, row_len) float32 matrix m, each in one fixed order (the backwards' deterministic
// reductions): calls f(column, sum) once per column, from warp 0. A block of kWarps warps sums 32 consecutive
// columns, lane = column, so that each row's 32 values are one 128-byte load: warp w adds rows w, w + kWarps,
// w + 2 kWarps, ... with 16 loads in flight, then warp 0 adds the kWarps sums in warp order. (A thread per column
// walking every row keeps about 4 loads in flight: a thousand rows are hundreds of round trips to L2 one after
// the other.) Every thread of the block calls it (it holds barriers); blocks: column_sums_grid(row_len).
template <typename Acc, int kWarps, typename F>
__device__ __forceinline__ void ordered_column_sums(const float* __restrict__ m, int64_t rows, int64_t row_len, F&& f) {
  constexpr int kUnroll = 16;
  __shared__ Acc warp_sums[kWarps][32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int64_t c0 = blockIdx.x * int64_t{32}; c0 < row_len; c0 += gridDim.x * int64_t{32}) {  // block-uniform
    const int64_t c = c0 + lane;
    Acc sum = 0;
    if (c < row_len) {
#pragma unroll kUnroll
      for (int64_t r = warp; r < rows; r += kWarps) sum += m[r * row_len + c];
    }
    warp_sums[warp][lane] = sum;
    __syncthreads();
    if (warp == 0 && c < row_len) {
      Acc total = 0;
      for (int w = 0; w < kWarps; ++w) total += warp_sums[w][lane];
      f(c, total);
    }
    __syncthreads();  // warp_sums is reused by the next 32 columns
  }
}

// The grid of a kernel with a grid-stride loop over `blocks` blocks of work: at most `per_sm` blocks per SM,
// each then looping over several.
inline unsigned grid_stride_blocks(int64_t blocks, int per_sm) {
  const int64_t cap = int64_t{sm_count()} * per_sm;
  return static_cast<unsigned>(blocks < cap ? blocks : cap);
}

// Blocks for ordered_column_sums: one per 32 columns, at most 16 per SM.
inline unsigned column_sums_grid(int64_t row_len) { return grid_stride_blocks(ceil_div(row_len, 32), 16); }

}  // namespace mamba_adaptor::cuda
