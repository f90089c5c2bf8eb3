// multi_dilation_dwconv2d (Adaptor-S) CUDA kernels, instantiated per dtype in
// multi_dilation_dwconv2d_{conv,wgrad}_<dtype>.cu.
// Shapes: x, out, grad_out, grad_x (b, C, H, W) with any strides (NCHW, channels_last, views); weight,
// grad_weight (n_dilations, C, k, k) contiguous, k in {3, 5, 7}; bias, grad_bias (C,). r = (k - 1) / 2.
//
// Staged path: a block owns one image b, a block of `channels` channels and a tile of tile_h x tile_w output
// pixels. It copies the input tile with its largest halo (r * max dilation) into shared memory once, as float
// laid out [row][col][channel], zero outside the plane, and applies every tap of every dilation from there. The
// copy reads chunks of up to 16 bytes along the input's contiguous direction (columns of one channel for
// NCHW-like strides, channels of one pixel for channels_last), so global reads are wide and coalesced either way.
// A thread computes strips: kStripRows vertically adjacent output pixels of one channel word (4 / sizeof(T)
// channels, one 32-bit word of the input). For each tap column kx it reads the window of rows the strip's kernel
// rows cover once (a 16-bit strip's two channels in one 64-bit shared load) and applies it to every (row, ky)
// pair that uses it: at dilation d, kStripRows + (k - 1) d loads instead of kStripRows k, the dilations 1 and 2
// compiled with their window in registers. Strips run channel word fastest, then column, so a warp's loads are
// consecutive words of shared memory.
//   conv_kernel: out = bias + sum of taps; grad_x is the same kernel on grad_out with flipped taps.
//   weight_grad_kernel: per block, sum over its pixels of grad_out * shifted x for every tap (and grad_out for
//     the bias), reduced over the block in a fixed order and written as one row of partial sums per
//     (b, tile); reduce_partials_kernel then sums the rows in order: no atomics, bit-identical runs.
// Direct path, when the halo tile does not fit in the device's shared memory (very large dilations): one thread
// per output reading global memory, and a block per weight-gradient tap and group of channels (32 channels_last,
// else 1) with a fixed-order reduction; both read along the input's layout.
// Index arithmetic: element offsets int64 (strides are int64); in-tile indices int.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common.cuh"
#include "multi_dilation_dwconv2d.h"

namespace mamba_adaptor::cuda::dwconv {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kStripRows = 4;            // output rows of a strip
constexpr int kStrips = 4;               // most strips per thread of a staged block
constexpr int kStageBytes = 64;          // bytes of loads a thread has in flight while staging a tile
constexpr int kEarlyWeights = 4;         // conv_kernel: weights per thread loaded before the tile is staged
constexpr int kSmemBudget = 100 * 1024;  // most bytes of a staged block's tile and weights (see plan)
// Blocks per SM the staged kernels are compiled for (__launch_bounds__), and that plan's tiles leave room for:
// 4 at k = 3, the paper's size (64 registers; sm_90, nvcc 13: the forward spills nothing, the weight gradient in
// 16-bit types 48-64 bytes, some 10 local loads and stores per kernel column, off the tap loops), else what their
// registers allow.
__host__ __device__ constexpr int conv_blocks_per_sm(int64_t k) { return k == 3 ? 4 : 2; }
__host__ __device__ constexpr int weight_grad_blocks_per_sm(int64_t k) { return k == 3 ? 4 : 3; }

template <typename T>
constexpr int kWordChannels = 4 / static_cast<int>(sizeof(T));  // channels per 32-bit word

// Static shared memory of weight_grad_kernel<T, k>: the scratch of reduce_over_pixels.
constexpr size_t weight_grad_static_smem(int64_t k) { return static_cast<size_t>(kWarps * 32 * k) * sizeof(float); }

struct Tiling {
  bool staged;         // false: the halo tile does not fit in shared memory, use the direct kernels
  bool channels_last;  // staging along channels (else along columns)
  int tile_h, tile_w, halo, channels, words;  // words: channel words per pixel (channels / kWordChannels)
  int64_t tiles_y, tiles_x, channel_blocks;

