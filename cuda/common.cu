#include <stdexcept>
#include <string>
#include <vector>

#include "common.cuh"

namespace mamba_adaptor::cuda {

namespace {

// "13.0" for a CUDA version as CUDART_VERSION and cudaDriverGetVersion give it (13000).
std::string cuda_version(int version) {
  return std::to_string(version / 1000) + "." + std::to_string(version % 1000 / 10);
}

// What to do about the two errors that come from the user's setup, not from a call: a driver older than the
// CUDA these kernels were built with, and a GPU they were not built for (MAMBA_ADAPTOR_CUDA_ARCHS_BUILT, from
// CMake; a launch reports it as "no kernel image", cudaFuncSetAttribute as "invalid device function"). Empty
// for any other error.
std::string setup_advice(cudaError_t err) {
  if (err == cudaErrorInsufficientDriver) {
    int driver = 0;
    cudaDriverGetVersion(&driver);
    return ". mamba_adaptor_ops was built with CUDA " + cuda_version(CUDART_VERSION) +
           ", the installed NVIDIA driver supports CUDA " + cuda_version(driver) +
           " at most: update the driver, or build mamba_adaptor_ops from source with a CUDA toolkit the driver "
           "supports";
  }
  if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction) {
    int device = 0, major = 0, minor = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    const std::string arch = std::to_string(major) + std::to_string(minor);
    return ". This GPU is sm_" + arch + "; the kernels were built for " + MAMBA_ADAPTOR_CUDA_ARCHS_BUILT +
           ". To build them for it, in a source checkout: MAMBA_ADAPTOR_CUDA_ARCHS=" + arch +
           "-real pip install --no-build-isolation .";
  }
  return "";
}

}  // namespace

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    std::string message = std::string("mamba_adaptor_ops: CUDA error in ") + what + ": " + cudaGetErrorString(err);
    throw std::runtime_error(message + setup_advice(err));
  }
}

void unsupported_float64(const char* op) {
  throw std::runtime_error(std::string(op) +
                           ": float64 runs on the CPU only; use float32, float16 or bfloat16 on CUDA");
}

namespace {

// The attribute `attr` of the current device, read once per device into `cache` (indexed by device). The
// caches are per thread: ops may run concurrently on several threads (DataParallel), and a shared vector
// would be resized under another thread's read.
int device_attribute(std::vector<int>& cache, cudaDeviceAttr attr) {
  int device = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  if (device >= static_cast<int>(cache.size())) cache.resize(device + 1, 0);
  if (cache[device] == 0) check(cudaDeviceGetAttribute(&cache[device], attr, device), "cudaDeviceGetAttribute");
  return cache[device];
}

}  // namespace

int sm_count() {
  static thread_local std::vector<int> counts;
  return device_attribute(counts, cudaDevAttrMultiProcessorCount);
}

size_t max_block_smem() {
  static thread_local std::vector<int> limits;
  return static_cast<size_t>(device_attribute(limits, cudaDevAttrMaxSharedMemoryPerBlockOptin));
}

unsigned grid_size(int64_t blocks, const char* kernel) {
  if (blocks > 0x7fffffff) {
    throw std::runtime_error(std::string("mamba_adaptor_ops: ") + kernel + " needs " + std::to_string(blocks) +
                             " thread blocks, more than a CUDA grid holds (2^31 - 1); split the batch");
  }
  return static_cast<unsigned>(blocks);
}

}  // namespace mamba_adaptor::cuda
