// multi_dilation_dwconv2d: op schema, CPU kernels, CPU registration. The math and shapes are in
// multi_dilation_dwconv2d.h. The CPU kernels take one of two paths, by layout:
// - channels innermost (x, out, grad_out, grad_x all with channel stride 1: channels_last and its views): tasks
//   are bands of output rows of one image. A band's input rows and their halo are read once into a float buffer
//   with zero columns around each row and channels padded to a multiple of 16; each output row is then one
//   vector loop over pixels x 16 channels that accumulates every tap in registers, with no transposition. The
//   backward gets grad_x and grad_weight from one such pass over the rows of grad_out.
// - any other strides (NCHW, views): blocks of (b, c) planes, read once through their strides into zero-padded
//   float buffers; every kernel row of every dilation is then one vector loop over a whole plane.
// Both paths sum grad_weight and grad_bias in a fixed order: the same result on every run.
#include <torch/csrc/stable/library.h>

#include <algorithm>
#include <cstdlib>
#include <initializer_list>
#include <memory>
#include <new>
#include <type_traits>
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

// How far the taps reach from the output pixel: max(dilations) * r rows and columns.
int64_t halo(const DwConvParams& p) {
  int64_t max_dilation = 0;
  for (int64_t i = 0; i < p.n_dilations; ++i) max_dilation = std::max(max_dilation, p.dilations[i]);
  return max_dilation * (p.kernel_size - 1) / 2;
}

// grad_weight (n_dilations, C, k, k) and grad_bias (C,) from sums laid out [tap][ld] and [ld], ld >= C, with
// tap = (i * k + ky) * k + kx.
template <typename T>
void store_weight_grads(const DwConvBwdParams& bp, const acc_t<T>* grad_w, const acc_t<T>* grad_b, int64_t ld) {
  const DwConvParams& p = bp.fwd;
  const int64_t C = p.channels, kk = p.kernel_size * p.kernel_size;
  T* grad_weight = static_cast<T*>(bp.grad_weight);
  for (int64_t i = 0; i < p.n_dilations; ++i) {
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t j = 0; j < kk; ++j) {
        grad_weight[(i * C + c) * kk + j] = static_cast<T>(grad_w[(i * kk + j) * ld + c]);
      }
    }
  }
  if (bp.grad_bias) {
    for (int64_t c = 0; c < C; ++c) static_cast<T*>(bp.grad_bias)[c] = static_cast<T>(grad_b[c]);
  }
}

// ---- Plane path: any strides ----------------------------------------------------------------------------

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
  const int64_t pad = halo(p);
  return PaddedPlane{p.height, p.width, pad, p.width + 2 * pad};
}

// Planes are processed in blocks of kBlock channels: pixels whose channels are close in memory (strided
// channels_last views) are then read kBlock channels at a time instead of one element per cache line.
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

// Where the rows are contiguous (x stride 1, as in NCHW), calls f(plane, y, offset) for plane j < n of image b
// from channel c0 and each row y, offset being the row's first element in the tensor, and returns true; else
// returns false.
template <typename F>
bool for_each_row(const int64_t* strides, int64_t b, int64_t c0, int64_t n, const PaddedPlane& pp, const F& f) {
  if (strides[3] != 1) return false;
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t y = 0; y < pp.H; ++y) f(j, y, b * strides[0] + (c0 + j) * strides[1] + y * strides[2]);
  }
  return true;
}

// Planes c0 .. c0 + n - 1 of image b, read through their strides (NCHW, channels_last or any view), into the
// interiors of n padded planes whose padding stays zero.
template <typename T>
void load_planes(const void* data, const int64_t* strides, int64_t b, int64_t c0, int64_t n, const PaddedPlane& pp,
                 acc_t<T>* planes) {
  const T* src = static_cast<const T*>(data);
  const auto row = [&](int64_t j, int64_t y, int64_t offset) {
    cpu::convert(planes + j * pp.size() + pp.origin() + y * pp.pitch, src + offset, pp.W);
  };
  if (for_each_row(strides, b, c0, n, pp, row)) return;
  for_each_element(strides, b, c0, n, pp, [&](int64_t j, int64_t y, int64_t x, int64_t offset) {
    planes[j * pp.size() + pp.origin() + y * pp.pitch + x] = static_cast<acc_t<T>>(src[offset]);
  });
}