  __host__ __device__ int strip_rows() const { return (tile_h + kStripRows - 1) / kStripRows; }
  __host__ __device__ int strips() const { return strip_rows() * tile_w * words; }
  // The staged rows: the strips' rows (tile_h rounded up to kStripRows) with the halo on both sides.
  __host__ __device__ int span_h() const { return strip_rows() * kStripRows + 2 * halo; }
  __host__ __device__ int span_w() const { return tile_w + 2 * halo; }
  int64_t blocks(int64_t batch) const { return batch * channel_blocks * tiles_y * tiles_x; }
  __host__ __device__ size_t tile_bytes() const { return static_cast<size_t>(span_h()) * span_w() * channels * 4; }
  size_t weight_bytes(const DwConvParams& p) const {
    return static_cast<size_t>(p.n_dilations * p.kernel_size * p.kernel_size) * channels * 4;
  }
};

// Whether a (b, C, H, W) tensor with `strides` has its channels closer together than its columns.
__host__ __device__ inline bool is_channels_last(const DwConvParams& p, const int64_t* strides) {
  return p.channels > 1 && strides[1] < strides[3];
}

// The tiling of a staged block for the input read through `strides` (x for the forward and the weight
// gradient, grad_out for grad_x) on a device with `block_smem` bytes of shared memory per block; the same
// function sizes the workspace, so both always agree. A block has at most kThreads * kStrips strips and 32
// channels: channels_last up to 16 x 16 pixels of as many channel words as C needs; NCHW up to 64 pixels wide
// with one channel word, more where a small plane leaves threads without a strip. The tile with its halo and the
// weights (conv_kernel) stay within kSmemBudget and the share of block_smem of one of conv_blocks_per_sm blocks
// (a whole SM's 99 KiB on sm_86 and sm_89 would otherwise go to one block), the tile and the static scratch
// (weight_grad_kernel) within block_smem: where the default tile does not fit, a channels_last one takes the
// channel words and tile size that read the fewest sectors, an NCHW one shrinks to at most 8 x 8 pixels; and the
// direct kernels take over where a halo over 1024 or one channel word of an 8 x 8 tile does not fit.
inline Tiling plan(const DwConvParams& p, const int64_t* strides, int elem_size, size_t block_smem) {
  const int per_word = 4 / elem_size, max_words = 32 / per_word;
  Tiling t{};
  int64_t max_dilation = 1;
  for (int64_t i = 0; i < p.n_dilations; ++i) max_dilation = p.dilations[i] > max_dilation ? p.dilations[i] : max_dilation;
  const int64_t halo = (p.kernel_size - 1) / 2 * max_dilation;
  t.channels_last = is_channels_last(p, strides);
  t.words = 1;
  if (t.channels_last) {
    while (t.words < max_words && t.words * per_word < p.channels) t.words *= 2;  // a power of 2
    t.tile_h = static_cast<int>(p.height < 16 ? p.height : 16);
    t.tile_w = static_cast<int>(p.width < 16 ? p.width : 16);
  } else {
    t.tile_w = static_cast<int>(p.width < 64 ? p.width : 64);
    t.tile_h = static_cast<int>(p.height < 4096 / t.tile_w ? p.height : 4096 / t.tile_w);
  }
  while (t.strips() > kThreads * kStrips) t.tile_h = (t.tile_h + 1) / 2;
  while (!t.channels_last && t.words < max_words && t.words * per_word < p.channels && 2 * t.strips() <= kThreads) {
    t.words *= 2;
  }
  t.channels = t.words * per_word;
  t.staged = halo <= 1024;
  t.halo = static_cast<int>(t.staged ? halo : 0);
  const size_t budget = std::min<size_t>(kSmemBudget, block_smem / conv_blocks_per_sm(p.kernel_size));
  const size_t scratch = weight_grad_static_smem(p.kernel_size);
  const auto fits = [&](const Tiling& c) {
    return c.tile_bytes() + c.weight_bytes(p) <= budget && c.tile_bytes() + scratch <= block_smem;
  };
  if (t.staged && t.channels_last && !fits(t)) {
    // A default tile too large for the budget (a large halo, or less shared memory: sm_80, sm_86, sm_89). The
    // staged words per output word, span_h * span_w / (tile_h * tile_w), fall as the tile grows, but under 8
    // channel words (32 bytes) per pixel each pixel's read still takes a whole sector. Of each count of words with
    // its largest square tile that fits (up to 64 x 64 pixels), take the one that reads the fewest sectors per
    // output word.
    double fewest = 0;
    Tiling best = t;
    for (Tiling c = t; c.words >= 1; c.words /= 2) {
      c.channels = c.words * per_word;
      for (int side = 64; side >= 1; --side) {
        c.tile_h = static_cast<int>(std::min<int64_t>(side, p.height));
        c.tile_w = static_cast<int>(std::min<int64_t>(side, p.width));
        if (c.strips() > kThreads * kStrips || !fits(c)) continue;
        const double sectors = static_cast<double>(c.span_h()) * c.span_w() / (c.tile_h * c.tile_w) *
                               std::max(1.0, 8.0 / c.words);
        if (fewest == 0 || sectors < fewest) {
          fewest = sectors;
          best = c;
        }
        break;
      }
    }
    t = best;
  }
  while (t.staged && !fits(t)) {
    if (t.tile_h > 8 && t.tile_h >= t.tile_w) {
      t.tile_h = (t.tile_h + 1) / 2;
    } else if (t.tile_w > 8) {
      t.tile_w = (t.tile_w + 1) / 2;
    } else if (t.words > 1) {
      t.words /= 2;
      t.channels = t.words * per_word;
    } else {
      t.staged = false;
    }
  }
  t.tiles_y = ceil_div(p.height, t.tile_h);
  t.tiles_x = ceil_div(p.width, t.tile_w);
  t.channel_blocks = ceil_div(p.channels, t.channels);
  return t;
}

// One row of partial sums per (b, tile): n_dilations * C * k * k weight sums (grad_weight's layout), then C
// bias sums.
__host__ __device__ inline int64_t partial_row(const DwConvParams& p) { return p.n_dilations * p.channels * p.kernel_size * p.kernel_size + p.channels; }

inline int64_t n_partials(const DwConvParams& p, const Tiling& t) { return p.batch * t.tiles_y * t.tiles_x; }

// The block of a staged kernel: image b, channels c0.., output tile at (y0, x0) of th x tw pixels.
struct Block {
  int64_t b, tile_y, tile_x;
  int c0, y0, x0, th, tw;
};

__device__ __forceinline__ Block make_block(const DwConvParams& p, const Tiling& t) {
  int64_t block = blockIdx.x;
  Block blk;
  blk.tile_x = block % t.tiles_x;
  block /= t.tiles_x;
  blk.tile_y = block % t.tiles_y;
  block /= t.tiles_y;
  blk.c0 = static_cast<int>(block % t.channel_blocks) * t.channels;
  blk.b = block / t.channel_blocks;
  blk.y0 = static_cast<int>(blk.tile_y) * t.tile_h;
  blk.x0 = static_cast<int>(blk.tile_x) * t.tile_w;
  blk.th = min(t.tile_h, static_cast<int>(p.height) - blk.y0);
  blk.tw = min(t.tile_w, static_cast<int>(p.width) - blk.x0);
  return blk;
}

// Quotients n / d of n < 2^16 by a block-uniform 0 < d <= 2^16 as one multiplication: floor(n ceil(2^32 / d) / 2^32)
// is floor(n / d) there (the error n (ceil(2^32 / d) - 2^32 / d) / 2^32 < 2^-16 <= 1 / d never reaches the next
// integer).
struct SmallDivisor {
  uint32_t d, magic;
  __device__ explicit SmallDivisor(uint32_t divisor) : d(divisor), magic(divisor > 1 ? 0xffffffffu / divisor + 1 : 0) {}
  __device__ int quotient(int n) const { return d > 1 ? static_cast<int>(__umulhi(static_cast<uint32_t>(n), magic)) : n; }
};
// stage_tile's items (chunks of the tile) number at most twice its floats, which the plan keeps within kSmemBudget.
static_assert(2 * kSmemBudget / 4 < (1 << 16), "SmallDivisor needs stage_tile's item indices below 2^16");

// The elements per chunk stage_tile may read at once (up to 16 bytes): the largest power of 2 that divides the
// input's address and strides in elements, for channels_last at most the block's channels, and 1 unless the
// contiguous direction (columns, or channels for channels_last) has stride 1. Then every chunk of kV elements
// that starts at a multiple of kV along that direction is kV * sizeof(T)-aligned.
template <typename T>
__device__ __forceinline__ int stage_chunk_elements(const void* data, const int64_t* strides, const Tiling& t) {
  constexpr int kMost = 16 / static_cast<int>(sizeof(T));
  if (strides[t.channels_last ? 1 : 3] != 1) return 1;
  const uint64_t multiples = reinterpret_cast<uintptr_t>(data) / sizeof(T) | static_cast<uint64_t>(strides[0]) |
                             static_cast<uint64_t>(strides[t.channels_last ? 3 : 1]) | static_cast<uint64_t>(strides[2]) |
                             (t.channels_last ? static_cast<uint64_t>(t.channels) : 0) | kMost;
  return static_cast<int>(multiples & (~multiples + 1));  // the lowest set bit
}

// stage_tile with loads of kV elements (stage_chunk_elements). `origin` is channel c0 of the tile's first row and
// column (it may lie outside the plane); element offsets from it are Offset: int where the tile's extent fits (every
// tile but those of images of over 2^31 elements), else int64_t. Work items are chunks of the tile, consecutive threads
// on consecutive items, kChunks of them in flight per thread (kStageBytes of loads, at most 8):
// - NCHW-like (columns contiguous): chunks of kW = 16 / sizeof(T) columns of a line, read kV at a time; item =
//   line * n_chunks + k, line = row * cb + channel, chunk k = the kW columns from the kW-aligned plane column at or
//   before the tile's first one, plus k * kW; its columns outside the tile are not stored, those outside the plane
//   are 0.
// - channels_last: chunks of kW = kV channels (two at least for 16-bit types, a whole word: cb is even there);
//   item = pixel * (cb / kW) + k (pixel = row * sw + col), chunk k = the block's channels k * kW..; stored as kW
//   consecutive floats.
template <typename T, int kV, typename Offset>
__device__ __forceinline__ void stage_chunks(float* tile, const T* origin, const int64_t* strides,
                                             const DwConvParams& p, const Tiling& t, const Block& blk) {
  const int sh = t.span_h(), sw = t.span_w(), cb = t.channels, log2_cb = __ffs(cb) - 1;
  const int y0 = blk.y0 - t.halo, x0 = blk.x0 - t.halo, height = static_cast<int>(p.height),
            width = static_cast<int>(p.width), channels = static_cast<int>(p.channels) - blk.c0;
  const Offset row_stride = static_cast<Offset>(strides[2]);
  if (t.channels_last) {
    constexpr int kW = kV * sizeof(T) < 4 ? 4 / static_cast<int>(sizeof(T)) : kV;
    constexpr int kBytes = kW * static_cast<int>(sizeof(T)), kChunks = kStageBytes / kBytes < 8 ? kStageBytes / kBytes : 8;
    // The stride of the contiguous direction: 1 where loads are wider than one element.
    const Offset channel_stride = kV > 1 ? 1 : static_cast<Offset>(strides[1]), col_stride = static_cast<Offset>(strides[3]);
    const int log2_chunks = log2_cb - (__ffs(kW) - 1), n_items = sh * sw << log2_chunks;
    const SmallDivisor per_row(sw);
    for (int item0 = threadIdx.x; item0 < n_items; item0 += kThreads * kChunks) {
      Items<T, kW> chunk[kChunks];
      int dst[kChunks];  // the chunk's first float in the tile
#pragma unroll
      for (int j = 0; j < kChunks; ++j) {
        const int item = item0 + j * kThreads, pixel = item >> log2_chunks, row = per_row.quotient(pixel);
        const int col = pixel - row * sw, c = (item & ((1 << log2_chunks) - 1)) * kW;
        dst[j] = pixel * cb + c;
        const bool inside = item < n_items && y0 + row >= 0 && y0 + row < height && x0 + col >= 0 && x0 + col < width;
        const T* at = origin + (c * channel_stride + row * row_stride + col * col_stride);
        chunk[j] = load_chunk<kV, kW>(at, channel_stride, inside ? channels - c : 0);
      }
#pragma unroll
      for (int j = 0; j < kChunks; ++j) {
        if (item0 + j * kThreads >= n_items) break;
        const Items<T, kW>& v = chunk[j];
#pragma unroll
        for (int i = 0; i < kW; i += 4) {
          if constexpr (kW >= 4) {
            *reinterpret_cast<float4*>(tile + dst[j] + i) = make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]);
          } else if constexpr (kW == 2) {
            *reinterpret_cast<float2*>(tile + dst[j]) = make_float2(v[0], v[1]);
          } else {
            tile[dst[j]] = v[0];
          }
        }
      }
    }
    return;
  }
  constexpr int kW = 16 / static_cast<int>(sizeof(T)), kChunks = kStageBytes / 16;
  const Offset channel_stride = static_cast<Offset>(strides[1]), col_stride = kV > 1 ? 1 : static_cast<Offset>(strides[3]);
  const int first = x0 & -kW;  // plane column of chunk 0 (x0 may be negative: & rounds it down)
  const int n_chunks = ((x0 + sw - 1 - first) >> (__ffs(kW) - 1)) + 1, n_items = sh * cb * n_chunks;
  const SmallDivisor per_line(n_chunks);
  for (int item0 = threadIdx.x; item0 < n_items; item0 += kThreads * kChunks) {
    Items<T, kW> chunk[kChunks];
    int col[kChunks];  // the tile column of the chunk's first element (may be < 0)
    int dst[kChunks];  // the tile float of that column, (row * sw + col) * cb + channel
#pragma unroll
    for (int j = 0; j < kChunks; ++j) {
      const int item = item0 + j * kThreads, line = per_line.quotient(item), k = item - line * n_chunks;
      const int row = line >> log2_cb, c = line & (cb - 1), x = first + k * kW;
      col[j] = x - x0;
      dst[j] = (row * sw + col[j]) * cb + c;
      const bool line_inside = item < n_items && y0 + row >= 0 && y0 + row < height && c < channels;
      const T* at = origin + (c * channel_stride + row * row_stride + col[j] * col_stride);
      // Chunks start at multiples of kW, as the plane does: one is all inside the plane's left edge or all outside.
      chunk[j] = load_chunk<kV, kW>(at, col_stride, line_inside && x >= 0 ? width - x : 0);
    }
#pragma unroll
    for (int j = 0; j < kChunks; ++j) {
      if (item0 + j * kThreads >= n_items) break;
      const Items<T, kW>& v = chunk[j];
      float* at = tile + dst[j];
      if (col[j] >= 0 && col[j] + kW <= sw) {  // every chunk but a line's first and last
#pragma unroll
        for (int i = 0; i < kW; ++i) at[i * cb] = v[i];
      } else {
#pragma unroll
        for (int i = 0; i < kW; ++i) {
          if (col[j] + i >= 0 && col[j] + i < sw) at[i * cb] = v[i];
        }
      }
    }
  }
}

