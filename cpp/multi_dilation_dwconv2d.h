// multi_dilation_dwconv2d (Adaptor-S): the sum of depthwise convolutions with several dilations, one pass:
//   out[b, c, y, x] = bias[c] + sum_i sum_{ky, kx} weight[i, c, ky, kx] * x[b, c, y + (ky - r) d_i, x + (kx - r) d_i]
// with r = (k - 1) / 2, d_i = dilations[i] and zero padding ("same" output size for every dilation).
// Shapes: x, out (b, C, H, W), NCHW or channels_last (any strides); weight (n_dilations, C, k, k); bias (C,).
// Torch-free: CPU and CUDA kernel files see only these structs.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/dtype.h"

namespace mamba_adaptor {

// The most dilations one call takes (the paper uses 1 to 4); a longer list is refused with a clear error.
constexpr int64_t kMaxDilations = 16;

struct DwConvParams {
  DType dtype;  // of x, weight, bias and the output
  int64_t batch, channels, height, width, kernel_size, n_dilations;
  int64_t dilations[kMaxDilations];  // the first n_dilations entries, each >= 1

  const void* x;
  int64_t x_strides[4];  // (b, C, H, W), in elements
  const void* weight;    // contiguous (n_dilations, C, k, k)
  const void* bias;      // contiguous (C,) or nullptr

  void* out;
  int64_t out_strides[4];
};

struct DwConvBwdParams {
  DwConvParams fwd;  // the forward's inputs (fwd.out unused)
  const void* grad_out;
  int64_t grad_out_strides[4];

  // Gradients in the inputs' dtype.
  void* grad_x;  // strides grad_x_strides
  int64_t grad_x_strides[4];
  void* grad_weight;  // contiguous (n_dilations, C, k, k)
  void* grad_bias;    // contiguous (C,), nullptr without bias

  // CUDA only: dwconv_bwd_workspace_bytes(*this) bytes of device memory for the launcher's use,
  // computed with the launch's device current (the tiling follows its shared memory per block).
  void* workspace;
};

// CUDA launchers (cuda/), stream is a cudaStream_t.
void dwconv_fwd_cuda(const DwConvParams& params, void* stream);
void dwconv_bwd_cuda(const DwConvBwdParams& params, void* stream);
size_t dwconv_bwd_workspace_bytes(const DwConvBwdParams& params);

}  // namespace mamba_adaptor
