// state_gather: op schema, CPU kernels, CPU registration. The math and the shapes are in state_gather.h.
#include <torch/csrc/stable/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common/cpu.h"
#include "common/cpu_vec.h"
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

// The backward works position-major: a (b, s) slice of h or grad_out, (D, L), is transposed to (L, D), so
// that a sample, which reads all D channels of one position, is one vector loop over D.
constexpr int64_t kTile = 64;  // positions per task

// (b*S, D, L) in T -> (b*S, L, D) in the accumulation type, a tile of positions by 8 channels at a time.
template <typename T>
std::vector<acc_t<T>> position_major(const void* data, int64_t BS, int64_t D, int64_t L) {
  using Acc = acc_t<T>;
  constexpr int64_t kChannels = 8;
  std::vector<Acc> out(static_cast<size_t>(BS * L * D));
  const int64_t tiles = (L + kTile - 1) / kTile;
  cpu::parallel_over(BS * tiles, kTile * D * 2, [&](int64_t task) {
    const int64_t bs = task / tiles, t0 = task % tiles * kTile, n = std::min(L, t0 + kTile) - t0;
    const T* src = static_cast<const T*>(data) + bs * D * L + t0;
    Acc* dst = out.data() + (bs * L + t0) * D;
    for (int64_t d0 = 0; d0 < D; d0 += kChannels) {
      const int64_t rows = std::min(kChannels, D - d0);
      if constexpr (std::is_same_v<T, Acc>) {
        cpu::transpose(dst + d0, D, src + d0 * L, L, rows, n);
      } else {
        Acc buffer[kChannels * kTile];
        for (int64_t d = 0; d < rows; ++d) cpu::convert(buffer + d * kTile, src + (d0 + d) * L, n);
        cpu::transpose(dst + d0, D, buffer, kTile, rows, n);
      }
    }
  });
  return out;
}

// The forward works on blocks of kRows channels of one (b, s), interleaved position-major, (1 + L, kRows) in the
// accumulation type: a sample, read once, is one kRows-wide vector operation for the whole block. Position i
// sits at i + 1 behind a row of zeros, which the neighbour index -1 (outside the sequence) reads: no branch.
constexpr int64_t kRows = 8;

template <typename T>
void gather_fwd(const StateGatherParams& p) {
  using Acc = acc_t<T>;
  const int64_t K = p.n_points, L = p.seqlen, D = p.dim;
  const auto samples = make_samples<T>(p);
  const int64_t blocks = (D + kRows - 1) / kRows;
  cpu::parallel_ranges(p.batch * p.n_seq * blocks, L * K * kRows * 2, [&](int64_t begin, int64_t end) {
    std::vector<Acc> block((1 + L) * kRows, Acc(0)), out(L * kRows), rows(std::is_same_v<T, Acc> ? 0 : kRows * L);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bs = task / blocks, d0 = task % blocks * kRows, n = std::min(kRows, D - d0);
      const Sample<Acc>* sample = samples.data() + bs * L * K;
      const T* h = static_cast<const T*>(p.h) + (bs * D + d0) * L;  // (n, L)
      Acc* positions = block.data() + kRows;  // position i at positions + i * kRows; i = -1 reads zeros
      if constexpr (std::is_same_v<T, Acc>) {
        cpu::transpose(positions, kRows, h, L, n, L);
      } else {
        cpu::convert(rows.data(), h, n * L);
        cpu::transpose(positions, kRows, rows.data(), L, n, L);
      }
      for (int64_t t = 0; t < L; ++t) {
        Acc acc[kRows];
        for (int64_t j = 0; j < kRows; ++j) acc[j] = p.residual ? positions[t * kRows + j] : Acc(0);
        for (int64_t k = 0; k < K; ++k) {
          const Sample<Acc>& s = sample[t * K + k];
          const Acc a0 = Acc(1) - s.frac;
          const Acc* v0 = positions + s.i0 * kRows;
          const Acc* v1 = positions + s.i1 * kRows;
          for (int64_t j = 0; j < kRows; ++j) acc[j] += s.weight * (a0 * v0[j] + s.frac * v1[j]);
        }
        for (int64_t j = 0; j < kRows; ++j) out[t * kRows + j] = acc[j];
      }
      T* dst = static_cast<T*>(p.out) + (bs * D + d0) * L;  // (n, L)
      if constexpr (std::is_same_v<T, Acc>) {
        cpu::transpose(dst, L, out.data(), kRows, L, n);
      } else {
        cpu::transpose(rows.data(), L, out.data(), kRows, L, n);
        cpu::convert(dst, rows.data(), n * L);
      }
    }
  });
}

