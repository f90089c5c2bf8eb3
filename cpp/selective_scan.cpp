// selective_scan: op schema, CPU kernels, CPU registration. The math and the shapes are in selective_scan.h.
#include <torch/csrc/stable/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common/cpu.h"
#include "common/cpu_vec.h"
#include "selective_scan_args.h"

namespace mamba_adaptor {
namespace {

using cpu::acc_out;
using cpu::acc_t;
using cpu::as_acc;
using cpu::store_out;

// Pointers of one channel d of batch b: u, delta, and its group's B, C rows (t has stride 1), its row of A.
template <typename T>
struct Channel {
  const T* u;
  const T* delta;
  const T* B;
  const T* C;         // nullptr in states mode
  const acc_t<T>* A;  // A[n] at A[n * A_dstate_stride]
  acc_t<T> D, bias;
};

template <typename T>
Channel<T> channel(const SelectiveScanParams& p, int64_t b, int64_t d) {
  using Acc = acc_t<T>;
  const int64_t g = d / p.dim_per_group();
  Channel<T> c;
  c.u = static_cast<const T*>(p.u) + b * p.u_batch_stride + d * p.u_dim_stride;
  c.delta = static_cast<const T*>(p.delta) + b * p.delta_batch_stride + d * p.delta_dim_stride;
  c.B = static_cast<const T*>(p.B) + b * p.B_batch_stride + g * p.B_group_stride;
  c.C = p.states_mode ? nullptr : static_cast<const T*>(p.C) + b * p.C_batch_stride + g * p.C_group_stride;
  c.A = static_cast<const Acc*>(p.A) + d * p.A_dim_stride;
  c.D = p.D ? static_cast<const Acc*>(p.D)[d] : Acc(0);
  c.bias = p.delta_bias ? static_cast<const Acc*>(p.delta_bias)[d] : Acc(0);
  return c;
}

// dt (L) of one channel: delta + delta_bias, through softplus when delta_softplus.
template <typename T>
void time_steps(const SelectiveScanParams& p, const Channel<T>& c, acc_t<T>* dt) {
  if (p.delta_softplus) {
    cpu::softplus(dt, as_acc(c.delta, dt, p.seqlen), c.bias, p.seqlen);
  } else {
    for (int64_t t = 0; t < p.seqlen; ++t) dt[t] = static_cast<acc_t<T>>(c.delta[t]) + c.bias;
  }
}

// The forward runs one recurrence per state n of each channel row = b * dim + d: chain q = row * N + n. They are
// computed kChains at a time (consecutive chains of a block of rows), as many as linear_recurrence overlaps.
constexpr int64_t kChains = cpu::kRecurrenceRows;

// Rows per block (forward and backward): enough for kChains chains.
int64_t block_rows(const SelectiveScanParams& p) { return (kChains + p.dstate - 1) / p.dstate; }

// Values of scratch that scan_fwd_block needs.
int64_t fwd_work_size(const SelectiveScanParams& p) { return (3 * block_rows(p) + 2 * kChains + 1) * p.seqlen; }

// The checkpoints (SelectiveScanParams::checkpoints) of chains [q, q + chains) (chain q = row * N + n) from their
// states h (chains, L).
template <typename Acc>
void store_checkpoints(const SelectiveScanParams& p, int64_t q, int64_t chains, const Acc* h) {
  const int64_t L = p.seqlen, N = p.dstate, segment = selective_scan_segment(p);
  const int64_t count = selective_scan_num_checkpoints(p);
  for (int64_t j = 0; j < chains; ++j) {
    const int64_t row = (q + j) / N, n = (q + j) % N;
    Acc* out = static_cast<Acc*>(p.checkpoints) + row * count * N + n;
    for (int64_t k = 0; k < count; ++k) out[k * N] = h[j * L + (k + 1) * segment - 1];
  }
}

// Forward of rows [row0, row0 + rows): writes their y (rows, L) or states (rows, N, L), each contiguous in the
// output, and their checkpoints when asked. Per chain, the decays a_t = exp(dt_t A[n]) and drives
// x_t = dt_t u_t B[n, t] are vector loops over t, which leaves only h_t = a_t h_{t-1} + x_t sequential.
template <typename T>
void scan_fwd_block(const SelectiveScanParams& p, int64_t row0, int64_t rows, acc_t<T>* work) {
  using Acc = acc_t<T>;
  const int64_t L = p.seqlen, N = p.dstate, chains = rows * N;
  Acc* dt = work;  // (rows, L) each: dt_t, dt_t u_t, y_t
  Acc* dtu = dt + rows * L;
  Acc* y_buffer = dtu + rows * L;
  Acc* a = y_buffer + rows * L;  // (kChains, L) each: a_t, x_t then h_t
  Acc* x = a + kChains * L;
  Acc* in = x + kChains * L;  // (L,): an input converted to Acc
  T* out = static_cast<T*>(p.out) + row0 * (p.states_mode ? N : 1) * L;
  Acc* y = p.states_mode ? nullptr : acc_out(out, y_buffer);

  Channel<T> c[kChains];
  for (int64_t r = 0; r < rows; ++r) {
    c[r] = channel<T>(p, (row0 + r) / p.dim, (row0 + r) % p.dim);
    time_steps(p, c[r], dt + r * L);
    const Acc* u = as_acc(c[r].u, in, L);
    for (int64_t t = 0; t < L; ++t) dtu[r * L + t] = dt[r * L + t] * u[t];
    if (y) {
      for (int64_t t = 0; t < L; ++t) y[r * L + t] = c[r].D * u[t];
    }
  }
  for (int64_t q0 = 0; q0 < chains; q0 += kChains) {
    const int64_t group = std::min(kChains, chains - q0);
    for (int64_t j = 0; j < group; ++j) {
      const int64_t r = (q0 + j) / N, n = (q0 + j) % N;
      cpu::exp_scaled(a + j * L, c[r].A[n * p.A_dstate_stride], dt + r * L, L);
      const Acc* Bn = as_acc(c[r].B + n * p.B_dstate_stride, in, L);
      for (int64_t t = 0; t < L; ++t) x[j * L + t] = dtu[r * L + t] * Bn[t];
    }
    // h (group, L): the chains' states.
    Acc* h = p.states_mode ? acc_out(out + q0 * L, x) : x;  // in states mode, chains q0.. are rows of the output
    cpu::linear_recurrence(h, a, x, L, group);
    if (p.checkpoints) store_checkpoints(p, row0 * N + q0, group, h);
    if (p.states_mode) {
      store_out(out + q0 * L, h, group * L);
    } else {
      for (int64_t j = 0; j < group; ++j) {
        const int64_t r = (q0 + j) / N, n = (q0 + j) % N;
        cpu::fma_add(y + r * L, as_acc(c[r].C + n * p.C_dstate_stride, in, L), h + j * L, L);
      }
    }
  }
  if (y) store_out(out, y, rows * L);
}

template <typename T>
void scan_fwd(const SelectiveScanParams& p) {
  const int64_t block = block_rows(p), blocks = (p.batch * p.dim + block - 1) / block;
  cpu::parallel_ranges(blocks, block * p.seqlen * p.dstate * 8, [&](int64_t begin, int64_t end) {
    std::vector<acc_t<T>> work(fwd_work_size(p));
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row0 = i * block;
      scan_fwd_block<T>(p, row0, std::min(block, p.batch * p.dim - row0), work.data());
    }
  });
}

// Backward. The adjoint g_t = dL/dh_t runs backwards in t:
//   g_t[n] = (dy_t C[n, t] or dstates[n, t]) + exp(dt_{t+1} A[n]) g_{t+1}[n]
// and with h_t = a_t h_{t-1} + dt_t B_t u_t, a_t = exp(dt_t A):
//   ddt_t = sum_n g_t[n] (A[n] a_t[n] h_{t-1}[n] + B[n, t] u_t),   dA[n] += g_t[n] dt_t a_t[n] h_{t-1}[n],
//   du_t = sum_n g_t[n] dt_t B[n, t] + D dy_t,   dB[n, t] += g_t[n] dt_t u_t,   dC[n, t] += dy_t h_t[n].
// Per chain (row, n), as in the forward: a_t and h_t are recomputed by vector loops and linear_recurrence, g_t is
// linear_recurrence_reverse, and the sums over n are vector loops over t into the row's gB_t = sum_n g_t[n] B[n, t].

// Values of scratch that scan_bwd_block needs.
int64_t bwd_work_size(const SelectiveScanParams& p) { return (6 * block_rows(p) + 3 * kChains + 1) * p.seqlen; }

// Backward of channels [d0, d0 + rows) of batch b, all of one group: writes their du, ddelta (rows, L), adds their
// dB, dC to dBC (2, N, L) in the order of d, and writes their dA, dD, ddelta_bias to `reduce` (dim, N + 2).
template <typename T>
void scan_bwd_block(const SelectiveScanBwdParams& bp, int64_t b, int64_t d0, int64_t rows, acc_t<T>* dBC,
                    acc_t<T>* reduce, acc_t<T>* work) {
  using Acc = acc_t<T>;
  const SelectiveScanParams& p = bp.fwd;
  const int64_t L = p.seqlen, N = p.dstate, chains = rows * N;
  Acc* dt = work;  // (rows, L) each: dt_t, u_t, dt_t u_t, dy_t, ddt_t, gB_t
  Acc* u_buffer = dt + rows * L;
  Acc* dtu = u_buffer + rows * L;
  Acc* dy_buffer = dtu + rows * L;
  Acc* ddt = dy_buffer + rows * L;
  Acc* gB = ddt + rows * L;
  Acc* a = gB + rows * L;  // (kChains, L) each: a_t, h_t, g_t
  Acc* h = a + kChains * L;
  Acc* g = h + kChains * L;
  Acc* in = g + kChains * L;  // (L,): an input converted to Acc
  const int64_t row0 = b * p.dim + d0;
  const T* grad = static_cast<const T*>(bp.grad_out) + row0 * (p.states_mode ? N : 1) * L;
  Acc* dB = dBC;
  Acc* dC = dBC + N * L;

  Channel<T> c[kChains];
  const Acc* u[kChains];
  const Acc* dy[kChains];  // nullptr in states mode
  for (int64_t r = 0; r < rows; ++r) {
    c[r] = channel<T>(p, b, d0 + r);
    time_steps(p, c[r], dt + r * L);
    u[r] = as_acc(c[r].u, u_buffer + r * L, L);
    dy[r] = p.states_mode ? nullptr : as_acc(grad + r * L, dy_buffer + r * L, L);
    for (int64_t t = 0; t < L; ++t) dtu[r * L + t] = dt[r * L + t] * u[r][t];
    std::fill(ddt + r * L, ddt + (r + 1) * L, Acc(0));
    std::fill(gB + r * L, gB + (r + 1) * L, Acc(0));
  }
  for (int64_t q0 = 0; q0 < chains; q0 += kChains) {
    const int64_t group = std::min(kChains, chains - q0);
    for (int64_t j = 0; j < group; ++j) {  // h (group, L)
      const int64_t r = (q0 + j) / N, n = (q0 + j) % N;
      cpu::exp_scaled(a + j * L, c[r].A[n * p.A_dstate_stride], dt + r * L, L);
      const Acc* Bn = as_acc(c[r].B + n * p.B_dstate_stride, in, L);
      for (int64_t t = 0; t < L; ++t) h[j * L + t] = dtu[r * L + t] * Bn[t];
    }
    cpu::linear_recurrence(h, a, h, L, group);
    if (p.states_mode) {  // chains q0.. are consecutive (L,) rows of dstates
      cpu::linear_recurrence_reverse(g, a, as_acc(grad + q0 * L, g, group * L), L, group);
    } else {
      for (int64_t j = 0; j < group; ++j) {
        const int64_t r = (q0 + j) / N, n = (q0 + j) % N;
        const Acc* Cn = as_acc(c[r].C + n * p.C_dstate_stride, in, L);
        for (int64_t t = 0; t < L; ++t) g[j * L + t] = dy[r][t] * Cn[t];
        cpu::fma_add(dC + n * L, dy[r], h + j * L, L);
      }
      cpu::linear_recurrence_reverse(g, a, g, L, group);
    }
    for (int64_t j = 0; j < group; ++j) {
      const int64_t r = (q0 + j) / N, n = (q0 + j) % N;
      cpu::fma_add(gB + r * L, g + j * L, as_acc(c[r].B + n * p.B_dstate_stride, in, L), L);
      cpu::fma_add(dB + n * L, g + j * L, dtu + r * L, L);
      const Acc A = c[r].A[n * p.A_dstate_stride];
      reduce[(d0 + r) * (N + 2) + n] = cpu::scan_decay_grad(ddt + r * L, A, g + j * L, a + j * L, h + j * L,
                                                            dt + r * L, L);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    // ddt_t = sum_n A[n] g a h_{t-1} + u_t gB_t, through softplus; du_t = dt_t gB_t + D dy_t.
    const int64_t row = (row0 + r) * L;
    T* ddelta = static_cast<T*>(bp.ddelta) + row;
    T* du = static_cast<T*>(bp.du) + row;
    Acc* ddelta_acc = acc_out(ddelta, ddt + r * L);
    Acc* du_acc = acc_out(du, gB + r * L);  // after ddelta, which reads gB
    const Acc* gBr = gB + r * L;
    if (p.delta_softplus) {
      Acc* grad_softplus = dtu + r * L;
      cpu::softplus_grad(grad_softplus, as_acc(c[r].delta, grad_softplus, L), c[r].bias, L);
      for (int64_t t = 0; t < L; ++t) ddelta_acc[t] = (ddt[r * L + t] + u[r][t] * gBr[t]) * grad_softplus[t];
    } else {
      for (int64_t t = 0; t < L; ++t) ddelta_acc[t] = ddt[r * L + t] + u[r][t] * gBr[t];
    }
    if (dy[r]) {
      for (int64_t t = 0; t < L; ++t) du_acc[t] = dt[r * L + t] * gBr[t] + c[r].D * dy[r][t];
    } else {
      for (int64_t t = 0; t < L; ++t) du_acc[t] = dt[r * L + t] * gBr[t];
    }
    Acc* slot = reduce + (d0 + r) * (N + 2);
    slot[N] = dy[r] ? cpu::dot(dy[r], u[r], L) : Acc(0);
    slot[N + 1] = cpu::sum(ddelta_acc, L);
    store_out(ddelta, ddelta_acc, L);
    store_out(du, du_acc, L);
  }
}

// Tasks are (batch, group, chunk of the group's channels); each has its own dB/dC partial sums, added in the order
// of the chunks afterwards, and the chunks depend on the shapes only: the result is the same on every run and for
// every thread count. Groups are split into chunks when there are fewer than kBwdTasks (batch, group) pairs.
constexpr int64_t kBwdTasks = 32;

template <typename T>
void scan_bwd(const SelectiveScanBwdParams& bp) {
  using Acc = acc_t<T>;
  const SelectiveScanParams& p = bp.fwd;
  const int64_t L = p.seqlen, N = p.dstate, G = p.n_groups, per_group = p.dim_per_group();
  const int64_t block = block_rows(p);
  const int64_t chunks = std::clamp<int64_t>((kBwdTasks + p.batch * G - 1) / std::max<int64_t>(1, p.batch * G), 1,
                                             (per_group + block - 1) / block);
  const int64_t chunk_size = (per_group + chunks - 1) / chunks;
  const int64_t tasks = p.batch * G * chunks;
  std::vector<Acc> dBC(static_cast<size_t>(tasks) * 2 * N * L, Acc(0));
  std::vector<Acc> reduce(static_cast<size_t>(p.batch) * p.dim * (N + 2), Acc(0));

  cpu::parallel_ranges(tasks, chunk_size * L * N * 16, [&](int64_t begin, int64_t end) {
    std::vector<Acc> work(bwd_work_size(p));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (G * chunks), g = task / chunks % G, chunk = task % chunks;
      const int64_t d_end = std::min((g + 1) * per_group, g * per_group + (chunk + 1) * chunk_size);
      for (int64_t d = g * per_group + chunk * chunk_size; d < d_end; d += block) {
        scan_bwd_block<T>(bp, b, d, std::min(block, d_end - d), dBC.data() + task * 2 * N * L,
                          reduce.data() + b * p.dim * (N + 2), work.data());
      }
    }
  });

  // dB, dC: sum the chunks of each (batch, group).
  cpu::parallel_over(p.batch * G, chunks * 2 * N * L, [&](int64_t bg) {
    const Acc* partial = dBC.data() + bg * chunks * 2 * N * L;
    T* dB = static_cast<T*>(bp.dB) + bg * N * L;
    T* dC = bp.dC ? static_cast<T*>(bp.dC) + bg * N * L : nullptr;
    for (int64_t i = 0; i < N * L; ++i) {
      Acc sB = 0, sC = 0;
      for (int64_t k = 0; k < chunks; ++k) {
        sB += partial[k * 2 * N * L + i];
        sC += partial[k * 2 * N * L + N * L + i];
      }
      dB[i] = static_cast<T>(sB);
      if (dC) dC[i] = static_cast<T>(sC);
    }
  });

  // dA, dD, ddelta_bias: sum over the batch.
  auto* dA = static_cast<Acc*>(bp.dA);
  auto* dD = static_cast<Acc*>(bp.dD);
  auto* dbias = static_cast<Acc*>(bp.ddelta_bias);
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t d = 0; d < p.dim; ++d) {
      const Acc* slot = reduce.data() + (b * p.dim + d) * (N + 2);
      for (int64_t n = 0; n < N; ++n) dA[d * N + n] += slot[n];
      if (dD) dD[d] += slot[N];
      if (dbias) dbias[d] += slot[N + 1];
    }
  }
}