// The H x W outputs of n planes (pitch P, H rows each) into planes c0 .. c0 + n - 1 of image b.
template <typename T>
void store_planes(const acc_t<T>* planes, void* data, const int64_t* strides, int64_t b, int64_t c0, int64_t n,
                  const PaddedPlane& pp) {
  T* dst = static_cast<T*>(data);
  const auto row = [&](int64_t j, int64_t y, int64_t offset) {
    cpu::convert(dst + offset, planes + (j * pp.H + y) * pp.pitch, pp.W);
  };
  if (for_each_row(strides, b, c0, n, pp, row)) return;
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
void dwconv_fwd_planes(const DwConvParams& p) {
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
void dwconv_bwd_planes(const DwConvBwdParams& bp) {
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
          const Acc* taps[7];  // the input under each tap of the row, shifted
          Acc sums[7];
          for (int64_t kx = 0; kx < k; ++kx) taps[kx] = x0 + row.dy * pp.pitch + (kx - r) * row.dilation;
          cpu::dots(sums, g0, taps, k, pp.span());
          for (int64_t kx = 0; kx < k; ++kx) grad_w[(row.first_tap + kx) * C + c] += sums[kx];
        }
        for (int64_t y = 0; y < pp.H; ++y) {
          for (int64_t xx = 0; xx < pp.W; ++xx) grad_b[c] += g0[y * pp.pitch + xx];
        }
      }
      store_planes<T>(gx.data(), bp.grad_x, bp.grad_x_strides, b, c0, n, pp);
    }
  });
  store_weight_grads<T>(bp, grad_w.data(), grad_b.data(), C);
}

// ---- Channels-last path: channel stride 1 ---------------------------------------------------------------

// Tasks are bands of kBandRows output rows of one image; channels are padded to a multiple of kLanes, the
// width of the widest vector loops (AVX-512: 16 floats, 2 x 8 doubles).
constexpr int64_t kBandRows = 8;
constexpr int64_t kLanes = 16;

int64_t padded_channels(int64_t C) { return (C + kLanes - 1) / kLanes * kLanes; }

// Whether each row of a tensor with channel stride 1 is already W * Cp contiguous values of the accumulation
// type (float32 or float64, C a multiple of 16, no gap between pixels): it is then copied whole, or read and
// written in place through dense_row.
template <typename T>
bool dense_rows(const int64_t* strides, const DwConvParams& p) {
  return std::is_same_v<T, acc_t<T>> && p.channels == padded_channels(p.channels) && strides[3] == p.channels;
}

// Row y of image b of a dense_rows tensor (input or output, hence the const_cast).
template <typename T>
acc_t<T>* dense_row(const void* data, const int64_t* strides, int64_t b, int64_t y) {
  return const_cast<acc_t<T>*>(
      reinterpret_cast<const acc_t<T>*>(static_cast<const T*>(data) + b * strides[0] + y * strides[2]));
}

// Input rows y_lo .. y_hi - 1 (clipped to the image) of one image in the accumulation type, channels_last: each
// row is `pad` zero pixels, the W pixels, `pad` zero pixels; each pixel Cp channels, zero from C on. A tap at
// column offset dx, |dx| <= pad, of output pixels 0 .. W - 1 then reads pixels at(y, dx) .. at(y, dx + W - 1),
// no clipping. The buffer is 64-byte aligned, so that no vector load of a pixel's channels straddles two
// cache lines.
template <typename Acc>
struct PaddedRows {
  struct Free {
    void operator()(Acc* ptr) const { std::free(ptr); }
  };
  int64_t W, C, Cp, pad, y_lo, y_hi;
  std::unique_ptr<Acc[], Free> data;

