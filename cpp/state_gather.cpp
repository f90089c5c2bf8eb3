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

// The L * K samples of slice bs = (b, s), laid out (L, K); offsets and weights are read through their strides.
template <typename T>
void make_samples(const StateGatherParams& p, int64_t bs, Sample<acc_t<T>>* out) {
  using Acc = acc_t<T>;
  const int64_t K = p.n_points, L = p.seqlen, b = bs / p.n_seq, s = bs % p.n_seq;
  const T* offsets = static_cast<const T*>(p.offsets) + b * p.offsets_strides[0] + s * p.offsets_strides[1];
  const T* weights = static_cast<const T*>(p.weights) + b * p.weights_strides[0] + s * p.weights_strides[1];
  const int64_t* os = p.offsets_strides;
  const int64_t* ws = p.weights_strides;
  for (int64_t t = 0; t < L; ++t) {
    for (int64_t k = 0; k < K; ++k) {
      const Acc offset = static_cast<Acc>(offsets[k * os[2] + t * os[3]]);
      const Acc weight = static_cast<Acc>(weights[k * ws[2] + t * ws[3]]);
      out[t * K + k] = make_sample(t, offset, weight, L);
    }
  }
}

// The forward works on blocks of kRows channels of one (b, s), interleaved position-major, (1 + L, kRows) in the
// accumulation type: a sample, read once, is one kRows-wide vector operation for the whole block. Position i
// sits at i + 1 behind a row of zeros, which the neighbour index -1 (outside the sequence) reads: no branch.
constexpr int64_t kRows = 8;