// The forward of selective_scan (and with_checkpoints, of selective_scan_forward) on the CPU.
SelectiveScanCall run_forward(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
                              const std::optional<Tensor>& C, const std::optional<Tensor>& D,
                              const std::optional<Tensor>& delta_bias, bool delta_softplus, bool with_checkpoints) {
  SelectiveScanCall call =
      selective_scan_call(Backend::CPU, u, delta, A, B, C, D, delta_bias, delta_softplus, with_checkpoints);
  if (call.out.numel() > 0) {
    cpu::dispatch_dtype(call.params.dtype, [&](auto tag) { scan_fwd<decltype(tag)>(call.params); });
  }
  return call;
}

// The CPU kernels are deterministic whatever `deterministic` says.
Tensor selective_scan_cpu(Tensor u, Tensor delta, Tensor A, Tensor B, std::optional<Tensor> C,
                          std::optional<Tensor> D, std::optional<Tensor> delta_bias, bool delta_softplus,
                          bool deterministic) {
  return run_forward(u, delta, A, B, C, D, delta_bias, delta_softplus, false).out;
}

std::tuple<Tensor, Tensor> selective_scan_forward_cpu(Tensor u, Tensor delta, Tensor A, Tensor B,
                                                      std::optional<Tensor> C, std::optional<Tensor> D,
                                                      std::optional<Tensor> delta_bias, bool delta_softplus,
                                                      bool deterministic) {
  SelectiveScanCall call = run_forward(u, delta, A, B, C, D, delta_bias, delta_softplus, true);
  return {call.out, *call.checkpoints};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, std::optional<Tensor>, std::optional<Tensor>, std::optional<Tensor>>
selective_scan_backward_cpu(Tensor grad_out, Tensor u, Tensor delta, Tensor A, Tensor B, std::optional<Tensor> C,
                            std::optional<Tensor> D, std::optional<Tensor> delta_bias, bool delta_softplus,
                            bool deterministic, std::optional<Tensor> checkpoints) {
  SelectiveScanBwdCall call = selective_scan_bwd_call(Backend::CPU, grad_out, u, delta, A, B, C, D, delta_bias,
                                                      delta_softplus, deterministic, checkpoints);
  if (call.params.fwd.batch * call.params.fwd.dim > 0) {
    cpu::dispatch_dtype(call.params.fwd.dtype, [&](auto tag) { scan_bwd<decltype(tag)>(call.params); });
  }
  return {call.du, call.ddelta, call.dA, call.dB, call.dC, call.dD, call.ddelta_bias};
}

}  // namespace
}  // namespace mamba_adaptor