  PaddedRows(const DwConvParams& p, int64_t y_lo, int64_t y_hi)
      : W(p.width), C(p.channels), Cp(padded_channels(p.channels)), pad(halo(p)), y_lo(std::max<int64_t>(y_lo, 0)),
        y_hi(std::max(this->y_lo, std::min(y_hi, p.height))),
        data(static_cast<Acc*>(std::aligned_alloc(64, (size() * sizeof(Acc) + 63) / 64 * 64))) {
    if (!data && size() > 0) throw std::bad_alloc();
  }
  int64_t size() const { return (y_hi - y_lo) * (W + 2 * pad) * Cp; }
  const Acc* at(int64_t y, int64_t x) const { return data.get() + ((y - y_lo) * (W + 2 * pad) + pad + x) * Cp; }
};

// Rows rows.y_lo .. rows.y_hi - 1 of image b of a tensor with channel stride 1 into `rows`.
template <typename T>
void load_rows(const void* data, const int64_t* strides, int64_t b, const DwConvParams& p,
               PaddedRows<acc_t<T>>& rows) {
  using Acc = acc_t<T>;
  const int64_t W = rows.W, C = rows.C, Cp = rows.Cp;
  const bool dense = dense_rows<T>(strides, p);
  Acc* dst = rows.data.get();
  for (int64_t y = rows.y_lo; y < rows.y_hi; ++y) {
    const T* src = static_cast<const T*>(data) + b * strides[0] + y * strides[2];
    dst = std::fill_n(dst, rows.pad * Cp, Acc(0));
    if (dense) {
      cpu::convert(dst, src, W * Cp);
      dst += W * Cp;
    } else {
      for (int64_t x = 0; x < W; ++x, dst += Cp) {
        for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<Acc>(src[x * strides[3] + c]);
        std::fill(dst + C, dst + Cp, Acc(0));
      }
    }
    dst = std::fill_n(dst, rows.pad * Cp, Acc(0));
  }
}

// Output row y of image b, W pixels of Cp channels, into a tensor with channel stride 1.
template <typename T>
void store_row(const acc_t<T>* row, void* data, const int64_t* strides, int64_t b, int64_t y, const DwConvParams& p) {
  const int64_t Cp = padded_channels(p.channels);
  T* dst = static_cast<T*>(data) + b * strides[0] + y * strides[2];
  for (int64_t x = 0; x < p.width; ++x) cpu::convert(dst + x * strides[3], row + x * Cp, p.channels);
}

// The tap (dy = dx = 0) of dilation i. The centre taps of all dilations read the output pixel itself, so only
// the first one is listed (taps_inside), with the sum of their weights (tap_weights); its weight gradient is
// then that of every centre tap (dwconv_bwd_rows).
int64_t centre_tap(const DwConvParams& p, int64_t i) {
  const int64_t k = p.kernel_size, r = (k - 1) / 2;
  return (i * k + r) * k + r;
}

// weight (n_dilations, C, k, k) as [tap][Cp] in the accumulation type, zero from C on; the first centre tap
// holds the sum of the centre weights.
template <typename T>
std::vector<acc_t<T>> tap_weights(const DwConvParams& p) {
  const int64_t C = p.channels, Cp = padded_channels(C), kk = p.kernel_size * p.kernel_size;
  std::vector<acc_t<T>> w(p.n_dilations * kk * Cp, acc_t<T>(0));
  const T* weight = static_cast<const T*>(p.weight);
  for (int64_t i = 0; i < p.n_dilations; ++i) {
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t j = 0; j < kk; ++j) w[(i * kk + j) * Cp + c] = static_cast<acc_t<T>>(weight[(i * C + c) * kk + j]);
    }
  }
  for (int64_t i = 1; i < p.n_dilations; ++i) {
    for (int64_t c = 0; c < C; ++c) w[centre_tap(p, 0) * Cp + c] += w[centre_tap(p, i) * Cp + c];
  }
  return w;
}

