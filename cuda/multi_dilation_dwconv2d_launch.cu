// multi_dilation_dwconv2d (Adaptor-S) CUDA launchers: dtype dispatch to the per-dtype instantiations of
// multi_dilation_dwconv2d.cuh. Shapes: x (b, C, H, W); weight (n_dilations, C, k, k); bias (C,).
#include <algorithm>

#include "multi_dilation_dwconv2d.cuh"

namespace mamba_adaptor {

namespace cuda::dwconv {

extern template void launch_conv<float>(const DwConvParams&, bool, cudaStream_t);
extern template void launch_conv<__half>(const DwConvParams&, bool, cudaStream_t);
extern template void launch_conv<__nv_bfloat16>(const DwConvParams&, bool, cudaStream_t);
extern template void launch_weight_grad<float>(const DwConvBwdParams&, cudaStream_t);
extern template void launch_weight_grad<__half>(const DwConvBwdParams&, cudaStream_t);
extern template void launch_weight_grad<__nv_bfloat16>(const DwConvBwdParams&, cudaStream_t);

}  // namespace cuda::dwconv

void dwconv_fwd_cuda(const DwConvParams& params, void* stream) {
  cuda::dispatch_dtype(params.dtype, "multi_dilation_dwconv2d", [&](auto tag) {
    if (params.batch * params.channels * params.height * params.width == 0) return;
    cuda::dwconv::launch_conv<decltype(tag)>(params, false, static_cast<cudaStream_t>(stream));
  });
}

void dwconv_bwd_cuda(const DwConvBwdParams& params, void* stream) {
  const DwConvParams& p = params.fwd;
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  cuda::dispatch_dtype(p.dtype, "multi_dilation_dwconv2d_backward", [&](auto tag) {
    using T = decltype(tag);
    if (p.channels == 0) return;  // every gradient is empty
    if (p.batch * p.height * p.width == 0) {  // grad_x is empty; the sums over no pixel are 0
      const size_t weight_bytes = static_cast<size_t>(p.n_dilations * p.channels * p.kernel_size * p.kernel_size) * sizeof(T);
      cuda::check(cudaMemsetAsync(params.grad_weight, 0, weight_bytes, cuda_stream), "cudaMemsetAsync");
      if (params.grad_bias != nullptr) {
        cuda::check(cudaMemsetAsync(params.grad_bias, 0, static_cast<size_t>(p.channels) * sizeof(T), cuda_stream),
                    "cudaMemsetAsync");
      }
      return;
    }
    DwConvParams transposed = p;  // grad_x = the convolution of grad_out with flipped taps, no bias
    transposed.x = params.grad_out;
    std::copy(params.grad_out_strides, params.grad_out_strides + 4, transposed.x_strides);
    transposed.bias = nullptr;
    transposed.out = params.grad_x;
    std::copy(params.grad_x_strides, params.grad_x_strides + 4, transposed.out_strides);
    cuda::dwconv::launch_conv<T>(transposed, true, cuda_stream);
    cuda::dwconv::launch_weight_grad<T>(params, cuda_stream);
  });
}

size_t dwconv_bwd_workspace_bytes(const DwConvBwdParams& params) {
  const DwConvParams& p = params.fwd;
  if (p.batch * p.channels * p.height * p.width == 0) return 0;
  const int elem_size = p.dtype == DType::Float32 ? 4 : 2;
  return cuda::dwconv::weight_grad_workspace_bytes(p, elem_size);
}

}  // namespace mamba_adaptor
