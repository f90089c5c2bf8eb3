// state_gather (Adaptor-T) CUDA kernels, instantiated per direction and dtype in state_gather_{fwd,bwd}_*.cu.
// Shapes: h, out, grad_out, grad_h (b, S, D, L) contiguous; offsets, weights (b, S, K, L) with any strides;
// grad_offsets, grad_weights (b, S, K, L) contiguous. Sample k of position t reads h at p = t + offsets[k, t],
// interpolated between lo = floor(p) and lo + 1 (the math is in state_gather.h).
//
// Staging: a block works on kRows rows (channels d) of one (b, s), kRows * sizeof(T) = 32 bytes, and copies a
// window of positions of those rows into shared memory transposed, [position][row], so that one position of
// all its rows is two 16-byte loads (a thread stages 16 or 8 bytes of a row per load where the rows' alignment
// allows, one element otherwise: staging_load_bytes). The window is the whole row when it fits (every sample then
// reads shared memory), else a tile with a halo on each side; samples outside the window read global memory. The
// window size follows the device's shared memory per block (row_tiling).
//
// Forward: block (b, s, row chunk, tile) stages h; thread per position t: residual + K samples, kRows rows. Short
// rows with K <= kPointGroup: a block stages a run of row chunks, and a position's samples serve all of them.
// Backward, with no float atomics, so it is bit-identical across runs whatever `deterministic` says:
//   1. buckets_kernel, block per (b, s): the samples that touch a target (lo in [-1, L-1]) sorted by lo with
//      a counting sort whose order is fixed (per-warp counts, an ordered scan, each warp filling its own
//      slots in sample order): workspace entries (t, c0, c1) and bucket starts. Shared by all D channels.
//   2. grad_h_kernel, block (b, s, row chunk, tile) staging grad_out; target i gets grad_out[i] if residual,
//      + c1 * grad_out[t] over bucket lo = i - 1, + c0 * grad_out[t] over bucket lo = i: a lane sums one bucket
//      for both targets it reaches and passes the c0 sum to its neighbour (runs of 31 targets per warp). Short
//      rows: a block stages a run of row chunks, and loads a run's buckets once for all of them.
//   3. grad_points_kernel, block (b, s, tile of kThreads positions) looping over every row chunk, staging h
//      with a halo; thread per position t sums over D in a fixed order: grad_weights and grad_offsets.
// Index arithmetic: positions are int (L <= 2^24, checked at registration); row and element offsets int64.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common.cuh"
#include "state_gather.h"

namespace mamba_adaptor::cuda::state_gather {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kPositionBytes = 32;           // staged bytes per position: kRows rows of T
constexpr int kMaxWindow = 3584;             // positions: 112 KiB of shared memory (two blocks per SM on sm_90)
constexpr int kHalo = 768;                   // rows longer than the window: tiles with this halo each side
constexpr int kPointsTile = kThreads;        // grad_points_kernel: one position per thread ...
constexpr int kPointsHalo = 128;             // ... and this halo each side
constexpr int kPointGroup = 4;               // points k loaded together (SegmentPoints::load_group)
constexpr int kBucketSteps = 4;              // buckets_kernel: steps of 32 samples per warp loaded together
constexpr int kCursorSmem = 112 * 1024;      // buckets_kernel keeps its per-warp cursors in shared memory up to this
constexpr size_t kBucketsStaticSmem = kWarps * sizeof(int);  // buckets_kernel's static shared memory (scan scratch)

template <typename T>
struct Staged {
  static constexpr int kRows = kPositionBytes / static_cast<int>(sizeof(T));  // 8 for float, 16 for 16-bit
  static constexpr int kRowsPerWord = 4 / static_cast<int>(sizeof(T));        // rows in a staged 32-bit word
};

// Tiles of `tile` positions along L, each staged with `halo` positions on each side.
struct Tiling {
  int tile, halo, n_tiles;
};

// The tiling of fwd_kernel and grad_h_kernel on a device with `block_smem` bytes of shared memory per block.
// The window is kMaxWindow positions, or the most multiple of 8 that fits where that is fewer: the whole row
// when L fits, else a tile and a halo of kHalo each side (a quarter of the window where that is less),
// tile + 2 * halo == window. Tiles, halos and so window starts are multiples of 8 positions (staging_load_bytes).
// sm_80, sm_90: windows of 3584 positions (112 KiB), tiles of 2048; sm_86, sm_89, sm_120: 3168 (99 KiB), 1632.
inline int window_positions(size_t block_smem) {
  return static_cast<int>(std::min<size_t>(kMaxWindow, block_smem / kPositionBytes / 8 * 8));
}

inline Tiling row_tiling(int64_t L, size_t block_smem) {
  const int window = window_positions(block_smem);
  if (L <= window) return {static_cast<int>(L), 0, 1};
  const int halo = std::min(kHalo, window / 4 / 8 * 8), tile = window - 2 * halo;
  return {tile, halo, static_cast<int>(ceil_div(L, tile))};
}

inline Tiling points_tiling(int64_t L) { return {kPointsTile, kPointsHalo, static_cast<int>(ceil_div(L, kPointsTile))}; }

inline size_t window_bytes(const Tiling& tiling, int64_t L) {
  return static_cast<size_t>(std::min<int64_t>(L, tiling.tile + 2 * tiling.halo)) * kPositionBytes;
}

// The bytes per load with which stage_window reads rows of `data` (rows of L elements): 16 or 8 where the data's
// address and every row start are aligned to them (windows start at multiples of 8 positions: tiles and halos
// are), else one element. b2 stage 1 (L = 3136): 16; stage 3 (L = 196): 16 for float32, 8 for 16-bit types.
template <typename T>
int staging_load_bytes(const void* data, int64_t L) {
  const auto address = reinterpret_cast<uintptr_t>(data);
  for (const int bytes : {16, 8}) {
    if (address % bytes == 0 && L * static_cast<int64_t>(sizeof(T)) % bytes == 0) return bytes;
  }
  return static_cast<int>(sizeof(T));
}

// The workspace of the backward: per (b, s), the bucket entries and starts (and the per-warp cursors when
// they do not fit in shared memory: more than kCursorSmem, or than the device's `block_smem` bytes per block
// with buckets_kernel's static shared memory). Offsets in bytes, each 256-byte aligned.
struct BucketLayout {
  int64_t entry_t, entry_c, starts, cursors, total;
  bool cursors_in_smem;
};

inline BucketLayout bucket_layout(const StateGatherParams& p, size_t block_smem) {
  const auto align = [](int64_t bytes) { return (bytes + 255) / 256 * 256; };
  const int64_t segments = p.batch * p.n_seq, entries = p.n_points * p.seqlen, buckets = p.seqlen + 1;
  BucketLayout layout{};
  const int64_t cursor_bytes = kWarps * buckets * 4;
  layout.cursors_in_smem = cursor_bytes <= kCursorSmem && kBucketsStaticSmem + cursor_bytes <= block_smem;
  layout.entry_t = 0;
  layout.entry_c = align(segments * entries * 4);
  layout.starts = layout.entry_c + align(segments * entries * 8);
  layout.cursors = layout.starts + align(segments * (buckets + 1) * 4);
  layout.total = layout.cursors + (layout.cursors_in_smem ? 0 : align(segments * kWarps * buckets * 4));
  return layout;
}

// One sample: neighbours lo and lo + 1 of p = t + offset, each valid inside [0, L-1]; the forward adds
// c0 * h[lo] + c1 * h[lo + 1]. A non-finite p makes frac, c0 and c1 NaN and both neighbours invalid, so it
// is never used as an index and the output is NaN (NaN * 0).
struct Sample {
  int lo;  // an index only where ok0 or ok1
  bool ok0, ok1;
  float frac, weight, c0, c1;
};

__device__ __forceinline__ Sample make_sample(int t, float offset, float weight, int L) {
  const float p = static_cast<float>(t) + offset;
  const float lo = floorf(p);
  Sample s;
  s.frac = p - lo;
  s.weight = weight;
  s.c0 = weight * (1.f - s.frac);
  s.c1 = weight * s.frac;
  // Comparisons are false for NaN; L - 1 and L - 2 are exact in float32 since L <= 2^24.
  s.ok0 = lo >= 0.f && lo <= static_cast<float>(L - 1);
  s.ok1 = lo >= -1.f && lo <= static_cast<float>(L - 2);
  s.lo = s.ok0 || s.ok1 ? static_cast<int>(lo) : 0;
  return s;
}

// The offsets and weights of kPointGroup consecutive points k of one position, as loaded.
struct PointGroup {
  float offset[kPointGroup], weight[kPointGroup];
};

// The offsets and weights (K, L) of one segment (b, s), read in place with their strides (expanded weights too).
template <typename T>
struct SegmentPoints {
  const T *offsets, *weights;
  const int64_t *os, *ws;  // strides over (b, S, K, L)
  int L;