// Calls f(tap, ys, dx) for each tap of output row y whose input row ys = y + sign * dy lies inside the image,
// dx being sign * the tap's column offset: sign 1 for the forward, -1 for the backward (flipped taps). The
// centre taps of the dilations after the first are left out.
template <typename F>
void taps_inside(const DwConvParams& p, const std::vector<KernelRow>& rows, int64_t y, int64_t sign, const F& f) {
  const int64_t r = (p.kernel_size - 1) / 2;
  for (const KernelRow& row : rows) {
    const int64_t ys = y + sign * row.dy;
    if (ys < 0 || ys >= p.height) continue;
    for (int64_t kx = 0; kx < p.kernel_size; ++kx) {
      const int64_t tap = row.first_tap + kx;
      if (row.dy == 0 && kx == r && tap != centre_tap(p, 0)) continue;
      f(tap, ys, sign * (kx - r) * row.dilation);
    }
  }
}

template <typename T>
void dwconv_fwd_rows(const DwConvParams& p) {
  using Acc = acc_t<T>;
  const int64_t W = p.width, Cp = padded_channels(p.channels), pad = halo(p);
  const int64_t bands = (p.height + kBandRows - 1) / kBandRows;
  const auto rows = kernel_rows(p);
  const auto w = tap_weights<T>(p);
  std::vector<Acc> bias(Cp, Acc(0));
  for (int64_t c = 0; p.bias && c < p.channels; ++c) bias[c] = static_cast<Acc>(static_cast<const T*>(p.bias)[c]);
  const bool in_place = dense_rows<T>(p.out_strides, p);
  const int64_t cost = kBandRows * W * Cp * p.kernel_size * static_cast<int64_t>(rows.size());
  cpu::parallel_over(p.batch * bands, cost, [&](int64_t task) {
    const int64_t b = task / bands, y0 = task % bands * kBandRows, y1 = std::min(p.height, y0 + kBandRows);
    PaddedRows<Acc> in(p, y0 - pad, y1 + pad);
    load_rows<T>(p.x, p.x_strides, b, p, in);
    std::vector<Acc> row(in_place ? 0 : W * Cp);  // one output row, (W, Cp)
    std::vector<const Acc*> srcs, ws;
    for (int64_t y = y0; y < y1; ++y) {
      srcs.clear();
      ws.clear();
      taps_inside(p, rows, y, 1, [&](int64_t tap, int64_t ys, int64_t dx) {
        srcs.push_back(in.at(ys, dx));
        ws.push_back(w.data() + tap * Cp);
      });
      Acc* out = in_place ? dense_row<T>(p.out, p.out_strides, b, y) : row.data();
      cpu::channels_last_taps(out, bias.data(), W, Cp, srcs.data(), ws.data(), static_cast<int64_t>(srcs.size()));
      if (!in_place) store_row<T>(out, p.out, p.out_strides, b, y, p);
    }
  });
}

