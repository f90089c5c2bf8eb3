// multi_dilation_dwconv2d argument validation and params building, shared by the CPU and CUDA registration.
#pragma once

#include <optional>
#include <vector>

#include "common/check.h"
#include "multi_dilation_dwconv2d.h"

namespace mamba_adaptor {

struct DwConvCall {
  DwConvParams params;
  Tensor out;
  std::vector<Tensor> keep_alive;
};

struct DwConvBwdCall {
  DwConvBwdParams params;
  Tensor grad_x, grad_weight;
  std::optional<Tensor> grad_bias;
  std::vector<Tensor> keep_alive;
};

DwConvCall multi_dilation_dwconv2d_call(Backend backend, const Tensor& x, const Tensor& weight,
                                        const std::optional<Tensor>& bias, const std::vector<int64_t>& dilations);

DwConvBwdCall multi_dilation_dwconv2d_bwd_call(Backend backend, const Tensor& grad_out, const Tensor& x,
                                               const Tensor& weight, const std::optional<Tensor>& bias,
                                               const std::vector<int64_t>& dilations);

}  // namespace mamba_adaptor
