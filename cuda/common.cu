#include <stdexcept>
#include <string>
#include <vector>

#include "common.cuh"

namespace mamba_adaptor::cuda {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("mamba_adaptor_ops: CUDA error in ") + what + ": " + cudaGetErrorString(err));
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
