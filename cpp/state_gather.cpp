// state_gather: op schema, CPU kernels, CPU registration. The math and the shapes are in state_gather.h.
#include <torch/csrc/stable/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/cpu.h"
#include "state_gather_args.h"

namespace mamba_adaptor {
namespace {

using cpu::acc_t;

// One interpolated sample at p = t + offset: its two neighbours, each an index into the row or -1 (reads 0).
template <typename Acc>
struct Sample {
  int64_t i0, i1;
  Acc frac;    // p - floor(p): the weight of i1; NaN for a non-finite p, which makes the output NaN
  Acc weight;  // weights[b, s, k, t]
};

template <typename Acc>
inline Sample<Acc> make_sample(int64_t t, Acc offset, Acc weight, int64_t L) {
  const Acc p = static_cast<Acc>(t) + offset;
  const Acc lo = std::floor(p);
  // Comparisons are false for NaN, so a non-finite or far-away position never becomes an index.
  const int64_t i0 = lo >= Acc(0) && lo <= static_cast<Acc>(L - 1) ? static_cast<int64_t>(lo) : -1;
  const int64_t i1 = lo >= Acc(-1) && lo <= static_cast<Acc>(L - 2) ? static_cast<int64_t>(lo) + 1 : -1;
  return Sample<Acc>{i0, i1, p - lo, weight};
}

template <typename T>
inline acc_t<T> read(const T* row, int64_t i) {
  return i >= 0 ? static_cast<acc_t<T>>(row[i]) : acc_t<T>(0);
}

// The samples of every (b, s), laid out (b*S, L, K); offsets and weights are read through their strides.
template <typename T>
std::vector<Sample<acc_t<T>>> make_samples(const StateGatherParams& p) {
  using Acc = acc_t<T>;
  const int64_t K = p.n_points, L = p.seqlen;
  std::vector<Sample<Acc>> samples(static_cast<size_t>(p.batch * p.n_seq * L * K));
  const auto* offsets = static_cast<const T*>(p.offsets);
  const auto* weights = static_cast<const T*>(p.weights);
  const int64_t* os = p.offsets_strides;
  const int64_t* ws = p.weights_strides;
  cpu::parallel_over(p.batch * p.n_seq, L * K * 8, [&](int64_t bs) {
    const int64_t b = bs / p.n_seq, s = bs % p.n_seq;
    Sample<Acc>* out = samples.data() + bs * L * K;
    for (int64_t t = 0; t < L; ++t) {
      for (int64_t k = 0; k < K; ++k) {
        const Acc offset = static_cast<Acc>(offsets[b * os[0] + s * os[1] + k * os[2] + t * os[3]]);
        const Acc weight = static_cast<Acc>(weights[b * ws[0] + s * ws[1] + k * ws[2] + t * ws[3]]);
        out[t * K + k] = make_sample(t, offset, weight, L);
      }
    }
  });
  return samples;
}

template <typename T>
void gather_fwd(const StateGatherParams& p) {
  using Acc = acc_t<T>;
  const int64_t K = p.n_points, L = p.seqlen, D = p.dim;
  const auto samples = make_samples<T>(p);
  cpu::parallel_over(p.batch * p.n_seq * D, L * K * 6, [&](int64_t row) {
    const Sample<Acc>* sample = samples.data() + row / D * L * K;
    const T* h = static_cast<const T*>(p.h) + row * L;
    T* out = static_cast<T*>(p.out) + row * L;
    for (int64_t t = 0; t < L; ++t) {
      Acc acc = p.residual ? static_cast<Acc>(h[t]) : Acc(0);
      for (int64_t k = 0; k < K; ++k) {
        const Sample<Acc>& s = sample[t * K + k];
        acc += s.weight * ((Acc(1) - s.frac) * read(h, s.i0) + s.frac * read(h, s.i1));
      }
      out[t] = static_cast<T>(acc);
    }
  });
}

// grad_h is a scatter within each row; grad_offsets and grad_weights reduce over D. Both are computed
// without atomics, so the CPU backward is deterministic whatever `deterministic` says.
template <typename T>
void gather_bwd(const StateGatherBwdParams& bp) {
  using Acc = acc_t<T>;
  const StateGatherParams& p = bp.fwd;
  const int64_t K = p.n_points, L = p.seqlen, D = p.dim;
  const auto samples = make_samples<T>(p);
  const auto* h = static_cast<const T*>(p.h);
  const auto* grad = static_cast<const T*>(bp.grad_out);

  cpu::parallel_over(p.batch * p.n_seq * D, L * K * 6, [&](int64_t row) {
    const Sample<Acc>* sample = samples.data() + row / D * L * K;
    const T* g = grad + row * L;
    std::vector<Acc> acc(L);
    for (int64_t t = 0; t < L; ++t) acc[t] = p.residual ? static_cast<Acc>(g[t]) : Acc(0);
    for (int64_t t = 0; t < L; ++t) {
      const Acc gt = static_cast<Acc>(g[t]);
      for (int64_t k = 0; k < K; ++k) {
        const Sample<Acc>& s = sample[t * K + k];
        if (s.i0 >= 0) acc[s.i0] += s.weight * (Acc(1) - s.frac) * gt;
        if (s.i1 >= 0) acc[s.i1] += s.weight * s.frac * gt;
      }
    }
    T* grad_h = static_cast<T*>(bp.grad_h) + row * L;
    for (int64_t t = 0; t < L; ++t) grad_h[t] = static_cast<T>(acc[t]);
  });

  constexpr int64_t kChunk = 256;  // positions t per task: reads rows of h and grad_out in runs
  const int64_t chunks = (L + kChunk - 1) / kChunk;
  cpu::parallel_over(p.batch * p.n_seq * chunks, D * kChunk * K * 8, [&](int64_t task) {
    const int64_t bs = task / chunks, t0 = task % chunks * kChunk, t1 = std::min(L, t0 + kChunk);
    const Sample<Acc>* sample = samples.data() + bs * L * K;
    std::vector<Acc> dweight((t1 - t0) * K, Acc(0)), dpos((t1 - t0) * K, Acc(0));
    for (int64_t d = 0; d < D; ++d) {
      const T* x = h + (bs * D + d) * L;
      const T* g = grad + (bs * D + d) * L;
      for (int64_t t = t0; t < t1; ++t) {
        const Acc gt = static_cast<Acc>(g[t]);
        for (int64_t k = 0; k < K; ++k) {
          const Sample<Acc>& s = sample[t * K + k];
          const Acc v0 = read(x, s.i0), v1 = read(x, s.i1);
          dweight[(t - t0) * K + k] += gt * ((Acc(1) - s.frac) * v0 + s.frac * v1);
          dpos[(t - t0) * K + k] += gt * (v1 - v0);
        }
      }
    }
    T* grad_weights = static_cast<T*>(bp.grad_weights) + bs * K * L;
    T* grad_offsets = static_cast<T*>(bp.grad_offsets) + bs * K * L;
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t k = 0; k < K; ++k) {
        grad_weights[k * L + t] = static_cast<T>(dweight[(t - t0) * K + k]);
        grad_offsets[k * L + t] = static_cast<T>(sample[t * K + k].weight * dpos[(t - t0) * K + k]);
      }
    }
  });
}