  __device__ __forceinline__ SegmentPoints(const StateGatherParams& p, int64_t segment)
      : os(p.offsets_strides), ws(p.weights_strides), L(static_cast<int>(p.seqlen)) {
    const int64_t b = segment / p.n_seq, s = segment % p.n_seq;
    offsets = static_cast<const T*>(p.offsets) + b * os[0] + s * os[1];
    weights = static_cast<const T*>(p.weights) + b * ws[0] + s * ws[1];
  }

  // Point k of position t: (offset, weight).
  __device__ __forceinline__ float2 point(int64_t k, int t) const {
    return make_float2(to_float(offsets[k * os[2] + t * os[3]]), to_float(weights[k * ws[2] + t * ws[3]]));
  }

  // Points k0 .. k0 + kPointGroup - 1 of position t; 0 for points past n_points, and for all where !active. The
  // 2 * kPointGroup loads are in flight together; their addresses step one pointer per tensor by its K stride.
  __device__ __forceinline__ PointGroup load_group(int64_t n_points, int64_t k0, int t, bool active) const {
    const int64_t o_step = os[2], w_step = ws[2];
    const T* o = offsets + k0 * o_step + t * os[3];
    const T* w = weights + k0 * w_step + t * ws[3];
    const int64_t left = n_points - k0;
    const int live = !active ? 0 : left < kPointGroup ? static_cast<int>(left) : kPointGroup;  // points to load
    PointGroup g;
#pragma unroll
    for (int j = 0; j < kPointGroup; ++j, o += o_step, w += w_step) {
      g.offset[j] = j < live ? to_float(*o) : 0.f;
      g.weight[j] = j < live ? to_float(*w) : 0.f;
    }
    return g;
  }