// Copies the input tile with its halo into `tile` (float [row][col][channel]), 0 outside the plane and for
// channels >= C, in chunks of up to 16 bytes along the input's contiguous direction (stage_chunks), so that a
// thread's one load brings up to 8 elements. Every thread of the block must call it.
template <typename T>
__device__ __forceinline__ void stage_tile(float* tile, const void* data, const int64_t* strides,
                                           const DwConvParams& p, const Tiling& t, const Block& blk) {
  const T* origin = static_cast<const T*>(data) + blk.b * strides[0] + blk.c0 * strides[1] +
                    (blk.y0 - t.halo) * strides[2] + (blk.x0 - t.halo) * strides[3];
  // The most an element offset from origin reaches (strides are >= 0; a chunk starts up to 7 columns before the
  // tile and ends up to 7 after it). Past int, in images of over 2^31 elements, one element per load is enough.
  const int64_t extent = t.channels * strides[1] + t.span_h() * strides[2] + (t.span_w() + 8) * strides[3];
  if (extent > INT32_MAX) {
    stage_chunks<T, 1, int64_t>(tile, origin, strides, p, t, blk);
    return;
  }
  switch (stage_chunk_elements<T>(data, strides, t)) {
    case 1: stage_chunks<T, 1, int>(tile, origin, strides, p, t, blk); break;
    case 2: stage_chunks<T, 2, int>(tile, origin, strides, p, t, blk); break;
    case 4: stage_chunks<T, 4, int>(tile, origin, strides, p, t, blk); break;
    default: stage_chunks<T, 16 / sizeof(T), int>(tile, origin, strides, p, t, blk); break;  // 8 for 16-bit types
  }
}