Tensor state_gather_cpu(Tensor h, Tensor offsets, Tensor weights, bool residual, bool deterministic) {
  StateGatherCall call = state_gather_call(Backend::CPU, h, offsets, weights, residual);
  if (call.out.numel() > 0) {
    cpu::dispatch_dtype(call.params.dtype, [&](auto tag) { gather_fwd<decltype(tag)>(call.params); });
  }
  return call.out;
}

std::tuple<Tensor, Tensor, Tensor> state_gather_backward_cpu(Tensor grad_out, Tensor h, Tensor offsets,
                                                             Tensor weights, bool residual, bool deterministic) {
  StateGatherBwdCall call = state_gather_bwd_call(Backend::CPU, grad_out, h, offsets, weights, residual, deterministic);
  if (call.grad_offsets.numel() > 0) {  // else grad_h is empty too (K >= 1)
    cpu::dispatch_dtype(call.params.fwd.dtype, [&](auto tag) { gather_bwd<decltype(tag)>(call.params); });
  }
  return {call.grad_h, call.grad_offsets, call.grad_weights};
}

}  // namespace
}  // namespace mamba_adaptor

STABLE_TORCH_LIBRARY_FRAGMENT(mamba_adaptor, m) {
  m.def("state_gather(Tensor h, Tensor offsets, Tensor weights, bool residual=True, bool deterministic=False) -> Tensor");
  m.def(
      "state_gather_backward(Tensor grad_out, Tensor h, Tensor offsets, Tensor weights, bool residual, "
      "bool deterministic) -> (Tensor grad_h, Tensor grad_offsets, Tensor grad_weights)");
}

STABLE_TORCH_LIBRARY_IMPL(mamba_adaptor, CPU, m) {
  m.impl("state_gather", TORCH_BOX(&mamba_adaptor::state_gather_cpu));
  m.impl("state_gather_backward", TORCH_BOX(&mamba_adaptor::state_gather_backward_cpu));
}