  // The samples of a group loaded by load_group(n_points, k0, t, active): empty (weight 0 at position 0) for
  // points past n_points, and for all where !active.
  __device__ __forceinline__ void samples(const PointGroup& g, Sample (&smp)[kPointGroup], int64_t n_points,
                                          int64_t k0, int t, bool active) const {
#pragma unroll
    for (int j = 0; j < kPointGroup; ++j) {
      smp[j] = make_sample(active && k0 + j < n_points ? t : 0, g.offset[j], g.weight[j], L);
    }
  }
};

// Block decomposition shared by the kernels: a (b, s) segment, a chunk of rows in it, a tile of positions.
struct Block {
  int64_t segment;  // b * S + s
  int64_t row0;     // first row (b, s, d) of the chunk, in units of rows of L
  int n_rows;       // rows of the chunk that exist (the last chunk of D may be short)
  int t0, t1;       // the tile: positions t0 <= t < t1
  int w0, w1;       // the staged window: positions w0 <= i < w1, a superset of the tile
};

__device__ __forceinline__ Block make_block(int64_t segment, int64_t chunk, int tile, const StateGatherParams& p,
                                            const Tiling& tiling, int rows_per_chunk) {
  const int L = static_cast<int>(p.seqlen);
  Block blk;
  blk.segment = segment;
  blk.row0 = segment * p.dim + chunk * rows_per_chunk;
  const int64_t rows_left = p.dim - chunk * rows_per_chunk;
  blk.n_rows = rows_left < rows_per_chunk ? static_cast<int>(rows_left) : rows_per_chunk;
  blk.t0 = tile * tiling.tile;
  blk.t1 = min(L, blk.t0 + tiling.tile);
  blk.w0 = max(0, blk.t0 - tiling.halo);
  blk.w1 = min(L, blk.t1 + tiling.halo);
  return blk;
}

// The window is an array of 32-bit words: staged position i (relative to the window start) holds its kRows rows
// in 8 words, word g rows kRowsPerWord * g .. kRowsPerWord * (g + 1) - 1 (the lower row in the lower bits), as two
// 16-byte halves of 4 words that swap places where i & 4. A warp reading one half of each lane's position
// (read_staged) then finds 8 consecutive positions in 8 different bank quads (16-byte chunk 2i + ((i >> 2) & 1)
// mod 8 takes every value): no conflict for nearby positions.
__device__ __forceinline__ int window_word(int i, int g) { return 8 * i + (g ^ (i & 4)); }

// Copies positions [w0, w1) of rows [0, n_rows) of the row-major (rows, L) array `src` into `window` (laid out as
// window_word says, relative to w0), V positions of a row per load; rows n_rows..kRows-1 read 0. w0 and w1 - w0
// are multiples of V, and so is L where V > 1. Thread (g, c) stages word g of V positions at a time: it loads them
// from its kRowsPerWord rows (16 or 8 bytes each, a warp's 8 threads of one chunk reading all kRows), pairs the rows
// of each position into one word (16-bit types) and stores the V words. A store of a warp's 4 chunks takes up to
// 4 passes of shared memory (positions 8 apart share their banks), but it is one instruction, where rotating the
// words into distinct banks would take several.
template <typename T, int V>
__device__ __forceinline__ void stage_words(uint32_t* window, const T* src, int64_t L, int n_rows, int w0, int w1) {
  constexpr int P = Staged<T>::kRowsPerWord;
  const int g = static_cast<int>(threadIdx.x) % 8;
  const T* first = src + int64_t{P} * g * L + w0;  // row P * g at position w0
  bool has[P];
#pragma unroll
  for (int q = 0; q < P; ++q) has[q] = P * g + q < n_rows;
  const int chunks = (w1 - w0) / V;
  // A row's V positions as Items: whole words (one 16-bit position fills the low half of its word).
  constexpr int kW = V > P ? V : P;
  // Steps unrolled: 64 bytes of loads in flight per thread (2 steps of 16-byte loads of 16-bit rows: 4 would spill
  // in grad_points_kernel), at most 4 steps.
  constexpr int kUnroll = std::min(4, std::max(1, 64 / (P * V * static_cast<int>(sizeof(T)))));
#pragma unroll kUnroll
  for (int c = static_cast<int>(threadIdx.x) / 8; c < chunks; c += kThreads / 8) {
    Items<T, kW> rows[P];
#pragma unroll
    for (int q = 0; q < P; ++q) rows[q] = has[q] ? load_chunk<V, kW>(first + q * L + c * V, 1, V) : Items<T, kW>{};
    // window_word(c * V + j, g) is at + 8 j: bit 2 of position c * V + j is c * V's for j < 4 (V <= 4 divides
    // c * V), 1 for j >= 4 (V = 8: c * V is a multiple of 8), where the halves swap.
    const int at = window_word(c * V, g);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      uint32_t word;
      if constexpr (P == 1) {
        word = rows[0].w[j];
      } else {  // position j of the two rows: the low halves of their word j / 2 where j is even, else the high
        word = __byte_perm(rows[0].w[j / 2], rows[1].w[j / 2], j % 2 ? 0x7632 : 0x5410);
      }
      window[(j < 4 ? at : at ^ 4) + 8 * j] = word;
    }
  }
}

// stage_words with V positions per load as staging_load_bytes(src, L) gave (`load_bytes`). Every thread of the
// block must call it.
template <typename T>
__device__ __forceinline__ void stage_window(uint32_t* window, const T* src, int64_t L, int n_rows, int w0, int w1,
                                             int load_bytes) {
  constexpr int kElement = static_cast<int>(sizeof(T));
  if (load_bytes == 16) {
    stage_words<T, 16 / kElement>(window, src, L, n_rows, w0, w1);
  } else if (load_bytes == 8) {
    stage_words<T, 8 / kElement>(window, src, L, n_rows, w0, w1);
  } else {
    stage_words<T, 1>(window, src, L, n_rows, w0, w1);
  }
}