// Strip n (< kStrips) of this thread: unit threadIdx.x + n * kThreads of the block, channel word fastest (every
// strip of a thread has the word threadIdx.x % words: kThreads is a multiple of words), then column, then strip
// row. Strips are in order: once one is not live, none after it is.
struct Strip {
  bool live;    // whether it has outputs in the tile
  int row, col; // its first output pixel in the tile
  int centre;   // float index of that pixel's channel word in the staged tile
};

template <int kPerWord>
__device__ __forceinline__ Strip make_strip(const Tiling& t, const Block& blk, int word, int n) {
  const int pixel = (static_cast<int>(threadIdx.x) + n * kThreads) / t.words;
  Strip s;
  s.col = pixel % blk.tw;
  s.row = pixel / blk.tw * kStripRows;
  s.live = s.row < blk.th;
  s.centre = ((s.row + t.halo) * t.span_w() + s.col + t.halo) * t.channels + word * kPerWord;
  return s;
}

// Where a strip's channel word lies in a tensor with `strides`: `offset`, the element offset of its first channel
// at the strip's first pixel (its next rows follow strides[2] apart); `channels`, how many of its channels exist;
// `packed`, whether the two 16-bit channels of every row are one aligned 32-bit word (channels_last).
struct WordAt {
  int64_t offset;
  int channels;
  bool packed;
};

template <typename T>
__device__ __forceinline__ WordAt word_at(const DwConvParams& p, const Block& blk, int word, const Strip& s,
                                          const void* data, const int64_t* strides) {
  constexpr int kPerWord = kWordChannels<T>;
  const int64_t ch = blk.c0 + word * kPerWord;
  WordAt at;
  at.offset = blk.b * strides[0] + ch * strides[1] + (blk.y0 + s.row) * strides[2] + (blk.x0 + s.col) * strides[3];
  at.channels = static_cast<int>(p.channels - ch < kPerWord ? p.channels - ch : kPerWord);
  at.packed = kPerWord == 2 && at.channels == 2 && strides[1] == 1 && strides[2] % 2 == 0 &&
              reinterpret_cast<uintptr_t>(static_cast<const T*>(data) + at.offset) % 4 == 0;
  return at;
}

// Row m's channel values of the word at `at` in `data` (0 for channels that do not exist).
template <typename T>
__device__ __forceinline__ void load_row(const WordAt& at, int m, const void* data, const int64_t* strides,
                                         float (&v)[kWordChannels<T>]) {
  const T* row = static_cast<const T*>(data) + at.offset + m * strides[2];
  if constexpr (kWordChannels<T> == 2) {
    if (at.packed) {
      unpack_word(*reinterpret_cast<const uint32_t*>(row), v, T{});
      return;
    }
  }
#pragma unroll
  for (int c = 0; c < kWordChannels<T>; ++c) v[c] = c < at.channels ? to_float(row[c * strides[1]]) : 0.f;
}

