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

// The kernels work position-major: a (b, s) slice of h or grad_out, (D, L), is transposed to (L, D), so that a
// sample, which reads all D channels of one position, is one vector loop over D; the transposed slices stay in
// cache. Position i is row i + 1 of the copy of h: the neighbour -1 (outside the sequence) reads a row of zeros,
// without a branch.

// src (D, L) in T -> dst (L, D) in the accumulation type; 16-bit values are widened into `scratch` (D * L) first.
template <typename T>
void to_position_major(const T* src, acc_t<T>* dst, int64_t D, int64_t L, std::vector<acc_t<T>>& scratch) {
  scratch.resize(std::is_same_v<T, acc_t<T>> ? 0 : D * L);
  cpu::transpose(dst, D, cpu::as_acc(src, scratch.data(), D * L), L, D, L);
}

// src (L, D) in the accumulation type -> dst (D, L) in T; 16-bit outputs are rounded from `scratch` (D * L).
template <typename T>
void from_position_major(const acc_t<T>* src, T* dst, int64_t D, int64_t L, std::vector<acc_t<T>>& scratch) {
  scratch.resize(std::is_same_v<T, acc_t<T>> ? 0 : D * L);
  acc_t<T>* out = cpu::acc_out(dst, scratch.data());
  cpu::transpose(out, L, src, D, L, D);
  cpu::store_out(dst, out, D * L);
}

// One task per (b, s) slice: out[t] = [h[t]] + sum_k weight_k ((1 - frac_k) h[i0_k] + frac_k h[i1_k]) over all D
// channels of position t at once.
template <typename T>
void gather_fwd(const StateGatherParams& p) {
  using Acc = acc_t<T>;
  const int64_t K = p.n_points, L = p.seqlen, D = p.dim;
  cpu::parallel_ranges(p.batch * p.n_seq, L * K * D * 2, [&](int64_t begin, int64_t end) {
    std::vector<Sample<Acc>> samples(L * K);
    std::vector<Acc> h_rows((1 + L) * D, Acc(0)), out(L * D), scratch;  // (1 + L, D), (L, D)
    std::vector<const Acc*> rows(2 * K + 1);
    std::vector<Acc> coefs(2 * K + 1);
    Acc* h = h_rows.data() + D;  // position i at h + i * D
    for (int64_t bs = begin; bs < end; ++bs) {
      make_samples<T>(p, bs, samples.data());
      to_position_major(static_cast<const T*>(p.h) + bs * D * L, h, D, L, scratch);
      for (int64_t t = 0; t < L; ++t) {
        int64_t m = 0;
        if (p.residual) rows[m] = h + t * D, coefs[m++] = Acc(1);
        for (int64_t k = 0; k < K; ++k) {
          const Sample<Acc>& s = samples[t * K + k];
          rows[m] = h + s.i0 * D, coefs[m++] = s.weight * (Acc(1) - s.frac);
          rows[m] = h + s.i1 * D, coefs[m++] = s.weight * s.frac;
        }
        cpu::combine(out.data() + t * D, rows.data(), coefs.data(), m, D);
      }
      from_position_major(out.data(), static_cast<T*>(p.out) + bs * D * L, D, L, scratch);
    }
  });
}

// One task per (b, s) slice, in position-major copies of h and grad_out that stay in cache: grad_weights and
// grad_offsets come from two dot products per sample, dot(grad_out[t], h[i0]) and dot(grad_out[t], h[i1]) over D,
// the 2K of a position in one pass over grad_out[t]; grad_h is a scatter of grad_out rows to the neighbours,
// within the slice, where the neighbour -1 lands in a row of grad_h that is never stored. No atomics: the same
// result on every run whatever `deterministic` says.
template <typename T>
void gather_bwd(const StateGatherBwdParams& bp) {
  using Acc = acc_t<T>;
  const StateGatherParams& p = bp.fwd;
  const int64_t K = p.n_points, L = p.seqlen, D = p.dim;
  cpu::parallel_ranges(p.batch * p.n_seq, L * K * D * 4, [&](int64_t begin, int64_t end) {
    std::vector<Sample<Acc>> samples(L * K);
    std::vector<Acc> h_rows((1 + L) * D, Acc(0)), g(L * D), gh_rows((1 + L) * D), scratch;  // (1+L, D), (L, D)
    std::vector<const Acc*> neighbours(2 * K);
    std::vector<Acc> products(2 * K);  // dot(grad_out[t], h[i0]), dot(grad_out[t], h[i1]) of each sample
    Acc* h = h_rows.data() + D;  // position i at h + i * D, as in gh
    Acc* gh = gh_rows.data() + D;
    for (int64_t bs = begin; bs < end; ++bs) {
      make_samples<T>(p, bs, samples.data());
      to_position_major(static_cast<const T*>(p.h) + bs * D * L, h, D, L, scratch);
      to_position_major(static_cast<const T*>(bp.grad_out) + bs * D * L, g.data(), D, L, scratch);
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
      from_position_major(gh, static_cast<T*>(bp.grad_h) + bs * D * L, D, L, scratch);
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