// The kRows values of staged position i (relative to the window start).
template <typename T>
__device__ __forceinline__ void read_staged(const uint32_t* window, int i, float (&v)[Staged<T>::kRows]) {
  constexpr int kPerWord = 4 / sizeof(T);
  const int first = window_word(i, 0);  // words 0 .. 3; words 4 .. 7 are the other half, first ^ 4
  const uint4 lo = *reinterpret_cast<const uint4*>(window + first);
  const uint4 hi = *reinterpret_cast<const uint4*>(window + (first ^ 4));
  const uint32_t words[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
  for (int w = 0; w < 8; ++w) unpack_word(words[w], v + w * kPerWord, T{});
}

// The kRows values at position i of the chunk: 0 where !valid, from the window when staged, else from the
// global rows (row r at rows[r * L + i], rows n_rows.. read 0). kWholeRow: the window is the whole row, so every
// valid position is staged.
template <typename T, bool kWholeRow = false>
__device__ __forceinline__ void read_position(const uint32_t* window, const Block& blk,
                                              const T* rows, int64_t L, bool valid, int i,
                                              float (&v)[Staged<T>::kRows]) {
  constexpr int R = Staged<T>::kRows;
  if (valid && (kWholeRow || (i >= blk.w0 && i < blk.w1))) {
    read_staged<T>(window, i - blk.w0, v);
    return;
  }
#pragma unroll
  for (int r = 0; r < R; ++r) v[r] = !kWholeRow && valid && r < blk.n_rows ? to_float(rows[r * L + i]) : 0.f;
}

// The kRows values at a sample's two neighbours, lo (v0) and lo + 1 (v1); 0 where a neighbour is invalid.
template <typename T, bool kWholeRow = false>
__device__ __forceinline__ void read_neighbours(const uint32_t* window, const Block& blk,
                                                const T* rows, int64_t L, const Sample& smp,
                                                float (&v0)[Staged<T>::kRows], float (&v1)[Staged<T>::kRows]) {
  read_position<T, kWholeRow>(window, blk, rows, L, smp.ok0, smp.lo, v0);
  read_position<T, kWholeRow>(window, blk, rows, L, smp.ok1, smp.lo + 1, v1);
}

// Stores v[r] at position t of rows r < n_rows (row r at rows + r * L), one pointer step of L a row.
template <typename T>
__device__ __forceinline__ void store_rows(T* rows, int64_t L, int n_rows, int t, const float (&v)[Staged<T>::kRows]) {
  T* at = rows + t;
#pragma unroll
  for (int r = 0; r < Staged<T>::kRows; ++r, at += L) {
    if (r < n_rows) *at = from_float<T>(v[r]);
  }
}

// A block of fwd_kernel or grad_h_kernel (blocks segment-major, then a run of `per_block` row chunks, then tile):
// its first chunk (blk), how many chunks it has (`chunks`: per_block, fewer at the end of D) and their rows in
// `data`, the (b, S, D, L) array it stages (h or grad_out), chunk w's rows at rows + w * kRows * L.
template <typename T>
struct RowBlock {
  Block blk;
  int chunks;
  const T* rows;

  // Chunk w's block: its rows start w * kRows rows after the first chunk's; the window and tile are the same.
  __device__ __forceinline__ Block chunk(int w, const StateGatherParams& p) const {
    constexpr int R = Staged<T>::kRows;
    Block b = blk;
    b.row0 += int64_t{w} * R;
    const int64_t rows_left = p.dim - (b.row0 - b.segment * p.dim);
    b.n_rows = rows_left < R ? static_cast<int>(rows_left) : R;
    return b;
  }
};

template <typename T>
__device__ __forceinline__ RowBlock<T> row_block(const void* data, const StateGatherParams& p, const Tiling& tiling,
                                                 int per_block) {
  constexpr int R = Staged<T>::kRows;
  const int64_t n_chunks = (p.dim + R - 1) / R, runs = (n_chunks + per_block - 1) / per_block;
  const int64_t block = blockIdx.x;
  const int64_t first = block / tiling.n_tiles % runs * per_block;
  const Block blk = make_block(block / tiling.n_tiles / runs, first, static_cast<int>(block % tiling.n_tiles), p,
                               tiling, R);
  const int chunks = static_cast<int>(n_chunks - first < per_block ? n_chunks - first : per_block);
  return {blk, chunks, static_cast<const T*>(data) + blk.row0 * p.seqlen};
}

// The window words of one row chunk of a row block: the chunks' windows follow one another in shared memory.
__device__ __forceinline__ int chunk_window_words(const Block& blk) { return (blk.w1 - blk.w0) * kPositionBytes / 4; }

// Stages the windows of a row block's chunks, `load_bytes` a load (staging_load_bytes). Every thread of the block
// must call it.
template <typename T>
__device__ __forceinline__ void stage_row_block(uint32_t* window, const RowBlock<T>& rb, const StateGatherParams& p,
                                                int load_bytes) {
  for (int w = 0; w < rb.chunks; ++w) {
    stage_window<T>(window + w * chunk_window_words(rb.blk), rb.rows + int64_t{w} * Staged<T>::kRows * p.seqlen,
                    p.seqlen, rb.chunk(w, p).n_rows, rb.blk.w0, rb.blk.w1, load_bytes);
  }
  __syncthreads();
}

// Row chunks per block of fwd_kernel and grad_h_kernel where the window is the whole row: a block stages several
// row chunks of its segment, as many as the window holds and no fewer blocks than two per SM where the chunks
// allow, spread evenly; 1 for tiled rows. What depends on the position alone (the forward's samples, grad_h's
// bucket entries) is then loaded and worked out once for all of them.
template <typename T>
int whole_row_chunks_per_block(const StateGatherParams& p, const Tiling& tiling, size_t block_smem) {
  const int64_t n_chunks = ceil_div(p.dim, Staged<T>::kRows);
  if (tiling.n_tiles > 1 || p.seqlen == 0 || n_chunks <= 1) return 1;
  const int64_t fit = window_positions(block_smem) / p.seqlen;
  const int64_t spread = p.batch * p.n_seq * n_chunks / (2 * int64_t{sm_count()});
  const int64_t most = std::max<int64_t>(1, std::min(fit, spread));
  return static_cast<int>(ceil_div(n_chunks, ceil_div(n_chunks, most)));
}

// The forward's: several chunks only where a position's points are one group (K <= kPointGroup), whose samples
// stay in registers for all of them.
template <typename T>
int fwd_chunks_per_block(const StateGatherParams& p, const Tiling& tiling, size_t block_smem) {
  return p.n_points > kPointGroup ? 1 : whole_row_chunks_per_block<T>(p, tiling, block_smem);
}

// load_bytes: staging_load_bytes(p.h, L); per_block: fwd_chunks_per_block (1 unless kWholeRow). kWholeRow: the
// window is the whole row (tiling.n_tiles == 1), so no sample reads global memory, and a block may take several row
// chunks; without it (rows longer than the window), a block takes one chunk and its samples outside the window
// read global memory, code that is most of the kernel's SASS and that whole rows do without.
template <typename T, bool kWholeRow>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const StateGatherParams p, const Tiling tiling, int load_bytes,
                                                      int per_block) {
  constexpr int R = Staged<T>::kRows;
  extern __shared__ uint4 smem[];
  auto* window = reinterpret_cast<uint32_t*>(smem);
  const RowBlock<T> rb = row_block<T>(p.h, p, tiling, kWholeRow ? per_block : 1);
  const Block& blk = rb.blk;
  const int window_words = chunk_window_words(blk);

  const SegmentPoints<T> points(p, blk.segment);
  // Point groups are loaded one step ahead (the next group of this position, or the first of the thread's next
  // one): their samples' positions depend on them, so a group loaded where it is used would leave its position's
  // work waiting on memory. The first is loaded before the window is staged, to wait on memory with it.
  int t = blk.t0 + static_cast<int>(threadIdx.x);
  PointGroup next = points.load_group(p.n_points, 0, t, t < blk.t1);
  stage_row_block<T>(window, rb, p, load_bytes);
  for (; t < blk.t1; t += kThreads) {
    Sample smp[kPointGroup];  // the position's current group; with several chunks, its only one, for all of them
    for (int w = 0; w < (kWholeRow ? rb.chunks : 1); ++w) {
      const Block chunk = kWholeRow ? rb.chunk(w, p) : blk;
      const uint32_t* chunk_window = window + w * window_words;
      const T* h = rb.rows + int64_t{w} * R * p.seqlen;
      float acc[R];
      read_staged<T>(chunk_window, t - blk.w0, acc);  // h[t], the residual
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r] = p.residual ? acc[r] : 0.f;
      for (int64_t k0 = 0; k0 < p.n_points; k0 += kPointGroup) {
        if (w == 0) {  // the first chunk's groups (all of them: K > kPointGroup has one chunk per block)
          const PointGroup group = next;
          const bool last = k0 + kPointGroup >= p.n_points;
          const int t_next = last ? t + kThreads : t;
          next = points.load_group(p.n_points, last ? 0 : k0 + kPointGroup, t_next, t_next < blk.t1);
          points.samples(group, smp, p.n_points, k0, t, true);
        }
#pragma unroll
        for (int j = 0; j < kPointGroup; ++j) {
          if (k0 + j >= p.n_points) break;
          float v0[R], v1[R];
          read_neighbours<T, kWholeRow>(chunk_window, chunk, h, p.seqlen, smp[j], v0, v1);
#pragma unroll
          for (int r = 0; r < R; ++r) acc[r] = fmaf(smp[j].c1, v1[r], fmaf(smp[j].c0, v0[r], acc[r]));
        }
      }
      store_rows<T>(static_cast<T*>(p.out) + chunk.row0 * p.seqlen, p.seqlen, chunk.n_rows, t, acc);
    }
  }
}

