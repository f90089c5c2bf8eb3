// multi_dilation_dwconv2d: op schema, CPU kernels, CPU registration. The math and shapes are in
// multi_dilation_dwconv2d.h. The kernels work on blocks of (b, c) planes, read once through their strides
// (NCHW, channels_last or any view) into zero-padded float buffers; every kernel row of every dilation is
// then one vector loop over a whole plane.
#include <torch/csrc/stable/library.h>

#include <algorithm>
#include <vector>

#include "common/cpu.h"
#include "common/cpu_vec.h"
#include "multi_dilation_dwconv2d_args.h"

namespace mamba_adaptor {
namespace {

using cpu::acc_t;

// One row ky of the kernel of dilation i: its k taps read the input at (dy, (kx - r) * dilation), kx < k.
struct KernelRow {
  int64_t first_tap;  // taps first_tap .. first_tap + k - 1 index weight[i, c] as (i * k + ky) * k + kx
  int64_t dy, dilation;
};

std::vector<KernelRow> kernel_rows(const DwConvParams& p) {
  const int64_t k = p.kernel_size, r = (k - 1) / 2;
  std::vector<KernelRow> rows;
  for (int64_t i = 0; i < p.n_dilations; ++i) {
    for (int64_t ky = 0; ky < k; ++ky) rows.push_back({(i * k + ky) * k, (ky - r) * p.dilations[i], p.dilations[i]});
  }
  return rows;
}

// A zero-padded float copy of a (b, c) plane. With `pad` rows and columns of zeros around the plane and a
// row pitch P = W + 2 pad, a tap is one long vector loop over the plane: output (y, x), stored at y * P + x,
// reads (y + pad + dy) * P + (x + pad + dx), and the padding columns between rows hold values nobody reads.
struct PaddedPlane {
  int64_t H, W, pad, pitch;
  int64_t size() const { return (H + 2 * pad) * pitch; }
  int64_t span() const { return (H - 1) * pitch + W; }  // from output (0, 0) to output (H - 1, W - 1)
  int64_t origin() const { return pad * pitch + pad; }   // where input (0, 0) lies in the padded copy
};

PaddedPlane padded_plane(const DwConvParams& p) {
  int64_t max_dilation = 0;
  for (int64_t i = 0; i < p.n_dilations; ++i) max_dilation = std::max(max_dilation, p.dilations[i]);
  const int64_t pad = max_dilation * (p.kernel_size - 1) / 2;
  return PaddedPlane{p.height, p.width, pad, p.width + 2 * pad};
}

// Planes are processed in blocks of kBlock channels: channels_last pixels are then read kBlock channels at a
// time instead of one element per cache line.
constexpr int64_t kBlock = 8;

// Calls f(plane, offset) for plane j < n of image b from channel c0 and each (y, x), offset being the
// element's position in the tensor, in the order that walks the tensor's memory (channels innermost for
// channels_last, columns innermost for NCHW).
template <typename F>
void for_each_element(const int64_t* strides, int64_t b, int64_t c0, int64_t n, const PaddedPlane& pp, const F& f) {
  const int64_t base = b * strides[0] + c0 * strides[1];
  if (strides[1] < strides[3]) {
    for (int64_t y = 0; y < pp.H; ++y) {
      for (int64_t x = 0; x < pp.W; ++x) {
        for (int64_t j = 0; j < n; ++j) f(j, y, x, base + j * strides[1] + y * strides[2] + x * strides[3]);
      }
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t y = 0; y < pp.H; ++y) {
        for (int64_t x = 0; x < pp.W; ++x) f(j, y, x, base + j * strides[1] + y * strides[2] + x * strides[3]);
      }
    }
  }
}

// Planes c0 .. c0 + n - 1 of image b, read through their strides (NCHW, channels_last or any view), into the
// interiors of n padded planes whose padding stays zero.
template <typename T>
void load_planes(const void* data, const int64_t* strides, int64_t b, int64_t c0, int64_t n, const PaddedPlane& pp,
                 acc_t<T>* planes) {
  const T* src = static_cast<const T*>(data);
  for_each_element(strides, b, c0, n, pp, [&](int64_t j, int64_t y, int64_t x, int64_t offset) {
    planes[j * pp.size() + pp.origin() + y * pp.pitch + x] = static_cast<acc_t<T>>(src[offset]);
  });
}

// The H x W outputs of n planes (pitch P, H rows each) into planes c0 .. c0 + n - 1 of image b.
template <typename T>
void store_planes(const acc_t<T>* planes, void* data, const int64_t* strides, int64_t b, int64_t c0, int64_t n,
                  const PaddedPlane& pp) {
  T* dst = static_cast<T*>(data);
  for_each_element(strides, b, c0, n, pp, [&](int64_t j, int64_t y, int64_t x, int64_t offset) {
    dst[offset] = static_cast<T>(planes[(j * pp.H + y) * pp.pitch + x]);
  });
}

// The k weights of one kernel row of channel c, in the accumulation type.
template <typename T>
void row_weights(const DwConvParams& p, const KernelRow& row, int64_t c, acc_t<T>* w) {
  const int64_t kk = p.kernel_size * p.kernel_size;
  const int64_t i = row.first_tap / kk, j0 = row.first_tap % kk;
  const T* weight = static_cast<const T*>(p.weight) + (i * p.channels + c) * kk + j0;
  for (int64_t kx = 0; kx < p.kernel_size; ++kx) w[kx] = static_cast<acc_t<T>>(weight[kx]);
}

template <typename T>
void dwconv_fwd(const DwConvParams& p) {
  using Acc = acc_t<T>;
  const int64_t C = p.channels, k = p.kernel_size, r = (k - 1) / 2, blocks = (C + kBlock - 1) / kBlock;
  const auto rows = kernel_rows(p);
  const PaddedPlane pp = padded_plane(p);
  const int64_t out_size = pp.H * pp.pitch;
  cpu::parallel_over(p.batch * blocks, kBlock * pp.span() * k * static_cast<int64_t>(rows.size()), [&](int64_t task) {
    const int64_t b = task / blocks, c0 = task % blocks * kBlock, n = std::min(kBlock, C - c0);
    std::vector<Acc> x(n * pp.size(), Acc(0)), out(n * out_size);
    load_planes<T>(p.x, p.x_strides, b, c0, n, pp, x.data());
    Acc w[7];
    for (int64_t j = 0; j < n; ++j) {
      Acc* o = out.data() + j * out_size;
      std::fill(o, o + out_size, p.bias ? static_cast<Acc>(static_cast<const T*>(p.bias)[c0 + j]) : Acc(0));
      for (const KernelRow& row : rows) {
        row_weights<T>(p, row, c0 + j, w);
        const Acc* src = x.data() + j * pp.size() + pp.origin() + row.dy * pp.pitch - r * row.dilation;
        cpu::row_taps(o, w, k, src, row.dilation, pp.span());
      }
    }
    store_planes<T>(out.data(), p.out, p.out_strides, b, c0, n, pp);
  });
}

// One task per block of channels, looping over the batch. grad_x[y, x] = sum over taps of
// w * grad_out[y - dy, x - dx]: the same kernel rows read backwards. grad_weight of a tap is the dot product
// of grad_out with the input shifted by the tap (the zero padding of both keeps the padding columns out of
// it). A channel's sums are owned by its task: no atomics, and the same result on every run.
template <typename T>
void dwconv_bwd(const DwConvBwdParams& bp) {
  using Acc = acc_t<T>;
  const DwConvParams& p = bp.fwd;
  const int64_t C = p.channels, k = p.kernel_size, r = (k - 1) / 2, kk = k * k, blocks = (C + kBlock - 1) / kBlock;
  const auto rows = kernel_rows(p);
  const PaddedPlane pp = padded_plane(p);
  const int64_t out_size = pp.H * pp.pitch;
  std::vector<Acc> grad_w(p.n_dilations * kk * C, Acc(0)), grad_b(C, Acc(0));
  const int64_t cost = p.batch * kBlock * pp.span() * 2 * k * static_cast<int64_t>(rows.size());
  cpu::parallel_over(blocks, cost, [&](int64_t block) {
    const int64_t c0 = block * kBlock, n = std::min(kBlock, C - c0);
    std::vector<Acc> g(n * pp.size(), Acc(0)), x(n * pp.size(), Acc(0)), gx(n * out_size);
    Acc w[7];
    for (int64_t b = 0; b < p.batch; ++b) {
      load_planes<T>(bp.grad_out, bp.grad_out_strides, b, c0, n, pp, g.data());
      load_planes<T>(p.x, p.x_strides, b, c0, n, pp, x.data());
      std::fill(gx.begin(), gx.end(), Acc(0));
      for (int64_t j = 0; j < n; ++j) {
        const int64_t c = c0 + j;
        const Acc* g0 = g.data() + j * pp.size() + pp.origin();
        const Acc* x0 = x.data() + j * pp.size() + pp.origin();
        for (const KernelRow& row : rows) {
          row_weights<T>(p, row, c, w);
          cpu::row_taps(gx.data() + j * out_size, w, k, g0 - row.dy * pp.pitch + r * row.dilation, -row.dilation,
                        pp.span());
          for (int64_t kx = 0; kx < k; ++kx) {
            grad_w[(row.first_tap + kx) * C + c] +=
                cpu::dot(g0, x0 + row.dy * pp.pitch + (kx - r) * row.dilation, pp.span());
          }
        }
        for (int64_t y = 0; y < pp.H; ++y) {
          for (int64_t xx = 0; xx < pp.W; ++xx) grad_b[c] += g0[y * pp.pitch + xx];
        }
      }
      store_planes<T>(gx.data(), bp.grad_x, bp.grad_x_strides, b, c0, n, pp);
    }
  });
  T* grad_weight = static_cast<T*>(bp.grad_weight);
  for (int64_t i = 0; i < p.n_dilations; ++i) {
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t j = 0; j < kk; ++j) grad_weight[(i * C + c) * kk + j] = static_cast<T>(grad_w[(i * kk + j) * C + c]);
    }
  }
  if (bp.grad_bias) {
    for (int64_t c = 0; c < C; ++c) static_cast<T*>(bp.grad_bias)[c] = static_cast<T>(grad_b[c]);
  }
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
