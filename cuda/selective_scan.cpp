// selective_scan: CUDA registration of the op defined in cpp/selective_scan.cpp. Inputs are checked and the
// params built by selective_scan_args; the kernels are in selective_scan_kernels.cuh.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include <optional>
#include <tuple>

#include "context.h"
#include "selective_scan_args.h"

namespace mamba_adaptor {
namespace {

void check_cuda_limits(const char* op, const SelectiveScanParams& p) {
  if (p.dstate > kSelectiveScanCudaMaxDState) {
    fail(op, ": expected `A` to have d_state N = A.shape[1] <= ", kSelectiveScanCudaMaxDState,
         " on CUDA, but got N = ", p.dstate);
  }
}

// The forward of selective_scan (and with_checkpoints, of selective_scan_forward) on CUDA; `op` names it in errors.
SelectiveScanCall run_forward(const char* op, const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
                              const std::optional<Tensor>& C, const std::optional<Tensor>& D,
                              const std::optional<Tensor>& delta_bias, bool delta_softplus, bool with_checkpoints) {
  SelectiveScanCall call =
      selective_scan_call(Backend::CUDA, u, delta, A, B, C, D, delta_bias, delta_softplus, with_checkpoints);
  check_cuda_limits(op, call.params);
  CudaScope scope(u);
  selective_scan_fwd_cuda(call.params, scope.stream());
  return call;
}

// The forwards are deterministic whatever `deterministic` says.
Tensor selective_scan_cuda(Tensor u, Tensor delta, Tensor A, Tensor B, std::optional<Tensor> C,
                           std::optional<Tensor> D, std::optional<Tensor> delta_bias, bool delta_softplus,
                           bool deterministic) {
  return run_forward("selective_scan", u, delta, A, B, C, D, delta_bias, delta_softplus, false).out;
}

std::tuple<Tensor, Tensor> selective_scan_forward_cuda(Tensor u, Tensor delta, Tensor A, Tensor B,
                                                       std::optional<Tensor> C, std::optional<Tensor> D,
                                                       std::optional<Tensor> delta_bias, bool delta_softplus,
                                                       bool deterministic) {
  SelectiveScanCall call =
      run_forward("selective_scan_forward", u, delta, A, B, C, D, delta_bias, delta_softplus, true);
  return {call.out, *call.checkpoints};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, std::optional<Tensor>, std::optional<Tensor>, std::optional<Tensor>>
selective_scan_backward_cuda(Tensor grad_out, Tensor u, Tensor delta, Tensor A, Tensor B, std::optional<Tensor> C,
                             std::optional<Tensor> D, std::optional<Tensor> delta_bias, bool delta_softplus,
                             bool deterministic, std::optional<Tensor> checkpoints) {
  SelectiveScanBwdCall call = selective_scan_bwd_call(Backend::CUDA, grad_out, u, delta, A, B, C, D, delta_bias,
                                                      delta_softplus, deterministic, checkpoints);
  check_cuda_limits("selective_scan_backward", call.params.fwd);
  CudaScope scope(u);
  std::optional<Tensor> workspace;
  const size_t bytes = selective_scan_bwd_cuda_workspace_bytes(call.params);
  if (bytes > 0) {
    const int64_t floats = static_cast<int64_t>((bytes + sizeof(float) - 1) / sizeof(float));
    workspace = torch::stable::new_empty(u, {floats}, ScalarType::Float);
    call.params.workspace = workspace->data_ptr();
  }
  selective_scan_bwd_cuda(call.params, scope.stream());
  return {call.du, call.ddelta, call.dA, call.dB, call.dC, call.dD, call.ddelta_bias};
}

}  // namespace
}  // namespace mamba_adaptor

STABLE_TORCH_LIBRARY_IMPL(mamba_adaptor, CUDA, m) {
  m.impl("selective_scan", TORCH_BOX(&mamba_adaptor::selective_scan_cuda));
  m.impl("selective_scan_forward", TORCH_BOX(&mamba_adaptor::selective_scan_forward_cuda));
  m.impl("selective_scan_backward", TORCH_BOX(&mamba_adaptor::selective_scan_backward_cuda));
}