// Tasks as in the forward. grad_x[y, x] = sum over taps of w * grad_out[y - dy, x - dx]: the forward's taps,
// flipped. grad_weight of a tap = sum over (y, x) of x[y, x] * grad_out[y - dy, x - dx], the same shifted
// grad_out rows, so both gradients come from one pass over them (channels_last_taps_backward), reading grad_out
// rows with their halo and x rows without. Each task sums its rows into its own [tap + 1][Cp] slot (grad_bias
// last), then the slots are added in task order: no atomics, and the same result on every run, whatever the
// number of threads.
template <typename T>
void dwconv_bwd_rows(const DwConvBwdParams& bp) {
  using Acc = acc_t<T>;
  const DwConvParams& p = bp.fwd;
  const int64_t W = p.width, Cp = padded_channels(p.channels), pad = halo(p);
  const int64_t bands = (p.height + kBandRows - 1) / kBandRows, tasks = p.batch * bands;
  const int64_t taps = p.n_dilations * p.kernel_size * p.kernel_size, slot = (taps + 1) * Cp;
  const auto rows = kernel_rows(p);
  const auto w = tap_weights<T>(p);
  std::vector<Acc> sums(std::max<int64_t>(tasks, 1) * slot, Acc(0));  // [task][tap + 1][Cp]
  const bool in_place = dense_rows<T>(bp.grad_x_strides, p), x_in_place = dense_rows<T>(p.x_strides, p);
  cpu::parallel_over(tasks, 2 * kBandRows * W * Cp * taps, [&](int64_t task) {
    const int64_t b = task / bands, y0 = task % bands * kBandRows, y1 = std::min(p.height, y0 + kBandRows);
    PaddedRows<Acc> g(p, y0 - pad, y1 + pad), x(p, y0, x_in_place ? y0 : y1);  // x: no halo, no copy if dense
    load_rows<T>(bp.grad_out, bp.grad_out_strides, b, p, g);
    load_rows<T>(p.x, p.x_strides, b, p, x);
    Acc* grad_w = sums.data() + task * slot;
    std::vector<Acc> row(in_place ? 0 : W * Cp);  // one row of grad_x, (W, Cp)
    std::vector<const Acc*> srcs, ws;
    std::vector<Acc*> gws;
    for (int64_t y = y0; y < y1; ++y) {
      srcs.clear();
      ws.clear();
      gws.clear();
      taps_inside(p, rows, y, -1, [&](int64_t tap, int64_t ys, int64_t dx) {
        srcs.push_back(g.at(ys, dx));
        ws.push_back(w.data() + tap * Cp);
        gws.push_back(grad_w + tap * Cp);
      });
      Acc* gx = in_place ? dense_row<T>(bp.grad_x, bp.grad_x_strides, b, y) : row.data();
      const Acc* x_row = x_in_place ? dense_row<T>(p.x, p.x_strides, b, y) : x.at(y, 0);
      cpu::channels_last_taps_backward(gx, gws.data(), x_row, W, Cp, srcs.data(), ws.data(),
                                       static_cast<int64_t>(srcs.size()));
      if (!in_place) store_row<T>(gx, bp.grad_x, bp.grad_x_strides, b, y, p);
      cpu::channels_last_sum(grad_w + taps * Cp, g.at(y, 0), W, Cp);
    }
  });
  for (int64_t task = 1; task < tasks; ++task) {
    for (int64_t i = 0; i < slot; ++i) sums[i] += sums[task * slot + i];
  }
  for (int64_t i = 1; i < p.n_dilations; ++i) {
    std::copy_n(sums.begin() + centre_tap(p, 0) * Cp, Cp, sums.begin() + centre_tap(p, i) * Cp);
  }
  store_weight_grads<T>(bp, sums.data(), sums.data() + taps * Cp, Cp);
}

// ---- Dispatch -------------------------------------------------------------------------------------------

// Channel stride 1 in every tensor given (strides as in the params; a size-1 dimension has stride 0, so C > 1).
bool channels_innermost(std::initializer_list<const int64_t*> strides) {
  return std::all_of(strides.begin(), strides.end(), [](const int64_t* s) { return s[1] == 1; });
}

template <typename T>
void dwconv_fwd(const DwConvParams& p) {
  if (channels_innermost({p.x_strides, p.out_strides})) {
    dwconv_fwd_rows<T>(p);
  } else {
    dwconv_fwd_planes<T>(p);
  }
}

template <typename T>
void dwconv_bwd(const DwConvBwdParams& bp) {
  if (channels_innermost({bp.fwd.x_strides, bp.grad_out_strides, bp.grad_x_strides})) {
    dwconv_bwd_rows<T>(bp);
  } else {
    dwconv_bwd_planes<T>(bp);
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