// Exclusive prefix sum of `value` over the block's threads (in thread order); `total` gets the block's sum.
// Every thread must call it; `scratch` holds kWarps ints.
__device__ __forceinline__ int block_exclusive_scan(int value, int* scratch, int& total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int inclusive = value;
#pragma unroll
  for (int delta = 1; delta < 32; delta *= 2) {
    const int other = __shfl_up_sync(0xffffffffu, inclusive, delta);
    if (lane >= delta) inclusive += other;
  }
  if (lane == 31) scratch[warp] = inclusive;
  __syncthreads();
  int before = 0;
  total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    if (w < warp) before += scratch[w];
    total += scratch[w];
  }
  __syncthreads();  // scratch is reused by the next call
  return before + inclusive - value;
}

// Block per segment (b, s). Sample e = k * L + t; warp w owns samples [w * per_warp, (w + 1) * per_warp).
// Bucket j = lo + 1 in [0, L] holds the samples with that lo; its entries are ordered by warp, then by
// sample, so the layout is a function of the offsets alone.
template <typename T>
__global__ void __launch_bounds__(kThreads) buckets_kernel(const StateGatherParams p, const BucketLayout layout,
                                                         char* workspace) {
  extern __shared__ uint4 smem[];
  __shared__ int scratch[kWarps];
  static_assert(sizeof(scratch) == kBucketsStaticSmem, "bucket_layout plans with kBucketsStaticSmem");
  const int L = static_cast<int>(p.seqlen), n = static_cast<int>(p.n_points * p.seqlen), buckets = L + 1;
  const int64_t segment = blockIdx.x;
  int* entry_t = reinterpret_cast<int*>(workspace + layout.entry_t) + segment * n;
  float2* entry_c = reinterpret_cast<float2*>(workspace + layout.entry_c) + segment * n;
  int* starts = reinterpret_cast<int*>(workspace + layout.starts) + segment * (buckets + 1);
  int* counts = layout.cursors_in_smem ? reinterpret_cast<int*>(smem)
                                       : reinterpret_cast<int*>(workspace + layout.cursors) + segment * kWarps * buckets;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int* my_counts = counts + warp * buckets;
  const int per_warp = ((n + kWarps - 1) / kWarps + 31) / 32 * 32;
  const int e_begin = min(n, warp * per_warp), e_end = min(n, e_begin + per_warp);
  const SegmentPoints<T> points(p, segment);
  // Calls f(t, bucket, sample) for the warp's samples e = k * L + t = e0 + lane, 32 at a time in order, on every
  // lane (lanes past e_end and samples touching no target get bucket -1 - lane: a key of their own). The offsets
  // and weights of kBucketSteps such steps are loaded before any is used. A lane steps its (k, t) by 32 samples:
  // one division per call rather than two per sample.
  const auto for_each_sample = [&](auto&& f) {
    int k = (e_begin + lane) / L, t = (e_begin + lane) % L;
    for (int e0 = e_begin; e0 < e_end; e0 += 32 * kBucketSteps) {
      float2 pt[kBucketSteps];
      int position[kBucketSteps];
#pragma unroll
      for (int j = 0; j < kBucketSteps; ++j) {
        const int e = e0 + 32 * j + lane;
        position[j] = t;
        pt[j] = e < e_end ? points.point(k, t) : make_float2(0.f, 0.f);
        for (t += 32; t >= L; t -= L) ++k;
      }
#pragma unroll
      for (int j = 0; j < kBucketSteps; ++j) {
        if (e0 + 32 * j >= e_end) break;  // warp-uniform
        const int e = e0 + 32 * j + lane;
        const Sample smp = make_sample(position[j], pt[j].x, pt[j].y, L);
        f(position[j], e < e_end && (smp.ok0 || smp.ok1) ? smp.lo + 1 : -1 - lane, smp);
      }
    }
  };

  for (int j = threadIdx.x; j < kWarps * buckets; j += kThreads) counts[j] = 0;
  __syncthreads();
  for_each_sample([&](int, int bucket, const Sample&) {
    const unsigned peers = __match_any_sync(0xffffffffu, bucket);
    if (bucket >= 0 && lane == __ffs(peers) - 1) my_counts[bucket] += __popc(peers);
    __syncwarp();
  });
  __syncthreads();

  // starts[j] = samples in buckets < j; the cursor of warp w in bucket j = starts[j] + its count in warps < w.
  int carry = 0;
  for (int j0 = 0; j0 < buckets; j0 += kThreads) {
    const int j = j0 + threadIdx.x;
    int in_bucket = 0;
    if (j < buckets) {
      for (int w = 0; w < kWarps; ++w) {
        const int c = counts[w * buckets + j];
        counts[w * buckets + j] = in_bucket;
        in_bucket += c;
      }
    }
    int chunk_total;
    const int start = carry + block_exclusive_scan(in_bucket, scratch, chunk_total);
    if (j < buckets) {
      starts[j] = start;
      for (int w = 0; w < kWarps; ++w) counts[w * buckets + j] += start;
    }
    carry += chunk_total;
  }
  if (threadIdx.x == 0) starts[buckets] = carry;
  __syncthreads();

  for_each_sample([&](int t, int bucket, const Sample& smp) {
    const unsigned peers = __match_any_sync(0xffffffffu, bucket);
    const int slot = bucket >= 0 ? my_counts[bucket] + __popc(peers & ((1u << lane) - 1)) : 0;
    __syncwarp();  // every peer has read the cursor before its leader moves it
    if (bucket >= 0) {
      if (lane == __ffs(peers) - 1) my_counts[bucket] += __popc(peers);
      entry_t[slot] = t;
      entry_c[slot] = make_float2(smp.c0, smp.c1);
    }
    __syncwarp();
  });
}

