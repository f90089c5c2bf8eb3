// state_gather argument validation and params building, shared by the CPU and the CUDA registration.
#pragma once

#include <vector>

#include "common/check.h"
#include "state_gather.h"

namespace mamba_adaptor {

struct StateGatherCall {
  StateGatherParams params;
  Tensor out;
  std::vector<Tensor> keep_alive;
};

struct StateGatherBwdCall {
  StateGatherBwdParams params;
  Tensor grad_h, grad_offsets, grad_weights;
  std::vector<Tensor> keep_alive;
};

StateGatherCall state_gather_call(Backend backend, const Tensor& h, const Tensor& offsets, const Tensor& weights,
                                  bool residual);

StateGatherBwdCall state_gather_bwd_call(Backend backend, const Tensor& grad_out, const Tensor& h,
                                         const Tensor& offsets, const Tensor& weights, bool residual,
                                         bool deterministic);

}  // namespace mamba_adaptor
