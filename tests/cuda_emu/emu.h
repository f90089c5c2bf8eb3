// The CUDA device environment on the CPU, for running the library's CUDA kernels without a GPU (tests only).
//
// Force-included (g++ -include emu.h) ahead of every translation unit that build.py compiles from cuda/, after
// it has rewritten the three things C++ cannot spell: kernel launches `k<<<grid, block, smem, stream>>>(args)`
// become `::emu::Launch(grid, block, smem, stream).run(k, args)`, `extern __shared__ T name[];` becomes
// `T* name = ::emu::dynamic_shared<T>();` and `__shared__ T name[N];` becomes
// `auto& name = ::emu::static_shared<T[N]>(site);`.
//
// Execution model (emu.cpp): the blocks of a grid run one after another; the threads of a block are fibers
// on one OS thread, each running until it reaches a barrier (__syncthreads), a warp-synchronous intrinsic
// (__syncwarp, __shfl*_sync, __match_any_sync) or its end. A warp intrinsic completes when every lane of its
// mask has reached it, a block barrier when every live thread has. What a GPU would do wrong, the emulator
// reports as an exception: a barrier some threads never reach (deadlock), threads of a block waiting at
// different __syncthreads (undefined on a GPU: bar.sync is .aligned), a warp intrinsic whose mask names
// an exited lane or a lane at another intrinsic, shared memory beyond the launch's budget, an invalid launch
// configuration. Shared memory is freshly allocated per block at its exact size and filled with 0xff bytes
// (NaN floats, -1 ints), so reads of unwritten shared memory show in the results and, under AddressSanitizer,
// accesses past its end are reported. The order in which ready threads run is a setting (set_schedule):
// results that depend on it expose a missing barrier. Built with ThreadSanitizer (emu.cpp's race), an access
// that another thread of the launch writes with no barrier between them is reported whatever the order. Built
// with its instrumentation alone (emu.cpp's traffic), each launch's global memory traffic is counted.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <math.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

// Qualifiers: plain C++ on the host.
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __grid_constant__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))  // as nvcc: inlined whatever the optimiser thinks
#define __launch_bounds__(...)
#define __grid_constant__

namespace emu {

// ---- the running thread ----------------------------------------------------------------------------------
uint3 thread_index();
dim3 block_index();
dim3 block_dim();
dim3 grid_dim();

// ---- synchronisation (emu.cpp) -----------------------------------------------------------------------------
enum class WarpOp { Sync, Shfl, ShflUp, ShflDown, ShflXor, MatchAny };
// `file` and `line` name the __syncthreads: the whole block must wait at the same one.
void sync_block(const char* file, int line);
// Waits for the lanes of `mask` at the same op; returns the payload this lane receives.
uint64_t warp_op(WarpOp op, unsigned mask, uint64_t payload, int arg, int width);

template <typename T>
inline uint64_t to_payload(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp payloads are up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}
template <typename T>
inline T from_payload(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

// ---- shared memory (emu.cpp) ---------------------------------------------------------------------------
void* dynamic_shared_bytes();
void* static_shared_bytes(int site, size_t bytes);
template <typename T>
T* dynamic_shared() {
  return static_cast<T*>(dynamic_shared_bytes());
}
template <typename Array>
Array& static_shared(int site) {
  return *static_cast<Array*>(static_shared_bytes(site, sizeof(Array)));
}

// ---- launches ------------------------------------------------------------------------------------------
// Runs `body` for every thread of every block; `kernel` identifies the kernel for its shared-memory attribute.
void launch(const void* kernel, dim3 grid, dim3 block, size_t dynamic_smem, const std::function<void()>& body);

struct Launch {
  dim3 grid, block;
  size_t smem;
  Launch(dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = nullptr) : grid(grid), block(block), smem(smem) {}

  // Arguments are converted to the kernel's parameter types at the launch, as CUDA copies them.
  template <typename... Params, typename... Args>
  void run(void (*kernel)(Params...), Args&&... args) const {
    std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
    launch(reinterpret_cast<const void*>(kernel), grid, block, smem, [&] { std::apply(kernel, params); });
  }
};

}  // namespace emu

// cuda_runtime.h's overload for kernel pointers is for nvcc only.
template <typename Kernel>
inline cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}

#define threadIdx (::emu::thread_index())
#define blockIdx (::emu::block_index())
#define blockDim (::emu::block_dim())
#define gridDim (::emu::grid_dim())