// Warp per run of kRunTargets = 31 targets [i0, i0 + 31) and the 32 buckets i0 .. i0 + 31, one per lane: lane l
// sums its bucket j = i0 + l once, P0 = sum of c0 * grad_out[t] (reaches target j - 1) and P1 = sum of c1 *
// grad_out[t] (reaches target j); target i0 + l (l < 31) is residual + P1 of lane l + P0 of lane l + 1. So each
// entry and its grad_out row are read once per row chunk (a thread per target would read them twice, once for
// each of the two targets a sample reaches), at the cost of one bucket in 32 summed by two runs.
constexpr int kRunTargets = 31;
constexpr int kEntryGroup = 4;  // bucket entries loaded together

// Entries e0 .. e0 + kEntryGroup - 1 of a bucket whose entries end at `end`: target positions t and coefficients
// (c0, c1); entries past the end are (0, (0, 0)).
struct EntryGroup {
  int t[kEntryGroup];
  float2 c[kEntryGroup];
};

__device__ __forceinline__ EntryGroup load_entries(const int* entry_t, const float2* entry_c, int e0, int end) {
  EntryGroup g;
#pragma unroll
  for (int j = 0; j < kEntryGroup; ++j) {
    const bool live = e0 + j < end;
    g.t[j] = live ? entry_t[e0 + j] : 0;
    g.c[j] = live ? entry_c[e0 + j] : make_float2(0.f, 0.f);
  }
  return g;
}