template <typename T>
void gather_fwd(const StateGatherParams& p) {
  using Acc = acc_t<T>;
  const int64_t K = p.n_points, L = p.seqlen, D = p.dim;
  const int64_t blocks = (D + kRows - 1) / kRows;
  cpu::parallel_ranges(p.batch * p.n_seq * blocks, L * K * kRows * 2, [&](int64_t begin, int64_t end) {
    std::vector<Acc> block((1 + L) * kRows, Acc(0)), out(L * kRows), rows(std::is_same_v<T, Acc> ? 0 : kRows * L);
    std::vector<Sample<Acc>> samples(L * K);
    int64_t samples_of = -1;  // the slice whose samples `samples` holds
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bs = task / blocks, d0 = task % blocks * kRows, n = std::min(kRows, D - d0);
      if (bs != samples_of) make_samples<T>(p, samples_of = bs, samples.data());
      const Sample<Acc>* sample = samples.data();
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

// The backward works position-major: a (b, s) slice of h or grad_out, (D, L), is transposed to (L, D), so
// that a sample, which reads all D channels of one position, is one vector loop over D. Transposes go by tiles
// of kTile positions and 8 channels.
constexpr int64_t kTile = 64;
constexpr int64_t kTileChannels = 8;

// src (D, L) in T -> dst (L, D) in the accumulation type.
template <typename T>
void to_position_major(const T* src, acc_t<T>* dst, int64_t D, int64_t L) {
  using Acc = acc_t<T>;
  for (int64_t t0 = 0; t0 < L; t0 += kTile) {
    const int64_t n = std::min(kTile, L - t0);
    for (int64_t d0 = 0; d0 < D; d0 += kTileChannels) {
      const int64_t rows = std::min(kTileChannels, D - d0);
      if constexpr (std::is_same_v<T, Acc>) {
        cpu::transpose(dst + t0 * D + d0, D, src + d0 * L + t0, L, rows, n);
      } else {
        Acc tile[kTileChannels * kTile];
        for (int64_t d = 0; d < rows; ++d) cpu::convert(tile + d * kTile, src + (d0 + d) * L + t0, n);
        cpu::transpose(dst + t0 * D + d0, D, tile, kTile, rows, n);
      }
    }
  }
}

// src (L, D) in the accumulation type -> dst (D, L) in T.
template <typename T>
void from_position_major(const acc_t<T>* src, T* dst, int64_t D, int64_t L) {
  using Acc = acc_t<T>;
  if constexpr (std::is_same_v<T, Acc>) {
    cpu::transpose(dst, L, src, D, L, D);
  } else {
    for (int64_t t0 = 0; t0 < L; t0 += kTile) {
      const int64_t n = std::min(kTile, L - t0);
      for (int64_t d0 = 0; d0 < D; d0 += kTileChannels) {
        const int64_t rows = std::min(kTileChannels, D - d0);
        Acc tile[kTileChannels * kTile];
        cpu::transpose(tile, kTile, src + t0 * D + d0, D, n, rows);
        for (int64_t d = 0; d < rows; ++d) cpu::convert(dst + (d0 + d) * L + t0, tile + d * kTile, n);
      }
    }
  }
}

// One task per (b, s) slice, in position-major copies of h and grad_out that stay in cache: grad_weights and
// grad_offsets come from two dot products per sample, dot(grad_out[t], h[i0]) and dot(grad_out[t], h[i1]) over D,
// the 2K of a position in one pass over grad_out[t]; grad_h is a scatter of grad_out rows to the neighbours,
// within the slice. As in the forward, position i is row i + 1 of the copies: the neighbour -1 reads a row of
// zeros from h and scatters into a row of grad_h that is never stored. No atomics: the same result on every run
// whatever `deterministic` says.
template <typename T>
void gather_bwd(const StateGatherBwdParams& bp) {
  using Acc = acc_t<T>;
  const StateGatherParams& p = bp.fwd;
  const int64_t K = p.n_points, L = p.seqlen, D = p.dim;
  cpu::parallel_ranges(p.batch * p.n_seq, L * K * D * 4, [&](int64_t begin, int64_t end) {
    std::vector<Sample<Acc>> samples(L * K);
    std::vector<Acc> h_rows((1 + L) * D, Acc(0)), g(L * D), gh_rows((1 + L) * D);  // (1 + L, D), (L, D), (1 + L, D)
    std::vector<const Acc*> neighbours(2 * K);
    std::vector<Acc> products(2 * K);  // dot(grad_out[t], h[i0]), dot(grad_out[t], h[i1]) of each sample
    Acc* h = h_rows.data() + D;   // position i at h + i * D
    Acc* gh = gh_rows.data() + D;
    for (int64_t bs = begin; bs < end; ++bs) {
      make_samples<T>(p, bs, samples.data());
      to_position_major(static_cast<const T*>(p.h) + bs * D * L, h, D, L);
      to_position_major(static_cast<const T*>(bp.grad_out) + bs * D * L, g.data(), D, L);
      if (p.residual) {
        std::copy(g.begin(), g.end(), gh);
      } else {
        std::fill(gh, gh + L * D, Acc(0));
      }
      T* grad_weights = static_cast<T*>(bp.grad_weights) + bs * K * L;
      T* grad_offsets = static_cast<T*>(bp.grad_offsets) + bs * K * L;
      for (int64_t t = 0; t < L; ++t) {
        const Acc* gt = g.data() + t * D;
        const Sample<Acc>* sample = samples.data() + t * K;
        for (int64_t k = 0; k < K; ++k) {
          neighbours[2 * k] = h + sample[k].i0 * D;
          neighbours[2 * k + 1] = h + sample[k].i1 * D;
        }
        cpu::dots(products.data(), gt, neighbours.data(), 2 * K, D);
        for (int64_t k = 0; k < K; ++k) {
          const Sample<Acc>& s = sample[k];
          const Acc v0 = products[2 * k], v1 = products[2 * k + 1];
          cpu::axpy(gh + s.i0 * D, s.weight * (Acc(1) - s.frac), gt, D);
          cpu::axpy(gh + s.i1 * D, s.weight * s.frac, gt, D);
          grad_weights[k * L + t] = static_cast<T>((Acc(1) - s.frac) * v0 + s.frac * v1);
          grad_offsets[k * L + t] = static_cast<T>(s.weight * (v1 - v0));
        }
      }
      from_position_major(gh, static_cast<T*>(bp.grad_h) + bs * D * L, D, L);
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
