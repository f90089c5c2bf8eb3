// The element types the kernels support. Torch-free: kernel files (.cu included) see only this.
#pragma once

#include <cstdint>

namespace mamba_adaptor {

enum class DType : int8_t { Float32, Float64, Float16, BFloat16 };

}  // namespace mamba_adaptor