// load_bytes: staging_load_bytes(bp.grad_out, L); per_block: whole_row_chunks_per_block (1 unless kWholeRow).
// kWholeRow: as fwd_kernel's (no entry reads global memory; several row chunks per block); a run's bucket starts
// and first entry group are loaded once for all its chunks, later groups of a bucket once per chunk.
template <typename T, bool kWholeRow>
__global__ void __launch_bounds__(kThreads) grad_h_kernel(const StateGatherBwdParams bp, const Tiling tiling,
                                                        const BucketLayout layout, const char* workspace,
                                                        int load_bytes, int per_block) {
  constexpr int R = Staged<T>::kRows;
  extern __shared__ uint4 smem[];
  auto* window = reinterpret_cast<uint32_t*>(smem);
  const StateGatherParams& p = bp.fwd;
  const int L = static_cast<int>(p.seqlen), n = static_cast<int>(p.n_points * p.seqlen);
  const RowBlock<T> rb = row_block<T>(bp.grad_out, p, tiling, kWholeRow ? per_block : 1);
  const Block& blk = rb.blk;
  const int window_words = chunk_window_words(blk);

  const int* entry_t = reinterpret_cast<const int*>(workspace + layout.entry_t) + blk.segment * n;
  const float2* entry_c = reinterpret_cast<const float2*>(workspace + layout.entry_c) + blk.segment * n;
  const int* starts = reinterpret_cast<const int*>(workspace + layout.starts) + blk.segment * (L + 2);
  T* grad_h = static_cast<T*>(bp.grad_h) + blk.row0 * p.seqlen;  // chunk w's rows at + w * R * L
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  constexpr int kRunStride = kWarps * kRunTargets;
  // Bucket i's entries [begin, end) (target t1 - 1 needs bucket t1 <= L: buckets are 0 .. L); none past t1.
  const auto bucket = [&](int i) { return i <= blk.t1 ? make_int2(starts[i], starts[i + 1]) : make_int2(0, 0); };
  // A run's buckets and their first entry group depend on two loads one after the other (starts, then the
  // entries): they are loaded ahead, the buckets two runs ahead and the first group one run ahead, so that a run
  // whose buckets hold one group (K entries on average) finds them loaded. The entries of a group are loaded
  // together: a bucket of up to kEntryGroup entries waits for one round trip to L2, not one per entry. The first
  // buckets are loaded before the window is staged, to wait on memory with it.
  int i0 = blk.t0 + warp * kRunTargets;  // warp-uniform
  int2 this_bucket = bucket(i0 + lane);
  int2 next_bucket = bucket(i0 + kRunStride + lane);
  stage_row_block<T>(window, rb, p, load_bytes);
  EntryGroup first = load_entries(entry_t, entry_c, this_bucket.x, this_bucket.y);
  for (; i0 < blk.t1; i0 += kRunStride) {
    const int i = i0 + lane;  // this lane's target and bucket (lo = i - 1)
    const int begin = this_bucket.x, end = this_bucket.y;
    const EntryGroup group = first;
    first = load_entries(entry_t, entry_c, next_bucket.x, next_bucket.y);  // the next run's
    this_bucket = next_bucket;
    next_bucket = bucket(i + 2 * kRunStride);
    for (int w = 0; w < (kWholeRow ? rb.chunks : 1); ++w) {
      const Block chunk = kWholeRow ? rb.chunk(w, p) : blk;
      const uint32_t* chunk_window = window + w * window_words;
      const T* grad = rb.rows + int64_t{w} * R * p.seqlen;
      float p0[R], p1[R], g[R];
#pragma unroll
      for (int r = 0; r < R; ++r) p0[r] = p1[r] = 0.f;
      EntryGroup entries = group;
      for (int e0 = begin; e0 < end; e0 += kEntryGroup) {
        if (e0 > begin) entries = load_entries(entry_t, entry_c, e0, end);
#pragma unroll
        for (int j = 0; j < kEntryGroup; ++j) {
          if (e0 + j >= end) break;
          read_position<T, kWholeRow>(chunk_window, chunk, grad, p.seqlen, true, entries.t[j], g);
#pragma unroll
          for (int r = 0; r < R; ++r) {
            p0[r] += entries.c[j].x * g[r];
            p1[r] += entries.c[j].y * g[r];
          }
        }
      }
#pragma unroll
      for (int r = 0; r < R; ++r) p0[r] = __shfl_down_sync(0xffffffffu, p0[r], 1);  // P0 of bucket i + 1
      if (lane < kRunTargets && i < blk.t1) {
        float acc[R];
        read_staged<T>(chunk_window, i - blk.w0, acc);  // grad_out[i], the residual's term
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r] = (p.residual ? acc[r] : 0.f) + p1[r] + p0[r];
        store_rows<T>(grad_h + int64_t{w} * R * p.seqlen, p.seqlen, chunk.n_rows, i, acc);
      }
    }
  }
}