// Stores row m's channel values of the word at `at` into `data` (the channels that exist).
template <typename T>
__device__ __forceinline__ void store_row(const WordAt& at, int m, void* data, const int64_t* strides,
                                          const float (&v)[kWordChannels<T>]) {
  T* row = static_cast<T*>(data) + at.offset + m * strides[2];
  if constexpr (kWordChannels<T> == 2) {
    if (at.packed) {
      *reinterpret_cast<uint32_t*>(row) = pack_word(v, T{});
      return;
    }
  }
#pragma unroll
  for (int c = 0; c < kWordChannels<T>; ++c) {
    if (c < at.channels) row[c * strides[1]] = from_float<T>(v[c]);
  }
}

// v = the kPerWord floats at `at` (8-byte aligned when 2: a channel word's offset is even).
template <int kPerWord>
__device__ __forceinline__ void load_word(const float* at, float (&v)[kPerWord]) {
  if constexpr (kPerWord == 2) {
    const float2 pair = *reinterpret_cast<const float2*>(at);
    v[0] = pair.x;
    v[1] = pair.y;
  } else {
    v[0] = *at;
  }
}

// Calls f(m, ky, v) for each row m < kStripRows of the strip at `centre` and each kernel row ky, for the taps of
// kernel column kx at dilation d: v holds the kPerWord staged values the tap (ky, kx) reads for row m. For kD > 0
// (kD == d) the window of kStripRows + (kK - 1) kD staged rows is read once, each row applied to every (m, ky)
// that reads it; for kD == 0 every (m, ky) reads its own.
template <int kPerWord, int kK, int kD, typename F>
__device__ __forceinline__ void for_each_column_tap(const float* tile, const Tiling& t, int centre, int kx, int d,
                                                    F&& f) {
  constexpr int r = (kK - 1) / 2;
  const int row_floats = t.span_w() * t.channels;
  const float* top = tile + centre + (kx - r) * d * t.channels - r * d * row_floats;  // tap (0, kx) of row 0
  if constexpr (kD > 0) {
#pragma unroll
    for (int w = 0; w < kStripRows + (kK - 1) * kD; ++w) {
      float v[kPerWord];
      load_word(top + w * row_floats, v);
#pragma unroll
      for (int ky = 0; ky < kK; ++ky) {
        const int m = w - ky * kD;
        if (m >= 0 && m < kStripRows) f(m, ky, v);
      }
    }
  } else {
#pragma unroll
    for (int ky = 0; ky < kK; ++ky) {
#pragma unroll
      for (int m = 0; m < kStripRows; ++m) {
        float v[kPerWord];
        load_word(top + (m + ky * d) * row_floats, v);
        f(m, ky, v);
      }
    }
  }
}

// Calls f(std::integral_constant<int, D>{}) with D = d for the dilations 1 and 2 (their windows compiled), else
// with D = 0.
template <typename F>
__device__ __forceinline__ void dilation_switch(int d, F&& f) {
  switch (d) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 0>{}); break;
  }
}

// conv_kernel: out = bias + sum_i sum_{ky,kx} weight[i, c, ky, kx] * x[y + s (ky - r) d_i, x + s (kx - r) d_i]
// with s = 1, or s = -1 when `flip` (grad_x from grad_out: p.x = grad_out, p.out = grad_x, no bias).
// Shared memory: the tile, then the block's weights as float [dilation][tap][channel] (taps reversed when
// flip, which turns s = -1 into s = 1).
template <typename T, int kK>
__global__ void __launch_bounds__(kThreads, conv_blocks_per_sm(kK))
    conv_kernel(const DwConvParams p, const Tiling t, const bool flip) {
  constexpr int kPerWord = kWordChannels<T>, kTaps = kK * kK;
  extern __shared__ float smem[];
  const Block blk = make_block(p, t);
  float* tile = smem;
  float* weights = smem + t.tile_bytes() / 4;
  // Weight items in the order of p.weight (taps fastest: the block's channels are one contiguous run of it): its
  // value, and where it goes in `weights`.
  const int n_weights = static_cast<int>(p.n_dilations) * kTaps * t.channels;
  const auto weight_value = [&](int item) {
    const int src_tap = item % kTaps, c = item / kTaps % t.channels, i = item / kTaps / t.channels;
    const int64_t ch = blk.c0 + c;
    return ch < p.channels ? to_float(static_cast<const T*>(p.weight)[(i * p.channels + ch) * kTaps + src_tap]) : 0.f;
  };
  const auto weight_slot = [&](int item) {
    const int src_tap = item % kTaps, c = item / kTaps % t.channels, i = item / kTaps / t.channels;
    const int tap = flip ? kTaps - 1 - src_tap : src_tap;
    return (i * kTaps + tap) * t.channels + c;
  };
  // The bias and a thread's first kEarlyWeights weights (all of them at k = 3) are loaded before the tile is
  // staged, so that they wait on memory together with the tile, not one round trip each after it.
  float early[kEarlyWeights];
#pragma unroll
  for (int j = 0; j < kEarlyWeights; ++j) {
    const int item = static_cast<int>(threadIdx.x) + j * kThreads;
    early[j] = item < n_weights ? weight_value(item) : 0.f;
  }
  const int word = static_cast<int>(threadIdx.x) % t.words;
  float bias[kPerWord];
#pragma unroll
  for (int c = 0; c < kPerWord; ++c) {
    const int64_t ch = blk.c0 + word * kPerWord + c;
    bias[c] = p.bias != nullptr && ch < p.channels ? to_float(static_cast<const T*>(p.bias)[ch]) : 0.f;
  }
  stage_tile<T>(tile, p.x, p.x_strides, p, t, blk);
#pragma unroll
  for (int j = 0; j < kEarlyWeights; ++j) {
    const int item = static_cast<int>(threadIdx.x) + j * kThreads;
    if (item < n_weights) weights[weight_slot(item)] = early[j];
  }
  for (int item = threadIdx.x + kEarlyWeights * kThreads; item < n_weights; item += kThreads) {
    weights[weight_slot(item)] = weight_value(item);
  }
  __syncthreads();

#pragma unroll 1
  for (int n = 0; n < kStrips; ++n) {
    const Strip s = make_strip<kPerWord>(t, blk, word, n);
    if (!s.live) break;
    float acc[kStripRows][kPerWord];
#pragma unroll
    for (int m = 0; m < kStripRows; ++m) {
#pragma unroll
      for (int c = 0; c < kPerWord; ++c) acc[m][c] = bias[c];
    }
    for (int64_t i = 0; i < p.n_dilations; ++i) {
      const int d = static_cast<int>(p.dilations[i]);
      const float* w_i = weights + i * kTaps * t.channels + word * kPerWord;  // [tap][channel] of the word
      dilation_switch(d, [&](auto dilation) {
#pragma unroll
        for (int kx = 0; kx < kK; ++kx) {
          float w[kK][kPerWord];
#pragma unroll
          for (int ky = 0; ky < kK; ++ky) load_word(w_i + (ky * kK + kx) * t.channels, w[ky]);
          for_each_column_tap<kPerWord, kK, decltype(dilation)::value>(
              tile, t, s.centre, kx, d, [&](int m, int ky, const float (&v)[kPerWord]) {
#pragma unroll
                for (int c = 0; c < kPerWord; ++c) acc[m][c] += w[ky][c] * v[c];
              });
        }
      });
    }
    const WordAt at = word_at<T>(p, blk, word, s, p.out, p.out_strides);
#pragma unroll
    for (int m = 0; m < kStripRows; ++m) {
      if (s.row + m < blk.th) store_row<T>(at, m, p.out, p.out_strides, acc[m]);
    }
  }
}