// ---- device intrinsics -------------------------------------------------------------------------------------
#define __syncthreads() ::emu::sync_block(__FILE__, __LINE__)
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::emu::warp_op(::emu::WarpOp::Sync, mask, 0, 0, 32); }

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return ::emu::from_payload<T>(::emu::warp_op(::emu::WarpOp::Shfl, mask, ::emu::to_payload(v), src, width));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::emu::from_payload<T>(
      ::emu::warp_op(::emu::WarpOp::ShflUp, mask, ::emu::to_payload(v), static_cast<int>(delta), width));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::emu::from_payload<T>(
      ::emu::warp_op(::emu::WarpOp::ShflDown, mask, ::emu::to_payload(v), static_cast<int>(delta), width));
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ::emu::from_payload<T>(::emu::warp_op(::emu::WarpOp::ShflXor, mask, ::emu::to_payload(v), lane_mask, width));
}
template <typename T>
inline unsigned __match_any_sync(unsigned mask, T v) {
  return static_cast<unsigned>(::emu::warp_op(::emu::WarpOp::MatchAny, mask, ::emu::to_payload(v), 0, 32));
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
// Byte n of the result is byte (s >> 4n) & 7 of the 8 bytes y:x (x's the low four).
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t bytes = static_cast<uint64_t>(y) << 32 | x;
  unsigned result = 0;
  for (int n = 0; n < 4; ++n) result |= static_cast<unsigned>((bytes >> (8 * ((s >> (4 * n)) & 7))) & 0xff) << (8 * n);
  return result;
}
inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((static_cast<uint64_t>(a) * b) >> 32); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }
inline float __uint_as_float(unsigned x) { return ::emu::from_payload<float>(x); }
inline unsigned __float_as_uint(float x) { return static_cast<unsigned>(::emu::to_payload(x)); }

// ---- the approximate transcendentals (--use_fast_math) ----------------------------------------------------
// A GPU computes exp2f (ex2.approx.ftz.f32), __expf (ex2.approx of x * log2(e) rounded to float) and __logf
// within documented bounds, not correctly rounded (CUDA Programming Guide, "Intrinsic Functions"): exp2f to
// 2 ulp; __expf to 2 + floor(|1.173 x|) ulp, which the rounding of x * log2(e) accounts for; __logf to 2^-21.41
// absolute on [0.5, 2], else 3 ulp. The emulator moves the correctly rounded result within those bounds
// (mamba_emu_set_intrinsic_error): by a pseudo-random amount fixed per input value (the default, as the
// hardware's error is a fixed function of the input), or always up, or always down (a bias that adds up along a
// sequence); or it computes them correctly rounded (Exact), as the CPU reference does.
namespace emu {
enum class IntrinsicError { Exact, Spread, Up, Down };
IntrinsicError intrinsic_error();  // emu.cpp

// `exact` moved by up to `bound` ulp (or, with `absolute` > 0, by up to `absolute`) in the direction and by the
// amount intrinsic_error() picks for `input`.
inline float approximate(float exact, float input, int bound, float absolute = 0.f) {
  const IntrinsicError mode = intrinsic_error();
  if (mode == IntrinsicError::Exact || !isfinite(exact) || exact == 0.f) return exact;
  int steps = mode == IntrinsicError::Up ? bound : -bound;
  if (mode == IntrinsicError::Spread) {
    uint32_t h = static_cast<uint32_t>(to_payload(input)) * 0x9e3779b1u;  // Fibonacci hashing of the bits
    h ^= h >> 15;
    steps = static_cast<int>(h % static_cast<uint32_t>(2 * bound + 1)) - bound;
  }
  if (absolute > 0.f) return exact + absolute * static_cast<float>(steps) / static_cast<float>(bound);
  float r = exact;
  for (int i = 0; i < (steps < 0 ? -steps : steps); ++i) r = nextafterf(r, steps > 0 ? INFINITY : -INFINITY);
  return r;
}
inline float ex2_approx(float y) { return approximate(::exp2f(y), y, 2); }
}  // namespace emu

#define exp2f(y) ::emu::ex2_approx(y)
inline float __expf(float x) {
  if (::emu::intrinsic_error() == ::emu::IntrinsicError::Exact) return expf(x);
  return ::emu::ex2_approx(x * 1.44269504088896341f);
}
inline float __logf(float x) {
  const bool near_one = x >= 0.5f && x <= 2.f;
  return ::emu::approximate(logf(x), x, 3, near_one ? 3.6e-7f : 0.f);  // 2^-21.41 = 3.6e-7
}
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

// Emulated threads never run at the same time, but the atomics are atomic for the racecheck build's sake
// (ThreadSanitizer counts two atomic accesses to one address as no race).
inline float atomicAdd(float* p, float v) {
  float old, sum;
  __atomic_load(p, &old, __ATOMIC_RELAXED);
  do {
    sum = old + v;
  } while (!__atomic_compare_exchange(p, &old, &sum, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
  return old;
}
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max(int64_t a, int64_t b) { return a > b ? a : b; }
