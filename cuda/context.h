// What a CUDA op registration needs from torch besides tensors: the device guard and torch's current stream.
#pragma once

#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/tensor.h>

namespace mamba_adaptor {

// torch's current CUDA stream on `device_index`, as a cudaStream_t.
//
// The stable ABI exposes the native stream handle from torch 2.13 on (Stream::nativeHandle); to load in
// torch 2.10 - 2.12 as well we call the AOTInductor C shim function aoti_torch_get_current_cuda_stream, which
// every CUDA build of torch exports from libtorch_cuda.so, resolved once at run time (the module itself links
// only libtorch_cpu.so, so it loads with a CPU-only torch too).
void* current_cuda_stream(int32_t device_index);

// Sets the current CUDA device to the one of `t` for the scope, and gives torch's stream on it.
class CudaScope {
 public:
  explicit CudaScope(const torch::stable::Tensor& t)
      : device_(t.get_device_index()), guard_(device_), stream_(current_cuda_stream(device_)) {}
  void* stream() const { return stream_; }

 private:
  int32_t device_;
  torch::stable::accelerator::DeviceGuard guard_;
  void* stream_;
};

}  // namespace mamba_adaptor
