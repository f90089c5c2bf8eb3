// selective_scan backward kernels for __nv_bfloat16 inputs, every flag combination
// (d_state 1 or any, states mode, D, softplus). Shapes and design: selective_scan_kernels.cuh.
#include "selective_scan_kernels.cuh"

namespace mamba_adaptor::cuda::scan {

template void selective_scan_bwd_launch<__nv_bfloat16>(const SelectiveScanBwdParams&, cudaStream_t);

}  // namespace mamba_adaptor::cuda::scan
