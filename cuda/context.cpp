#include "context.h"

#include <dlfcn.h>

#include "common/check.h"

namespace mamba_adaptor {

namespace {

using GetStreamFn = int32_t (*)(int32_t device_index, void** ret_stream);  // AOTITorchError = int32_t

GetStreamFn resolve_get_stream() {
  void* lib = dlopen("libtorch_cuda.so", RTLD_NOW | RTLD_NOLOAD);
  void* fn = lib ? dlsym(lib, "aoti_torch_get_current_cuda_stream") : nullptr;
  if (!fn) {
    fail("mamba_adaptor_ops: cannot find aoti_torch_get_current_cuda_stream in libtorch_cuda.so: CUDA tensors "
         "need a CUDA build of torch (", lib ? "symbol lookup failed" : "library not loaded", ")");
  }
  return reinterpret_cast<GetStreamFn>(fn);
}

}  // namespace

void* current_cuda_stream(int32_t device_index) {
  static const GetStreamFn get_stream = resolve_get_stream();
  void* stream = nullptr;
  if (get_stream(device_index, &stream) != 0) {
    fail("mamba_adaptor_ops: torch could not give the current CUDA stream of device ", device_index);
  }
  return stream;
}

}  // namespace mamba_adaptor
