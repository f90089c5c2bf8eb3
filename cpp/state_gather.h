// state_gather (Adaptor-T): each hidden state is strengthened by K others at predicted positions,
//   out[b, s, d, t] = [h[b, s, d, t] if residual] + sum_k weights[b, s, k, t] * interp(h[b, s, d, :], t + offsets[b, s, k, t])
//   interp(x, p) = sum over i in {floor(p), floor(p) + 1} of (1 - |p - i|) * (x[i] if 0 <= i <= L-1 else 0)
// Shapes: h, out (b, S, D, L); offsets, weights (b, S, K, L). Non-finite positions give non-finite outputs and
// are never used as indices. Torch-free: CPU and CUDA kernel files see only these structs.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/dtype.h"

namespace mamba_adaptor {

struct StateGatherParams {
  DType dtype;  // of h, offsets, weights and the output
  int64_t batch, n_seq, dim, seqlen, n_points;  // b, S, D, L, K
  bool residual;

  const void* h;  // contiguous (b, S, D, L)
  // offsets and weights take any strides (b, S, K, L), e.g. weights expanded over b and L with stride 0.
  const void* offsets;
  int64_t offsets_strides[4];
  const void* weights;
  int64_t weights_strides[4];

  void* out;  // contiguous (b, S, D, L)
};

struct StateGatherBwdParams {
  StateGatherParams fwd;  // the forward's inputs (fwd.out unused)
  const void* grad_out;   // contiguous (b, S, D, L)
  bool deterministic;     // no float atomics: bit-identical results across runs

  // Gradients, contiguous, in the inputs' dtype.
  void* grad_h;        // (b, S, D, L)
  void* grad_offsets;  // (b, S, K, L)
  void* grad_weights;  // (b, S, K, L)

  // CUDA only: state_gather_bwd_workspace_bytes(*this) bytes of device memory for the launcher's use,
  // computed with the launch's device current (the layout follows its shared memory per block).
  void* workspace;
};

// CUDA launchers (cuda/), stream is a cudaStream_t.
void state_gather_fwd_cuda(const StateGatherParams& params, void* stream);
void state_gather_bwd_cuda(const StateGatherBwdParams& params, void* stream);
size_t state_gather_bwd_workspace_bytes(const StateGatherBwdParams& params);

}  // namespace mamba_adaptor
