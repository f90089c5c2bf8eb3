#include "multi_dilation_dwconv2d_args.h"

#include <algorithm>

namespace mamba_adaptor {

namespace {

void set_strides(int64_t* strides, const Tensor& t) {
  for (int64_t i = 0; i < 4; ++i) strides[i] = stride_or_zero(t, i);
}

// Checks the inputs and fills every field of `p` but the output's.
void check_inputs(DwConvParams& p, std::vector<Tensor>& keep_alive, const ArgChecker& check, Backend backend,
                  const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                  const std::vector<int64_t>& dilations) {
  check.rank(x, "x", 4, "(b, C, H, W)");
  check.floating(x, "x");
  check.on(backend, x, "x");
  const int64_t channels = x.size(1);
  check.check(!dilations.empty(), "expected `dilations` to hold at least one dilation, but got an empty list");
  check.check(static_cast<int64_t>(dilations.size()) <= kMaxDilations, "expected at most ", kMaxDilations,
              " dilations, but got ", dilations.size());
  for (size_t i = 0; i < dilations.size(); ++i) {
    check.check(dilations[i] >= 1, "expected every dilation >= 1, but got dilations[", i, "] = ", dilations[i]);
  }
  const int64_t n_dilations = static_cast<int64_t>(dilations.size());
  check.rank(weight, "weight", 4, "(len(dilations), C, k, k)");
  const int64_t k = weight.size(3);
  check.check(k == 3 || k == 5 || k == 7, "expected `weight` to have kernel size k in {3, 5, 7}, but got shape ",
              shape_str(weight));
  check.shape(weight, "weight", {n_dilations, channels, k, k}, "(len(dilations), C, k, k)");
  check.dtype(weight, "weight", x.scalar_type(), "the dtype of x");
  check.same_device(weight, "weight", x, "x");
  if (bias) {
    check.shape(*bias, "bias", {channels}, "(C,)");
    check.dtype(*bias, "bias", x.scalar_type(), "the dtype of x");
    check.same_device(*bias, "bias", x, "x");
  }

  Tensor wc = torch::stable::contiguous(weight);
  p.dtype = to_dtype(x.scalar_type());
  p.batch = x.size(0);
  p.channels = channels;
  p.height = x.size(2);
  p.width = x.size(3);
  p.kernel_size = k;
  p.n_dilations = n_dilations;
  std::copy(dilations.begin(), dilations.end(), p.dilations);
  p.x = x.data_ptr();
  set_strides(p.x_strides, x);
  p.weight = wc.data_ptr();
  keep_alive = {x, wc};
  if (bias) {
    Tensor bc = torch::stable::contiguous(*bias);
    p.bias = bc.data_ptr();
    keep_alive.push_back(bc);
  }
}

}  // namespace

DwConvCall multi_dilation_dwconv2d_call(Backend backend, const Tensor& x, const Tensor& weight,
                                        const std::optional<Tensor>& bias, const std::vector<int64_t>& dilations) {
  DwConvCall call{};
  check_inputs(call.params, call.keep_alive, ArgChecker("multi_dilation_dwconv2d"), backend, x, weight, bias,
               dilations);
  call.out = torch::stable::empty_like(x);  // keeps x's memory format (NCHW or channels_last)
  call.params.out = call.out.data_ptr();
  set_strides(call.params.out_strides, call.out);
  return call;
}

DwConvBwdCall multi_dilation_dwconv2d_bwd_call(Backend backend, const Tensor& grad_out, const Tensor& x,
                                               const Tensor& weight, const std::optional<Tensor>& bias,
                                               const std::vector<int64_t>& dilations) {
  const ArgChecker check("multi_dilation_dwconv2d_backward");
  DwConvBwdCall call{};
  check_inputs(call.params.fwd, call.keep_alive, check, backend, x, weight, bias, dilations);
  check.shape(grad_out, "grad_out", sizes_of(x), "(b, C, H, W), like x");
  check.dtype(grad_out, "grad_out", x.scalar_type(), "the dtype of x");
  check.same_device(grad_out, "grad_out", x, "x");
  call.params.grad_out = grad_out.data_ptr();
  set_strides(call.params.grad_out_strides, grad_out);
  call.keep_alive.push_back(grad_out);

  call.grad_x = torch::stable::empty_like(x);
  call.grad_weight = torch::stable::new_empty(x, sizes_of(weight));
  call.params.grad_x = call.grad_x.data_ptr();
  set_strides(call.params.grad_x_strides, call.grad_x);
  call.params.grad_weight = call.grad_weight.data_ptr();
  if (bias) {
    call.grad_bias = torch::stable::new_empty(x, {x.size(1)});
    call.params.grad_bias = call.grad_bias->data_ptr();
  }
  return call;
}

}  // namespace mamba_adaptor