// Sums v[n] over the threads of the block that share threadIdx.x % words (a power of 2 up to 32), in a fixed
// order. Thread w * kN + n, for w < words, gets the sum of value n of channel word w in `result`. Every thread must
// call it; `scratch` holds kWarps * 32 * kN floats.
// Within a warp the sums are reduced and scattered: at each xor distance from 16 down to `words`, of the h values a
// lane holds the lower lane of a pair keeps the first ceil(h / 2), the upper one the others, each adding its
// partner's copy of those: ceil(h / 2) shuffles, where a plain butterfly takes h. A lane that is down to one value
// adds its partner's. Then one lane per held sum writes it, and the warps' sums are added in warp order.
template <int kN>
__device__ __forceinline__ bool reduce_over_pixels(float (&v)[kN], int words, float* scratch, float& result) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  float held[kN];  // values first.. first + count - 1 of v, summed over the lanes reduced so far
#pragma unroll
  for (int n = 0; n < kN; ++n) held[n] = v[n];
  int first = 0, count = kN;
  bool writer = true;  // false on all but one of the lanes that hold the same sums
  int h = kN;          // the most values a lane holds at this distance (a constant once the loop is unrolled)
#pragma unroll
  for (int distance = 16; distance > 0; distance /= 2) {
    if (distance < words) break;
    const bool upper = (lane & distance) != 0;
    if (h > 1) {
      const int kept = (h + 1) / 2;  // the lower lane's share; the upper one keeps count - kept
#pragma unroll
      for (int j = 0; j < kept; ++j) {
        const float other = j + kept < h ? held[j + kept] : 0.f;
        const float give = upper ? held[j] : other, keep = upper ? other : held[j];
        held[j] = keep + __shfl_xor_sync(0xffffffffu, give, distance);
      }
      first += upper ? kept : 0;
      count = upper ? count - kept : min(count, kept);
      h = kept;
    } else {
      held[0] += __shfl_xor_sync(0xffffffffu, held[0], distance);
      writer = writer && !upper;
    }
  }
  if (writer) {
    float* row = scratch + (warp * words + (lane & (words - 1))) * kN;
#pragma unroll
    for (int j = 0; j < kN; ++j) {
      if (j < count) row[first + j] = held[j];
    }
  }
  __syncthreads();
  const bool owner = static_cast<int>(threadIdx.x) < words * kN;
  if (owner) {
    const int w = threadIdx.x / kN, n = threadIdx.x % kN;
    result = 0.f;
    for (int wp = 0; wp < kWarps; ++wp) result += scratch[(wp * words + w) * kN + n];
  }
  __syncthreads();  // scratch is reused by the next call
  return owner;
}