STABLE_TORCH_LIBRARY_FRAGMENT(mamba_adaptor, m) {
  m.def(
      "selective_scan(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor? C, Tensor? D=None, "
      "Tensor? delta_bias=None, bool delta_softplus=False, bool deterministic=False) -> Tensor");
  // What autograd runs when it records a backward: selective_scan, and the checkpoints the backward starts from.
  m.def(
      "selective_scan_forward(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor? C, Tensor? D=None, "
      "Tensor? delta_bias=None, bool delta_softplus=False, bool deterministic=False) "
      "-> (Tensor out, Tensor checkpoints)");
  m.def(
      "selective_scan_backward(Tensor grad_out, Tensor u, Tensor delta, Tensor A, Tensor B, Tensor? C, "
      "Tensor? D, Tensor? delta_bias, bool delta_softplus, bool deterministic=False, Tensor? checkpoints=None) "
      "-> (Tensor du, Tensor ddelta, Tensor dA, Tensor dB, Tensor? dC, Tensor? dD, Tensor? ddelta_bias)");
}

STABLE_TORCH_LIBRARY_IMPL(mamba_adaptor, CPU, m) {
  m.impl("selective_scan", TORCH_BOX(&mamba_adaptor::selective_scan_cpu));
  m.impl("selective_scan_forward", TORCH_BOX(&mamba_adaptor::selective_scan_forward_cpu));
  m.impl("selective_scan_backward", TORCH_BOX(&mamba_adaptor::selective_scan_backward_cpu));
}
