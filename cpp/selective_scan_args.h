// selective_scan argument validation and params building: the one place where its inputs are checked,
// shared by the CPU and the CUDA registration.
#pragma once

#include <optional>
#include <vector>

#include "common/check.h"
#include "selective_scan.h"

namespace mamba_adaptor {

struct SelectiveScanCall {
  SelectiveScanParams params;
  Tensor out;
  std::optional<Tensor> checkpoints;  // with_checkpoints: (b, dim, selective_scan_num_checkpoints, N), A's dtype
  std::vector<Tensor> keep_alive;  // contiguous copies the params point into
};

struct SelectiveScanBwdCall {
  SelectiveScanBwdParams params;
  Tensor du, ddelta, dA, dB;
  std::optional<Tensor> dC, dD, ddelta_bias;
  std::vector<Tensor> keep_alive;
};

SelectiveScanCall selective_scan_call(Backend backend, const Tensor& u, const Tensor& delta, const Tensor& A,
                                      const Tensor& B, const std::optional<Tensor>& C,
                                      const std::optional<Tensor>& D, const std::optional<Tensor>& delta_bias,
                                      bool delta_softplus, bool with_checkpoints);

SelectiveScanBwdCall selective_scan_bwd_call(Backend backend, const Tensor& grad_out, const Tensor& u,
                                             const Tensor& delta, const Tensor& A, const Tensor& B,
                                             const std::optional<Tensor>& C, const std::optional<Tensor>& D,
                                             const std::optional<Tensor>& delta_bias, bool delta_softplus,
                                             bool deterministic, const std::optional<Tensor>& checkpoints);

}  // namespace mamba_adaptor