// Writes one row of `partials` per (b, tile) for the block's channels: p.x is x, its tile staged with the halo.
template <typename T, int kK>
__global__ void __launch_bounds__(kThreads, weight_grad_blocks_per_sm(kK))
    weight_grad_kernel(const DwConvBwdParams bp, const Tiling t, float* partials) {
  constexpr int kPerWord = kWordChannels<T>, kTaps = kK * kK;
  extern __shared__ float smem[];
  __shared__ float scratch[weight_grad_static_smem(kK) / sizeof(float)];
  const DwConvParams& p = bp.fwd;
  const Block blk = make_block(p, t);
  stage_tile<T>(smem, p.x, p.x_strides, p, t, blk);
  const int word = static_cast<int>(threadIdx.x) % t.words;
  Strip strips[kStrips];
  float g[kStrips][kStripRows][kPerWord];  // grad_out at the strips' pixels, 0 outside the tile
#pragma unroll
  for (int n = 0; n < kStrips; ++n) {
    strips[n] = make_strip<kPerWord>(t, blk, word, n);
    const WordAt at = word_at<T>(p, blk, word, strips[n], bp.grad_out, bp.grad_out_strides);
#pragma unroll
    for (int m = 0; m < kStripRows; ++m) {
      if (strips[n].live && strips[n].row + m < blk.th) {
        load_row<T>(at, m, bp.grad_out, bp.grad_out_strides, g[n][m]);
      } else {
#pragma unroll
        for (int c = 0; c < kPerWord; ++c) g[n][m][c] = 0.f;
      }
    }
  }
  __syncthreads();

  float* row = partials + ((blk.b * t.tiles_y + blk.tile_y) * t.tiles_x + blk.tile_x) * partial_row(p);
  const int64_t bias_base = p.n_dilations * p.channels * kTaps;
  {
    float sums[kPerWord];
#pragma unroll
    for (int c = 0; c < kPerWord; ++c) {
      sums[c] = 0.f;
#pragma unroll
      for (int n = 0; n < kStrips; ++n) {
#pragma unroll
        for (int m = 0; m < kStripRows; ++m) sums[c] += g[n][m][c];
      }
    }
    float result;
    if (reduce_over_pixels(sums, t.words, scratch, result)) {
      const int64_t ch = blk.c0 + static_cast<int64_t>(threadIdx.x);  // word w, channel c: w * kPerWord + c
      if (ch < p.channels) row[bias_base + ch] = result;
    }
  }
  for (int64_t i = 0; i < p.n_dilations; ++i) {
    const int d = static_cast<int>(p.dilations[i]);
    dilation_switch(d, [&](auto dilation) {
#pragma unroll 1
      for (int kx = 0; kx < kK; ++kx) {
        float sums[kK * kPerWord];  // [ky][channel]
#pragma unroll
        for (int n = 0; n < kK * kPerWord; ++n) sums[n] = 0.f;
#pragma unroll
        for (int n = 0; n < kStrips; ++n) {
          if (!strips[n].live) break;
          for_each_column_tap<kPerWord, kK, decltype(dilation)::value>(
              smem, t, strips[n].centre, kx, d, [&](int m, int ky, const float (&v)[kPerWord]) {
#pragma unroll
                for (int c = 0; c < kPerWord; ++c) sums[ky * kPerWord + c] += g[n][m][c] * v[c];
              });
        }
        float result;
        if (reduce_over_pixels(sums, t.words, scratch, result)) {
          const int w = threadIdx.x / (kK * kPerWord), n = threadIdx.x % (kK * kPerWord);
          const int ky = n / kPerWord, c = n % kPerWord;
          const int64_t ch = blk.c0 + w * kPerWord + c;
          if (ch < p.channels) row[(i * p.channels + ch) * kTaps + ky * kK + kx] = result;
        }
      }
    });
  }
}

// grad_weight and grad_bias: the sums of the partial rows (at b2 stage 1, channels_last, batch 128: 2048 rows
// of 1824 outputs).
template <typename T>
__global__ void __launch_bounds__(kThreads) reduce_partials_kernel(const DwConvBwdParams bp, const float* partials,
                                                                 int64_t rows) {
  const DwConvParams& p = bp.fwd;
  const int64_t row_len = partial_row(p), n_weights = row_len - p.channels;
  ordered_column_sums<float, kWarps>(partials, rows, row_len, [&](int64_t o, float sum) {
    if (o < n_weights) {
      static_cast<T*>(bp.grad_weight)[o] = from_float<T>(sum);
    } else if (bp.grad_bias != nullptr) {
      static_cast<T*>(bp.grad_bias)[o - n_weights] = from_float<T>(sum);
    }
  });
}

// Direct path: thread per output element, taps read from global memory (zero padding), flipped when `flip`.
// Elements go in the order of the input's layout (channels fastest for channels_last, else columns), so that
// each tap of a warp is one coalesced read of the input (the scattered reads are of the weights, a few KiB,
// expected to stay in L1; not measured on a GPU).
template <typename T>
__global__ void __launch_bounds__(kThreads) direct_conv_kernel(const DwConvParams p, const bool flip) {
  const int64_t k = p.kernel_size, r = (k - 1) / 2, sign = flip ? -1 : 1;
  const int64_t total = p.batch * p.channels * p.height * p.width;
  const T* x = static_cast<const T*>(p.x);
  const T* weight = static_cast<const T*>(p.weight);
  const bool channels_last = is_channels_last(p, p.x_strides);
  for (int64_t e = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    int64_t b, c, row, col;
    if (channels_last) {
      c = e % p.channels, col = e / p.channels % p.width, row = e / p.channels / p.width % p.height;
      b = e / p.channels / p.width / p.height;
    } else {
      col = e % p.width, row = e / p.width % p.height, c = e / p.width / p.height % p.channels;
      b = e / p.width / p.height / p.channels;
    }
    float acc = p.bias != nullptr ? to_float(static_cast<const T*>(p.bias)[c]) : 0.f;
    for (int64_t i = 0; i < p.n_dilations; ++i) {
      for (int64_t ky = 0; ky < k; ++ky) {
        const int64_t y = row + sign * (ky - r) * p.dilations[i];
        if (y < 0 || y >= p.height) continue;
        for (int64_t kx = 0; kx < k; ++kx) {
          const int64_t xx = col + sign * (kx - r) * p.dilations[i];
          if (xx < 0 || xx >= p.width) continue;
          const float v = to_float(x[b * p.x_strides[0] + c * p.x_strides[1] + y * p.x_strides[2] + xx * p.x_strides[3]]);
          acc += to_float(weight[((i * p.channels + c) * k + ky) * k + kx]) * v;
        }
      }
    }
    static_cast<T*>(p.out)[b * p.out_strides[0] + c * p.out_strides[1] + row * p.out_strides[2] + col * p.out_strides[3]] =
        from_float<T>(acc);
  }
}

// Direct path: a block per (dilation, tap, group of `lanes` channels) of grad_weight, then per group of grad_bias,
// each summing over (b, y, x) in a fixed order: thread t takes channel t % lanes of the group and every
// (kThreads / lanes)-th pixel from t / lanes, then a tree over those slices. 32 lanes when x is channels_last
// (a warp reads 32 neighbouring channels of a pixel), else 1 (the block reads along rows).
__host__ __device__ inline int direct_lanes(const DwConvParams& p) { return is_channels_last(p, p.x_strides) ? 32 : 1; }

inline int64_t direct_weight_grad_blocks(const DwConvParams& p) {
  return (p.n_dilations * p.kernel_size * p.kernel_size + 1) * ceil_div(p.channels, direct_lanes(p));
}

