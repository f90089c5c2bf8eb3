// multi_dilation_dwconv2d: CUDA registration. The schema is in cpp/multi_dilation_dwconv2d.cpp, the kernels
// in multi_dilation_dwconv2d.cuh.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include "context.h"
#include "multi_dilation_dwconv2d_args.h"

namespace mamba_adaptor {
namespace {

Tensor multi_dilation_dwconv2d_cuda(Tensor x, Tensor weight, std::optional<Tensor> bias,
                                    torch::headeronly::HeaderOnlyArrayRef<int64_t> dilations) {
  DwConvCall call = multi_dilation_dwconv2d_call(Backend::CUDA, x, weight, bias, {dilations.begin(), dilations.end()});
  CudaScope scope(x);
  dwconv_fwd_cuda(call.params, scope.stream());
  return call.out;
}

std::tuple<Tensor, Tensor, std::optional<Tensor>> multi_dilation_dwconv2d_backward_cuda(
    Tensor grad_out, Tensor x, Tensor weight, std::optional<Tensor> bias,
    torch::headeronly::HeaderOnlyArrayRef<int64_t> dilations) {
  DwConvBwdCall call =
      multi_dilation_dwconv2d_bwd_call(Backend::CUDA, grad_out, x, weight, bias, {dilations.begin(), dilations.end()});
  CudaScope scope(x);
  const int64_t workspace_bytes = static_cast<int64_t>(dwconv_bwd_workspace_bytes(call.params));
  Tensor workspace = torch::stable::new_empty(x, {workspace_bytes}, torch::headeronly::ScalarType::Byte);
  call.params.workspace = workspace.data_ptr();
  dwconv_bwd_cuda(call.params, scope.stream());
  return {call.grad_x, call.grad_weight, call.grad_bias};
}

}  // namespace
}  // namespace mamba_adaptor

STABLE_TORCH_LIBRARY_IMPL(mamba_adaptor, CUDA, m) {
  m.impl("multi_dilation_dwconv2d", TORCH_BOX(&mamba_adaptor::multi_dilation_dwconv2d_cuda));
  m.impl("multi_dilation_dwconv2d_backward", TORCH_BOX(&mamba_adaptor::multi_dilation_dwconv2d_backward_cuda));
}
