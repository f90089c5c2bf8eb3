// multi_dilation_dwconv2d (Adaptor-S) forward and grad_x (flipped taps) kernels for float16; the kernels are in
// multi_dilation_dwconv2d.cuh.
// Shapes: x, out (or grad_out, grad_x) (b, C, H, W), any strides; weight (n_dilations, C, k, k); bias (C,).
#include "multi_dilation_dwconv2d.cuh"

namespace mamba_adaptor::cuda::dwconv {

template void launch_conv<__half>(const DwConvParams&, bool, cudaStream_t);

}  // namespace mamba_adaptor::cuda::dwconv