// grad_weights and grad_offsets come from two dot products per sample, dot(grad_out[t], h[i0]) and
// dot(grad_out[t], h[i1]) over D; grad_h is a scatter of grad_out rows to the neighbours, done by tasks that
// each own a block of channels of one (b, s), so no two tasks write the same element. No atomics: the same
// result on every run whatever `deterministic` says.
template <typename T>
void gather_bwd(const StateGatherBwdParams& bp) {
  using Acc = acc_t<T>;
  const StateGatherParams& p = bp.fwd;
  const int64_t K = p.n_points, L = p.seqlen, D = p.dim, BS = p.batch * p.n_seq;
  const auto samples = make_samples<T>(p);
  const auto h = position_major<T>(p.h, BS, D, L);
  const auto g = position_major<T>(bp.grad_out, BS, D, L);

  const int64_t tiles = (L + kTile - 1) / kTile;
  cpu::parallel_over(BS * tiles, kTile * K * D * 2, [&](int64_t task) {
    const int64_t bs = task / tiles, t0 = task % tiles * kTile, t1 = std::min(L, t0 + kTile);
    const Sample<Acc>* sample = samples.data() + bs * L * K;
    const Acc* hs = h.data() + bs * L * D;
    T* grad_weights = static_cast<T*>(bp.grad_weights) + bs * K * L;
    T* grad_offsets = static_cast<T*>(bp.grad_offsets) + bs * K * L;
    for (int64_t t = t0; t < t1; ++t) {
      const Acc* gt = g.data() + (bs * L + t) * D;
      for (int64_t k = 0; k < K; ++k) {
        const Sample<Acc>& s = sample[t * K + k];
        const Acc v0 = s.i0 >= 0 ? cpu::dot(gt, hs + s.i0 * D, D) : Acc(0);
        const Acc v1 = s.i1 >= 0 ? cpu::dot(gt, hs + s.i1 * D, D) : Acc(0);
        grad_weights[k * L + t] = static_cast<T>((Acc(1) - s.frac) * v0 + s.frac * v1);
        grad_offsets[k * L + t] = static_cast<T>(s.weight * (v1 - v0));
      }
    }
  });

  constexpr int64_t kChannels = 64;  // channels per grad_h task
  const int64_t blocks = (D + kChannels - 1) / kChannels;
  cpu::parallel_over(BS * blocks, L * K * kChannels * 2, [&](int64_t task) {
    const int64_t bs = task / blocks, d0 = task % blocks * kChannels, n = std::min(kChannels, D - d0);
    const Sample<Acc>* sample = samples.data() + bs * L * K;
    const Acc* gs = g.data() + bs * L * D + d0;
    std::vector<Acc> gh(L * n);  // this task's channels of grad_h, position-major (L, n)
    for (int64_t t = 0; t < L; ++t) {
      for (int64_t d = 0; d < n; ++d) gh[t * n + d] = p.residual ? gs[t * D + d] : Acc(0);
    }
    for (int64_t t = 0; t < L; ++t) {
      for (int64_t k = 0; k < K; ++k) {
        const Sample<Acc>& s = sample[t * K + k];
        if (s.i0 >= 0) cpu::axpy(gh.data() + s.i0 * n, s.weight * (Acc(1) - s.frac), gs + t * D, n);
        if (s.i1 >= 0) cpu::axpy(gh.data() + s.i1 * n, s.weight * s.frac, gs + t * D, n);
      }
    }
    T* grad_h = static_cast<T*>(bp.grad_h) + (bs * D + d0) * L;  // (n, L)
    if constexpr (std::is_same_v<T, Acc>) {
      cpu::transpose(grad_h, L, gh.data(), n, L, n);
    } else {
      std::vector<Acc> buffer(n * kTile);
      for (int64_t t0 = 0; t0 < L; t0 += kTile) {
        const int64_t m = std::min(kTile, L - t0);
        cpu::transpose(buffer.data(), kTile, gh.data() + t0 * n, n, m, n);
        for (int64_t d = 0; d < n; ++d) cpu::convert(grad_h + d * L + t0, buffer.data() + d * kTile, m);
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