template <typename T>
__global__ void __launch_bounds__(kThreads) direct_weight_grad_kernel(const DwConvBwdParams bp) {
  __shared__ float scratch[kThreads];
  const DwConvParams& p = bp.fwd;
  const int lanes = direct_lanes(p), slices = kThreads / lanes, slice = threadIdx.x / lanes;
  const int64_t k = p.kernel_size, r = (k - 1) / 2, taps = k * k, groups = ceil_div(p.channels, lanes);
  const int64_t item = blockIdx.x / groups, c = blockIdx.x % groups * lanes + threadIdx.x % lanes;
  const bool is_bias = item == p.n_dilations * taps;  // else item = i * taps + tap
  const int64_t i = is_bias ? 0 : item / taps, tap = item % taps;
  const int64_t dy = is_bias ? 0 : (tap / k - r) * p.dilations[i], dx = is_bias ? 0 : (tap % k - r) * p.dilations[i];
  const T* x = static_cast<const T*>(p.x);
  const T* grad = static_cast<const T*>(bp.grad_out);
  const int64_t *xs = p.x_strides, *gs = bp.grad_out_strides;
  const int64_t plane = p.height * p.width;
  float sum = 0.f;
  for (int64_t e = slice; c < p.channels && e < p.batch * plane; e += slices) {
    const int64_t b = e / plane, row = e % plane / p.width, col = e % p.width;
    const float g = to_float(grad[b * gs[0] + c * gs[1] + row * gs[2] + col * gs[3]]);
    if (is_bias) {
      sum += g;
      continue;
    }
    const int64_t y = row + dy, xx = col + dx;
    if (y >= 0 && y < p.height && xx >= 0 && xx < p.width) {
      sum += g * to_float(x[b * xs[0] + c * xs[1] + y * xs[2] + xx * xs[3]]);
    }
  }
  scratch[threadIdx.x] = sum;
  __syncthreads();
  for (int half = slices / 2; half > 0; half /= 2) {
    if (slice < half) scratch[threadIdx.x] += scratch[threadIdx.x + half * lanes];
    __syncthreads();
  }
  if (slice != 0 || c >= p.channels) return;
  if (!is_bias) {
    static_cast<T*>(bp.grad_weight)[(i * p.channels + c) * taps + tap] = from_float<T>(scratch[threadIdx.x]);
  } else if (bp.grad_bias != nullptr) {
    static_cast<T*>(bp.grad_bias)[c] = from_float<T>(scratch[threadIdx.x]);
  }
}

// Calls f(std::integral_constant<int, k>{}) for the kernel size k in {3, 5, 7} (checked by the arguments).
template <typename F>
void kernel_size_switch(int64_t k, F&& f) {
  switch (k) {
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    default: f(std::integral_constant<int, 7>{}); break;
  }
}

inline unsigned stride_grid(int64_t work) { return grid_stride_blocks(ceil_div(work, kThreads), 16); }

// out = conv(x) (flip = false) or grad_x = conv^T(grad_out) (flip = true, p.x = grad_out, p.bias = nullptr).
template <typename T>
void launch_conv(const DwConvParams& p, bool flip, cudaStream_t stream) {
  const Tiling t = plan(p, p.x_strides, sizeof(T), max_block_smem());
  if (!t.staged) {
    direct_conv_kernel<T><<<stride_grid(p.batch * p.channels * p.height * p.width), kThreads, 0, stream>>>(p, flip);
    check_launch("multi_dilation_dwconv2d (direct)");
    return;
  }
  const size_t smem = t.tile_bytes() + t.weight_bytes(p);
  const unsigned grid = grid_size(t.blocks(p.batch), "multi_dilation_dwconv2d");
  kernel_size_switch(p.kernel_size, [&](auto k) {
    allow_dynamic_smem(conv_kernel<T, decltype(k)::value>, smem, 0);
    conv_kernel<T, decltype(k)::value><<<grid, kThreads, smem, stream>>>(p, t, flip);
  });
  check_launch("multi_dilation_dwconv2d");
}

// grad_weight and grad_bias; `workspace` holds the partial rows (weight_grad_workspace_bytes).
template <typename T>
void launch_weight_grad(const DwConvBwdParams& bp, cudaStream_t stream) {
  const DwConvParams& p = bp.fwd;
  const Tiling t = plan(p, p.x_strides, sizeof(T), max_block_smem());
  if (!t.staged) {
    const unsigned grid = grid_size(direct_weight_grad_blocks(p), "multi_dilation_dwconv2d_backward");
    direct_weight_grad_kernel<T><<<grid, kThreads, 0, stream>>>(bp);
    check_launch("multi_dilation_dwconv2d_backward (direct weight gradient)");
    return;
  }
  auto* partials = static_cast<float*>(bp.workspace);
  const size_t smem = t.tile_bytes();
  const unsigned grid = grid_size(t.blocks(p.batch), "multi_dilation_dwconv2d_backward");
  kernel_size_switch(p.kernel_size, [&](auto k) {
    allow_dynamic_smem(weight_grad_kernel<T, decltype(k)::value>, smem, weight_grad_static_smem(k));
    weight_grad_kernel<T, decltype(k)::value><<<grid, kThreads, smem, stream>>>(bp, t, partials);
  });
  check_launch("multi_dilation_dwconv2d_backward (weight gradient)");
  reduce_partials_kernel<T><<<column_sums_grid(partial_row(p)), kThreads, 0, stream>>>(bp, partials, n_partials(p, t));
  check_launch("multi_dilation_dwconv2d_backward (weight gradient sums)");
}

// Bytes of DwConvBwdParams::workspace: the partial rows of the staged weight gradient, planned for the current
// device like launch_weight_grad.
inline size_t weight_grad_workspace_bytes(const DwConvParams& p, int elem_size) {
  const Tiling t = plan(p, p.x_strides, elem_size, max_block_smem());
  return t.staged ? static_cast<size_t>(n_partials(p, t) * partial_row(p)) * 4 : 0;
}

}  // namespace mamba_adaptor::cuda::dwconv
