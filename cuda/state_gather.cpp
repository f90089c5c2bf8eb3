// state_gather: CUDA registration. The schema is in cpp/state_gather.cpp, the kernels in state_gather.cuh.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include "context.h"
#include "state_gather_args.h"

namespace mamba_adaptor {
namespace {

// Limits of the CUDA kernels beyond the op's contract: positions are float32 and sample indices int32.
void check_cuda_limits(const char* op, const StateGatherParams& p) {
  const ArgChecker check(op);
  check.check(p.seqlen <= (int64_t{1} << 24), "expected `h` to have L <= 16777216 on CUDA (positions are float32), ",
              "but got L = ", p.seqlen);
  check.check(p.n_points * p.seqlen <= (int64_t{1} << 31) - 1024, "expected K * L < 2^31 - 1024 on CUDA, but got K = ",
              p.n_points, ", L = ", p.seqlen);
}

Tensor state_gather_cuda(Tensor h, Tensor offsets, Tensor weights, bool residual, bool deterministic) {
  StateGatherCall call = state_gather_call(Backend::CUDA, h, offsets, weights, residual);
  check_cuda_limits("state_gather", call.params);
  CudaScope scope(h);
  state_gather_fwd_cuda(call.params, scope.stream());
  return call.out;
}

// The CUDA backward uses no float atomics, so it is deterministic whatever `deterministic` says.
std::tuple<Tensor, Tensor, Tensor> state_gather_backward_cuda(Tensor grad_out, Tensor h, Tensor offsets,
                                                              Tensor weights, bool residual, bool deterministic) {
  StateGatherBwdCall call =
      state_gather_bwd_call(Backend::CUDA, grad_out, h, offsets, weights, residual, deterministic);
  check_cuda_limits("state_gather_backward", call.params.fwd);
  CudaScope scope(h);
  const int64_t workspace_bytes = static_cast<int64_t>(state_gather_bwd_workspace_bytes(call.params));
  Tensor workspace = torch::stable::new_empty(h, {workspace_bytes}, torch::headeronly::ScalarType::Byte);
  call.params.workspace = workspace.data_ptr();
  state_gather_bwd_cuda(call.params, scope.stream());
  return {call.grad_h, call.grad_offsets, call.grad_weights};
}

}  // namespace
}  // namespace mamba_adaptor

STABLE_TORCH_LIBRARY_IMPL(mamba_adaptor, CUDA, m) {
  m.impl("state_gather", TORCH_BOX(&mamba_adaptor::state_gather_cuda));
  m.impl("state_gather_backward", TORCH_BOX(&mamba_adaptor::state_gather_backward_cuda));
}
