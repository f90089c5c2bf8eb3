// selective_scan: the Mamba recurrence, per channel d of group g = d / (dim / G):
//   dt_t = softplus?(delta_t + delta_bias)
//   h_t[n] = exp(dt_t * A[n]) * h_{t-1}[n] + dt_t * B[g, n, t] * u_t,   h_{-1} = 0
//   y_t = sum_n C[g, n, t] * h_t[n] + D * u_t          (states mode, C absent: the output is h itself)
// Shapes: u, delta, y (b, dim, L); A (dim, N); B, C (b, G, N, L); D, delta_bias (dim,); states (b, dim, N, L).
// Torch-free: CPU and CUDA kernel files see only these structs.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/dtype.h"

namespace mamba_adaptor {

struct SelectiveScanParams {
  DType dtype;  // of u, delta, B, C and the output; A, D, delta_bias are float32 (float64 for Float64)
  int64_t batch, dim, seqlen, dstate, n_groups;
  bool delta_softplus;
  bool states_mode;  // C is absent: the output holds the hidden states

  // Inputs. The L dimension has stride 1; the other strides are in elements.
  const void* u;
  int64_t u_batch_stride, u_dim_stride;
  const void* delta;
  int64_t delta_batch_stride, delta_dim_stride;
  const void* A;
  int64_t A_dim_stride, A_dstate_stride;
  const void* B;
  int64_t B_batch_stride, B_group_stride, B_dstate_stride;
  const void* C;  // nullptr in states mode
  int64_t C_batch_stride, C_group_stride, C_dstate_stride;
  const void* D;           // contiguous (dim,) or nullptr
  const void* delta_bias;  // contiguous (dim,) or nullptr

  // Output, contiguous: y (b, dim, L), or the states (b, dim, N, L) in states mode.
  void* out;
  // Optional output (nullptr: not written), contiguous (b, dim, selective_scan_num_checkpoints(*this), N) in A's
  // dtype: the state h after each of the backward's segments but the last (checkpoints[.., k, n] = h_t[n] at
  // t = (k + 1) * selective_scan_segment(*this) - 1), for a backward that then need not run the forward again.
  void* checkpoints;

  int64_t dim_per_group() const { return dim / n_groups; }
};

// The backward walks L in segments of this many timesteps (the CUDA backward's: 32 lanes of 8 timesteps for
// d_state 1 in 16-bit types, of 4 otherwise) and starts each from the state the segment before left. (constexpr:
// the CUDA kernels call them too.)
constexpr int64_t selective_scan_segment(DType dtype, int64_t dstate) {
  return dstate == 1 && (dtype == DType::Float16 || dtype == DType::BFloat16) ? 256 : 128;
}
constexpr int64_t selective_scan_segment(const SelectiveScanParams& p) {
  return selective_scan_segment(p.dtype, p.dstate);
}

// The checkpoints of a row: one per segment boundary inside L.
constexpr int64_t selective_scan_num_checkpoints(const SelectiveScanParams& p) {
  const int64_t segment = selective_scan_segment(p);
  return p.seqlen > 0 ? (p.seqlen - 1) / segment : 0;
}

struct SelectiveScanBwdParams {
  SelectiveScanParams fwd;  // the forward's inputs (fwd.out unused)
  const void* grad_out;     // contiguous, the shape of the forward's output
  // CUDA: sum dA, dB, dC, dD, ddelta_bias from per-block and per-row partial sums in a fixed order instead of
  // float atomics, for bit-identical results across runs (more workspace). The CPU backward always is.
  bool deterministic;

  // Gradients, contiguous. du, ddelta, dB, dC have the inputs' dtype; dA, dD, ddelta_bias are float32
  // (float64 for Float64) and zero-filled on entry.
  void* du;           // (b, dim, L)
  void* ddelta;       // (b, dim, L)
  void* dA;           // (dim, N)
  void* dB;           // (b, G, N, L)
  void* dC;           // (b, G, N, L), nullptr in states mode
  void* dD;           // (dim,), nullptr without D
  void* ddelta_bias;  // (dim,), nullptr without delta_bias

  // The forward's checkpoints (SelectiveScanParams::checkpoints), or nullptr: the CUDA backward then computes
  // them in its workspace, in a first pass over the inputs. Unused on the CPU, whose backward recomputes every
  // state.
  const void* checkpoints;

  // CUDA only: float32 scratch of selective_scan_bwd_cuda_workspace_bytes(*this) bytes, 16-byte aligned
  // (dB/dC sums, per-row sums when deterministic, the checkpoints when not given).
  // Unused on the CPU.
  void* workspace;
};

// CUDA launchers (cuda/), stream is a cudaStream_t.
void selective_scan_fwd_cuda(const SelectiveScanParams& params, void* stream);
void selective_scan_bwd_cuda(const SelectiveScanBwdParams& params, void* stream);
// Bytes of SelectiveScanBwdParams::workspace that selective_scan_bwd_cuda needs (0 when it needs none).
size_t selective_scan_bwd_cuda_workspace_bytes(const SelectiveScanBwdParams& params);
// Largest d_state N the CUDA kernels take (their per-warp shared memory grows with N).
constexpr int64_t kSelectiveScanCudaMaxDState = 256;

}  // namespace mamba_adaptor
