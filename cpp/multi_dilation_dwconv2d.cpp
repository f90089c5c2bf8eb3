// multi_dilation_dwconv2d: op schema, CPU kernels, CPU registration. The math and shapes are in
// multi_dilation_dwconv2d.h. Each (b, c) plane is read once into a float buffer (through its strides, so
// NCHW and channels_last take the same path) and every tap of every dilation is applied from there.
#include <torch/csrc/stable/library.h>

#include <algorithm>
#include <vector>

#include "common/cpu.h"
#include "multi_dilation_dwconv2d_args.h"

namespace mamba_adaptor {
namespace {

using cpu::acc_t;

template <typename T>
void load_plane(const void* data, const int64_t* strides, int64_t b, int64_t c, int64_t H, int64_t W,
                acc_t<T>* plane) {
  const T* base = static_cast<const T*>(data) + b * strides[0] + c * strides[1];
  for (int64_t y = 0; y < H; ++y) {
    for (int64_t x = 0; x < W; ++x) plane[y * W + x] = static_cast<acc_t<T>>(base[y * strides[2] + x * strides[3]]);
  }
}

template <typename T>
void store_plane(const acc_t<T>* plane, void* data, const int64_t* strides, int64_t b, int64_t c, int64_t H,
                 int64_t W) {
  T* base = static_cast<T*>(data) + b * strides[0] + c * strides[1];
  for (int64_t y = 0; y < H; ++y) {
    for (int64_t x = 0; x < W; ++x) base[y * strides[2] + x * strides[3]] = static_cast<T>(plane[y * W + x]);
  }
}

// The valid range [lo, hi) of a coordinate whose neighbour at distance `shift` must lie in [0, size).
inline void shifted_range(int64_t size, int64_t shift, int64_t& lo, int64_t& hi) {
  lo = std::clamp<int64_t>(-shift, 0, size);
  hi = std::clamp<int64_t>(size - shift, lo, size);
}

// dst[y, x] += w * src[y + dy, x + dx] wherever the source lies inside the plane (zero padding).
template <typename Acc>
void add_tap(const Acc* src, Acc* dst, int64_t H, int64_t W, int64_t dy, int64_t dx, Acc w) {
  int64_t y0, y1, x0, x1;
  shifted_range(H, dy, y0, y1);
  shifted_range(W, dx, x0, x1);
  for (int64_t y = y0; y < y1; ++y) {
    const Acc* s = src + (y + dy) * W + dx;
    Acc* d = dst + y * W;
    for (int64_t x = x0; x < x1; ++x) d[x] += w * s[x];
  }
}

// sum over the plane of a[y, x] * src[y + dy, x + dx] (zero padding).
template <typename Acc>
Acc dot_tap(const Acc* a, const Acc* src, int64_t H, int64_t W, int64_t dy, int64_t dx) {
  int64_t y0, y1, x0, x1;
  shifted_range(H, dy, y0, y1);
  shifted_range(W, dx, x0, x1);
  Acc sum = 0;
  for (int64_t y = y0; y < y1; ++y) {
    const Acc* s = src + (y + dy) * W + dx;
    const Acc* r = a + y * W;
    for (int64_t x = x0; x < x1; ++x) sum += r[x] * s[x];
  }
  return sum;
}

// Calls f(tap, dy, dx) for every tap of every dilation; `tap` indexes weight[i, c] as (i * k + ky) * k + kx.
template <typename F>
void for_each_tap(const DwConvParams& p, const F& f) {
  const int64_t k = p.kernel_size, r = (k - 1) / 2;
  for (int64_t i = 0; i < p.n_dilations; ++i) {
    for (int64_t ky = 0; ky < k; ++ky) {
      for (int64_t kx = 0; kx < k; ++kx) f((i * k + ky) * k + kx, (ky - r) * p.dilations[i], (kx - r) * p.dilations[i]);
    }
  }
}

// weight[i, c, ky, kx] of channel c, as tap-indexed accumulation-type values.
template <typename T>
std::vector<acc_t<T>> channel_weights(const DwConvParams& p, int64_t c) {
  const int64_t kk = p.kernel_size * p.kernel_size;
  std::vector<acc_t<T>> w(p.n_dilations * kk);
  const T* weight = static_cast<const T*>(p.weight);
  for (int64_t i = 0; i < p.n_dilations; ++i) {
    for (int64_t j = 0; j < kk; ++j) w[i * kk + j] = static_cast<acc_t<T>>(weight[(i * p.channels + c) * kk + j]);
  }
  return w;
}

template <typename T>
void dwconv_fwd(const DwConvParams& p) {
  using Acc = acc_t<T>;
  const int64_t H = p.height, W = p.width;
  const int64_t taps = p.n_dilations * p.kernel_size * p.kernel_size;
  cpu::parallel_over(p.batch * p.channels, H * W * (taps + 4), [&](int64_t bc) {
    const int64_t b = bc / p.channels, c = bc % p.channels;
    std::vector<Acc> x(H * W), out(H * W);
    load_plane<T>(p.x, p.x_strides, b, c, H, W, x.data());
    std::fill(out.begin(), out.end(), p.bias ? static_cast<Acc>(static_cast<const T*>(p.bias)[c]) : Acc(0));
    const auto w = channel_weights<T>(p, c);
    for_each_tap(p, [&](int64_t tap, int64_t dy, int64_t dx) { add_tap(x.data(), out.data(), H, W, dy, dx, w[tap]); });
    store_plane<T>(out.data(), p.out, p.out_strides, b, c, H, W);
  });
}

// One task per channel, looping over the batch: grad_x is the same taps applied to grad_out with flipped
// offsets; grad_weight and grad_bias are sums over (b, y, x) owned by the task, so no atomics are needed.
template <typename T>
void dwconv_bwd(const DwConvBwdParams& bp) {
  using Acc = acc_t<T>;
  const DwConvParams& p = bp.fwd;
  const int64_t H = p.height, W = p.width, kk = p.kernel_size * p.kernel_size;
  const int64_t taps = p.n_dilations * kk;
  cpu::parallel_over(p.channels, p.batch * H * W * (2 * taps + 6), [&](int64_t c) {
    std::vector<Acc> g(H * W), x(H * W), gx(H * W), gw(taps, Acc(0));
    Acc gb = 0;
    const auto w = channel_weights<T>(p, c);
    for (int64_t b = 0; b < p.batch; ++b) {
      load_plane<T>(bp.grad_out, bp.grad_out_strides, b, c, H, W, g.data());
      load_plane<T>(p.x, p.x_strides, b, c, H, W, x.data());
      std::fill(gx.begin(), gx.end(), Acc(0));
      for_each_tap(p, [&](int64_t tap, int64_t dy, int64_t dx) {
        add_tap(g.data(), gx.data(), H, W, -dy, -dx, w[tap]);
        gw[tap] += dot_tap(g.data(), x.data(), H, W, dy, dx);
      });
      for (Acc v : g) gb += v;
      store_plane<T>(gx.data(), bp.grad_x, bp.grad_x_strides, b, c, H, W);
    }
    T* grad_weight = static_cast<T*>(bp.grad_weight);
    for (int64_t i = 0; i < p.n_dilations; ++i) {
      for (int64_t j = 0; j < kk; ++j) grad_weight[(i * p.channels + c) * kk + j] = static_cast<T>(gw[i * kk + j]);
    }
    if (bp.grad_bias) static_cast<T*>(bp.grad_bias)[c] = static_cast<T>(gb);
  });
}

Tensor multi_dilation_dwconv2d_cpu(Tensor x, Tensor weight, std::optional<Tensor> bias,
                                   torch::headeronly::HeaderOnlyArrayRef<int64_t> dilations) {
  DwConvCall call = multi_dilation_dwconv2d_call(Backend::CPU, x, weight, bias, {dilations.begin(), dilations.end()});
  if (call.out.numel() > 0) {
    cpu::dispatch_dtype(call.params.dtype, [&](auto tag) { dwconv_fwd<decltype(tag)>(call.params); });
  }
  return call.out;
}

std::tuple<Tensor, Tensor, std::optional<Tensor>> multi_dilation_dwconv2d_backward_cpu(
    Tensor grad_out, Tensor x, Tensor weight, std::optional<Tensor> bias,
    torch::headeronly::HeaderOnlyArrayRef<int64_t> dilations) {
  DwConvBwdCall call =
      multi_dilation_dwconv2d_bwd_call(Backend::CPU, grad_out, x, weight, bias, {dilations.begin(), dilations.end()});
  if (call.grad_weight.numel() > 0) {  // channels > 0; an empty batch or plane gives zero weight grads
    cpu::dispatch_dtype(call.params.fwd.dtype, [&](auto tag) { dwconv_bwd<decltype(tag)>(call.params); });
  }
  return {call.grad_x, call.grad_weight, call.grad_bias};
}

}  // namespace
}  // namespace mamba_adaptor

STABLE_TORCH_LIBRARY_FRAGMENT(mamba_adaptor, m) {
  m.def("multi_dilation_dwconv2d(Tensor x, Tensor weight, Tensor? bias=None, int[] dilations=[1, 2]) -> Tensor");
  m.def(
      "multi_dilation_dwconv2d_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, int[] dilations) "
      "-> (Tensor grad_x, Tensor grad_weight, Tensor? grad_bias)");
}

STABLE_TORCH_LIBRARY_IMPL(mamba_adaptor, CPU, m) {
  m.impl("multi_dilation_dwconv2d", TORCH_BOX(&mamba_adaptor::multi_dilation_dwconv2d_cpu));
  m.impl("multi_dilation_dwconv2d_backward", TORCH_BOX(&mamba_adaptor::multi_dilation_dwconv2d_backward_cpu));
}
