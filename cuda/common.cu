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

int sm_count() {
  // Per thread: ops may run concurrently on several threads (DataParallel), and a shared vector would be
  // resized under another thread's read.
  static thread_local std::vector<int> counts;
  int device = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  if (device >= static_cast<int>(counts.size())) counts.resize(device + 1, 0);
  if (counts[device] == 0) {
    check(cudaDeviceGetAttribute(&counts[device], cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  }
  return counts[device];
}

unsigned grid_size(int64_t blocks, const char* kernel) {
  if (blocks > 0x7fffffff) {
    throw std::runtime_error(std::string("mamba_adaptor_ops: ") + kernel + " needs " + std::to_string(blocks) +
                             " thread blocks, more than a CUDA grid holds (2^31 - 1); split the batch");
  }
  return static_cast<unsigned>(blocks);
}

}  // namespace mamba_adaptor::cuda
