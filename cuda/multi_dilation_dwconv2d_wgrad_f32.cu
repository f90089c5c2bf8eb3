// multi_dilation_dwconv2d (Adaptor-S) weight and bias gradient kernels for float32; the kernels are in
// multi_dilation_dwconv2d.cuh.
// Shapes: x, grad_out (b, C, H, W), any strides; grad_weight (n_dilations, C, k, k); grad_bias (C,);
// workspace: (b * tiles, n_dilations * C * k * k + C) float32 partial sums.
#include "multi_dilation_dwconv2d.cuh"

namespace mamba_adaptor::cuda::dwconv {

template void launch_weight_grad<float>(const DwConvBwdParams&, cudaStream_t);

}  // namespace mamba_adaptor::cuda::dwconv