// Blocks: segment-major, then tile (kPointsTile positions, one per thread). For each group of kPointGroup
// points the block walks every row chunk of D in order, so each sum over D has a fixed order.
// Two blocks per SM (at most 128 registers): with the 180 it would take otherwise for 16-bit types, one 8-warp
// block per SM stages 16 KiB of loads at a time, short of the ~25 KiB per SM that 3 TB/s at ~1 us of latency
// needs (an estimate, for Nsight Compute to confirm). SASS (nvcc 13): 116 to 128 registers; in 16-bit types 8
// bytes of stack on sm_90, 16 on sm_80 (values stored once and reloaded once per point group).
// load_bytes: staging_load_bytes(p.h, L).
template <typename T>
__global__ void __launch_bounds__(kThreads, 2) grad_points_kernel(const StateGatherBwdParams bp, const Tiling tiling,
                                                                  int load_bytes) {
  constexpr int R = Staged<T>::kRows;
  extern __shared__ uint4 smem[];
  auto* window = reinterpret_cast<uint32_t*>(smem);
  const StateGatherParams& p = bp.fwd;
  const int L = static_cast<int>(p.seqlen);
  const int64_t n_chunks = (p.dim + R - 1) / R;
  const int64_t segment = blockIdx.x / tiling.n_tiles;
  const int tile = static_cast<int>(blockIdx.x % tiling.n_tiles);
  const int t = tile * tiling.tile + static_cast<int>(threadIdx.x);
  const bool active = t < L;
  const SegmentPoints<T> points(p, segment);
  T* grad_offsets = static_cast<T*>(bp.grad_offsets) + segment * p.n_points * p.seqlen;
  T* grad_weights = static_cast<T*>(bp.grad_weights) + segment * p.n_points * p.seqlen;

  for (int64_t k0 = 0; k0 < p.n_points; k0 += kPointGroup) {
    Sample smp[kPointGroup];
    points.samples(points.load_group(p.n_points, k0, t, active), smp, p.n_points, k0, t, active);
    float dweight[kPointGroup] = {}, dpos[kPointGroup] = {};
    for (int64_t chunk = 0; chunk < n_chunks; ++chunk) {
      const Block blk = make_block(segment, chunk, tile, p, tiling, R);
      const T* h = static_cast<const T*>(p.h) + blk.row0 * p.seqlen;
      // grad_out at t, loaded before the window so that both wait on memory together.
      float g[R];
      const T* grad = static_cast<const T*>(bp.grad_out) + blk.row0 * p.seqlen;
#pragma unroll
      for (int r = 0; r < R; ++r) g[r] = active && r < blk.n_rows ? to_float(grad[r * p.seqlen + t]) : 0.f;
      __syncthreads();  // the previous chunk's window is no longer read
      stage_window<T>(window, h, p.seqlen, blk.n_rows, blk.w0, blk.w1, load_bytes);
      __syncthreads();
      if (!active) continue;
#pragma unroll
      for (int j = 0; j < kPointGroup; ++j) {
        if (k0 + j >= p.n_points) break;
        float v0[R], v1[R];
        read_neighbours<T>(window, blk, h, p.seqlen, smp[j], v0, v1);
        float sum_w = 0.f, sum_p = 0.f;
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const float step = v1[r] - v0[r];
          sum_w = fmaf(g[r], fmaf(smp[j].frac, step, v0[r]), sum_w);  // g * interpolated h
          sum_p = fmaf(g[r], step, sum_p);
        }
        dweight[j] += sum_w;
        dpos[j] += sum_p;
      }
    }
    if (!active) continue;
#pragma unroll
    for (int j = 0; j < kPointGroup; ++j) {
      const int64_t k = k0 + j;
      if (k >= p.n_points) break;
      grad_weights[k * p.seqlen + t] = from_float<T>(dweight[j]);
      grad_offsets[k * p.seqlen + t] = from_float<T>(smp[j].weight * dpos[j]);
    }
  }
}

// Host launchers, instantiated per dtype in state_gather_{fwd,bwd}_<dtype>.cu.

// The launch of fwd_kernel or grad_h_kernel in blocks of runs of per_block row chunks (row_block): one window per
// chunk of dynamic shared memory, and the grid.
struct RowBlockLaunch {
  size_t smem;
  unsigned grid;
};

template <typename T>
RowBlockLaunch row_block_launch(const StateGatherParams& p, const Tiling& tiling, int per_block, const char* op) {
  const int64_t runs = ceil_div(ceil_div(p.dim, Staged<T>::kRows), per_block);
  return {per_block * window_bytes(tiling, p.seqlen), grid_size(p.batch * p.n_seq * runs * tiling.n_tiles, op)};
}

template <typename T>
void launch_fwd(const StateGatherParams& p, cudaStream_t stream) {
  const size_t block_smem = max_block_smem();
  const Tiling tiling = row_tiling(p.seqlen, block_smem);
  const int per_block = fwd_chunks_per_block<T>(p, tiling, block_smem);
  const RowBlockLaunch launch = row_block_launch<T>(p, tiling, per_block, "state_gather");
  bool_switch(tiling.n_tiles == 1, [&](auto whole_row) {
    const auto kernel = fwd_kernel<T, decltype(whole_row)::value>;
    allow_dynamic_smem(kernel, launch.smem, 0);
    kernel<<<launch.grid, kThreads, launch.smem, stream>>>(p, tiling, staging_load_bytes<T>(p.h, p.seqlen),
                                                           per_block);
  });
  check_launch("state_gather forward");
}

template <typename T>
void launch_bwd(const StateGatherBwdParams& bp, cudaStream_t stream) {
  const StateGatherParams& p = bp.fwd;
  const int64_t segments = p.batch * p.n_seq;
  const size_t block_smem = max_block_smem();

  const Tiling points = points_tiling(p.seqlen);
  const size_t points_smem = window_bytes(points, p.seqlen);
  const unsigned points_grid = grid_size(segments * points.n_tiles, "state_gather backward");
  allow_dynamic_smem(grad_points_kernel<T>, points_smem, 0);
  grad_points_kernel<T><<<points_grid, kThreads, points_smem, stream>>>(bp, points,
                                                                       staging_load_bytes<T>(p.h, p.seqlen));
  check_launch("state_gather backward (grad_offsets, grad_weights)");
  if (p.dim == 0) return;  // grad_h is empty

  const BucketLayout layout = bucket_layout(p, block_smem);
  char* workspace = static_cast<char*>(bp.workspace);
  const size_t cursor_smem = layout.cursors_in_smem ? static_cast<size_t>(kWarps) * (p.seqlen + 1) * 4 : 0;
  allow_dynamic_smem(buckets_kernel<T>, cursor_smem, kBucketsStaticSmem);
  buckets_kernel<T><<<grid_size(segments, "state_gather backward"), kThreads, cursor_smem, stream>>>(p, layout, workspace);
  check_launch("state_gather backward (buckets)");

  const Tiling rows = row_tiling(p.seqlen, block_smem);
  const int per_block = whole_row_chunks_per_block<T>(p, rows, block_smem);
  const RowBlockLaunch launch = row_block_launch<T>(p, rows, per_block, "state_gather backward");
  bool_switch(rows.n_tiles == 1, [&](auto whole_row) {
    const auto kernel = grad_h_kernel<T, decltype(whole_row)::value>;
    allow_dynamic_smem(kernel, launch.smem, 0);
    kernel<<<launch.grid, kThreads, launch.smem, stream>>>(bp, rows, layout, workspace,
                                                           staging_load_bytes<T>(bp.grad_out, p.seqlen), per_block);
  });
  check_launch("state_gather backward (grad_h)");
}

}  // namespace mamba_adaptor::cuda::state_gather
