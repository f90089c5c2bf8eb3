// selective_scan CUDA kernels, forward and backward, templated on the element type T (float, __half,
// __nv_bfloat16) and a few flags; instantiated per direction and dtype in selective_scan_{fwd,bwd}_*.cu.
//
// Shapes, in elements (the L dimension has stride 1; the other input strides come from the params, outputs and
// grad_out are contiguous):
//   u, delta, y, du, ddelta  (b, dim, L)       A, dA           (dim, N) float32
//   B, C, dB, dC             (b, G, N, L)      D, delta_bias   (dim,) float32
//   states (states mode)     (b, dim, N, L)    channel d reads group g = d / (dim / G)
//
// Work split. One warp scans one channel row (b, d) along L, in segments of 32 * K timesteps: lane l holds the K
// consecutive timesteps seg * 32 K + l K + i, i < K (K = 8, one 16-byte load per tensor for 16-bit types and two
// for float32, but 4 in the backward for d_state above 1 or float32). Per state n, timestep t is the affine map
// h -> a_t h + b_t with a_t = exp(dt_t A[n]) and b_t = dt_t B[n, t] u_t; a lane composes its K maps, a 5-step warp
// shuffle scan composes the lanes, and the state carried over from the previous segment closes the recurrence. A
// block holds up to kFwdWarps / kBwdWarps channels of one (batch, group): they read the same B and C rows, and the
// backward sums their dB and dC contributions in shared memory before one atomic add per block and element (with
// `deterministic`, one store into the block's own slice of the workspace; the slices are summed in order after).
// Rows of one segment with d_state 1 take the short-row kernels (selective_scan_short_fwd_kernel and _bwd_kernel):
// kShortRows rows per warp.
//
// Backward, per row: it starts from the state at each segment boundary (n_seg - 1 checkpoints of N floats per
// row, not the state history), written by the forward when autograd asks for them (SelectiveScanParams::
// checkpoints) or else by a first pass of the backward, which runs the forward recurrence over all segments but
// the last. The (second) pass walks the segments from last to first, recomputes the states inside each segment
// from its checkpoint and scans the adjoint g_t = dout_t + a_{t+1} g_{t+1} backwards (dout_t = dy_t C[n, t], or
// the states' gradient), carrying a_t g_t from one segment into the one before it.
//
// Timesteps at t >= L (the tail of the last segment) load nothing (their u, B, C, dy read as 0), get dt = 0 and
// a = 1, hence b = 0 and dout = 0: the identity map in both scan directions; they store nothing. No index
// depends on data, so non-finite inputs give non-finite outputs and never an out-of-bounds access.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "selective_scan.h"

namespace mamba_adaptor::cuda::scan {

// Consecutive timesteps per lane: 8 in the forward and in the backward of 16-bit types with d_state 1; 4 in the
// other backwards, whose per-item state would otherwise not fit the 128 registers that let two of its 256-thread
// blocks share an SM.
constexpr int kFwdItems = 8;
constexpr int kFwdSegment = 32 * kFwdItems;  // timesteps per warp and step along L

__host__ __device__ constexpr int bwd_items(bool one_state, bool float32) { return one_state && !float32 ? 8 : 4; }

// Timesteps per warp and step along L in the backward of params p: the segments of the checkpoints.
__host__ __device__ inline int bwd_segment(const SelectiveScanParams& p) {
  return static_cast<int>(selective_scan_segment(p));
}
static_assert(32 * bwd_items(true, false) == selective_scan_segment(DType::BFloat16, 1) &&
                  32 * bwd_items(true, true) == selective_scan_segment(DType::Float32, 1) &&
                  32 * bwd_items(false, false) == selective_scan_segment(DType::Float16, 2),
              "the backward's segments are those of the checkpoints");

constexpr int kFwdWarps = 4;  // channels per block, forward
constexpr int kBwdWarps = 8;  // channels per block, backward (each block adds dB, dC once)
// Rows per warp of the short-row kernels (d_state 1, rows of one segment), scanned one after the other.
constexpr int kShortRows = 4;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;

__host__ __device__ inline int64_t num_segments(int64_t seqlen, int segment) {
  return (seqlen + segment - 1) / segment;
}

// The channels of a (batch, group) in tiles of warps * rows_per_warp channels (rows_per_warp per warp), a tile per
// block, for blocks of at most max_warps warps (kFwdWarps, kBwdWarps): the launch's block size and the backward's
// workspace use it.
struct ChannelTiles {
  int warps;
  int64_t tiles;
};

__host__ __device__ inline ChannelTiles channel_tiles(const SelectiveScanParams& p, int max_warps,
                                                      int rows_per_warp = 1) {
  const int64_t per_group = p.dim / p.n_groups;
  const int warps = static_cast<int>(per_group < max_warps ? per_group : max_warps);
  const int64_t tile = int64_t{warps} * rows_per_warp;
  return {warps, (per_group + tile - 1) / tile};
}

// The float32 workspace of the backward, in floats:
// - the dB and dC sums of each (batch, group, n) row, padded to padded_len = n_seg * bwd_segment(p) so that
//   every segment starts 16-byte aligned: one set that every block adds to atomically, or, when deterministic, one per
//   tile of channels (`parts` sets) that its blocks write, summed in order afterwards;
// - when deterministic, the row sums (b, dim, N + 2): each row's dA[n], dD and ddelta_bias, summed over the batch
//   in order afterwards (else each row adds them to the outputs atomically);
// - unless the forward's are given, the checkpoints (b, dim, n_seg - 1, N): the state after each segment but the
//   last.
struct BwdWorkspace {
  int64_t padded_len, parts, part_stride, dB_offset, dC_offset, row_sums_offset, checkpoint_offset, total;
};

// Rows per warp of the backward: kShortRows for rows of one segment with d_state 1
// (selective_scan_short_bwd_kernel), else 1.
__host__ __device__ inline int bwd_rows_per_warp(const SelectiveScanParams& p) {
  return p.dstate == 1 && p.seqlen <= bwd_segment(p) ? kShortRows : 1;
}

__host__ __device__ inline BwdWorkspace bwd_workspace_layout(const SelectiveScanBwdParams& bp) {
  const SelectiveScanParams& p = bp.fwd;
  const int segment = bwd_segment(p);
  const int64_t n_seg = num_segments(p.seqlen, segment);
  BwdWorkspace w;
  w.padded_len = n_seg * segment;
  w.parts = bp.deterministic ? channel_tiles(p, kBwdWarps, bwd_rows_per_warp(p)).tiles : 1;
  w.part_stride = p.batch * p.n_groups * p.dstate * w.padded_len;
  w.dB_offset = 0;
  w.dC_offset = w.parts * w.part_stride;
  w.row_sums_offset = (p.states_mode ? 1 : 2) * w.parts * w.part_stride;
  const int64_t row_sums = bp.deterministic ? p.batch * p.dim * (p.dstate + 2) : 0;
  w.checkpoint_offset = w.row_sums_offset + (row_sums + 3) / 4 * 4;  // 16-byte aligned
  w.total = w.checkpoint_offset + (bp.checkpoints ? 0 : p.batch * p.dim * (n_seg - 1) * p.dstate);
  return w;
}

// Channel row j (< rows_per_warp) of this warp. Blocks are (batch, group, tile of channels) with the tile
// fastest; warp w takes the tile's channels w, w + warps, ... A row past the group's last channel is inactive: it
// then points at the group's first channel, so that its pointers stay inside the tensors, and must load, store
// and add nothing.
struct Row {
  int64_t b, g, d;
  bool active;
};

__device__ __forceinline__ Row locate_row(const SelectiveScanParams& p, int rows_per_warp = 1, int j = 0) {
  const int warps = blockDim.x / 32, warp = threadIdx.x / 32;
  const int64_t per_group = p.dim / p.n_groups;
  const int64_t tile = int64_t{warps} * rows_per_warp;
  const int64_t tiles = (per_group + tile - 1) / tile;
  const int64_t block = blockIdx.x;
  const int64_t bg = block / tiles;
  const int64_t channel = (block % tiles) * tile + int64_t{j} * warps + warp;
  Row row;
  row.b = bg / p.n_groups;
  row.g = bg % p.n_groups;
  row.active = channel < per_group;
  row.d = row.g * per_group + (row.active ? channel : 0);
  return row;
}

// The inputs of a row: its u, delta rows, its group's B and C (n = 0; nullptr in states mode), its A row, D (0
// without D) and delta_bias (0 without it).
template <typename T>
struct RowInputs {
  const T *u, *delta, *B, *C;
  const float* A;
  float D, bias;

  __device__ __forceinline__ RowInputs(const SelectiveScanParams& p, const Row& row, bool states, bool has_D)
      : u(static_cast<const T*>(p.u) + row.b * p.u_batch_stride + row.d * p.u_dim_stride),
        delta(static_cast<const T*>(p.delta) + row.b * p.delta_batch_stride + row.d * p.delta_dim_stride),
        B(static_cast<const T*>(p.B) + row.b * p.B_batch_stride + row.g * p.B_group_stride),
        C(states ? nullptr : static_cast<const T*>(p.C) + row.b * p.C_batch_stride + row.g * p.C_group_stride),
        A(static_cast<const float*>(p.A) + row.d * p.A_dim_stride),
        D(has_D ? static_cast<const float*>(p.D)[row.d] : 0.f),
        bias(p.delta_bias ? static_cast<const float*>(p.delta_bias)[row.d] : 0.f) {}
};

// Number of the K timesteps from t0 on that lie inside a row of length len (0 to K).
template <int K>
__device__ __forceinline__ int valid_items(int64_t len, int64_t t0) {
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(len - t0, 0), K));
}

// ---- loads and stores of one lane's K timesteps --------------------------------------------------------------

// x's items rounded to T.
template <typename T, int K>
__device__ __forceinline__ Items<T, K> pack_items(const float (&x)[K]) {
  using I = Items<T, K>;
  I y;
#pragma unroll
  for (int j = 0; j < I::kWords; ++j) {
    float v[I::kPerWord];
#pragma unroll
    for (int q = 0; q < I::kPerWord; ++q) v[q] = x[j * I::kPerWord + q];
    y.w[j] = pack_word(v, T{});
  }
  return y;
}

// A T from its bits (in the low bytes of a word), for the partial stores below (memcpy between registers).
template <typename T>
__device__ __forceinline__ T from_bits(uint32_t bits) {
  T value;
  memcpy(&value, &bits, sizeof(T));
  return value;
}

// Calls body(valid) with `valid` the number of the lane's K items from t0 on inside a row of length len: in a
// segment that is not the row's last (`full`, the same in every lane of the warp) std::integral_constant K, so that
// the per-item checks fold away; else valid_items<K>(len, t0).
template <int K, typename F>
__device__ __forceinline__ void with_valid_items(bool full, int64_t len, int64_t t0, F&& body) {
  if (full) {
    body(std::integral_constant<int, K>{});
  } else {
    body(valid_items<K>(len, t0));
  }
}

// p[0 .. K): the widest loads the address alignment allows when all items are valid; otherwise only p[0 .. valid)
// is read and the rest is 0. Rows of a contiguous tensor whose L is not a multiple of 8 start at varying
// alignments, hence the run-time choice (uniform across the warp, as all lanes share the row alignment).
template <int K, typename T>
__device__ __forceinline__ Items<T, K> load_items(const T* p, int valid) {
  constexpr int kBytes = sizeof(T) * K;
  Items<T, K> x;
  const auto address = reinterpret_cast<uintptr_t>(p);
  if (valid >= K) {
    if constexpr (kBytes % 16 == 0) {
      if (address % 16 == 0) {
        load_vectors<uint4>(p, x);
        return x;
      }
    }
    if constexpr (kBytes % 8 == 0) {
      if (address % 8 == 0) {
        load_vectors<uint2>(p, x);
        return x;
      }
    }
    if constexpr (sizeof(T) < 4) {
      if (address % 4 == 0) {
        load_vectors<unsigned int>(p, x);
        return x;
      }
    }
  }
  return load_items_by_one<K>(p, 1, valid);
}

template <typename V, typename T, int K>
__device__ __forceinline__ void store_vectors(T* p, const Items<T, K>& x) {
  constexpr int kWordsPerVector = sizeof(V) / 4;
  V* dst = reinterpret_cast<V*>(p);
#pragma unroll
  for (int k = 0; k < Items<T, K>::kWords / kWordsPerVector; ++k) {
    V v;
    memcpy(&v, x.w + k * kWordsPerVector, sizeof(V));
    dst[k] = v;
  }
}

// Writes p[0 .. valid) from x, rounded to T.
template <typename T, int K>
__device__ __forceinline__ void store_items(T* p, int valid, const float (&x)[K]) {
  constexpr int kBytes = sizeof(T) * K;
  const Items<T, K> y = pack_items<T>(x);
  const auto address = reinterpret_cast<uintptr_t>(p);
  if (valid >= K) {
    if constexpr (kBytes % 16 == 0) {
      if (address % 16 == 0) {
        store_vectors<uint4>(p, y);
        return;
      }
    }
    if constexpr (kBytes % 8 == 0) {
      if (address % 8 == 0) {
        store_vectors<uint2>(p, y);
        return;
      }
    }
    if constexpr (sizeof(T) < 4) {
      if (address % 4 == 0) {
        store_vectors<unsigned int>(p, y);
        return;
      }
    }
  }
#pragma unroll
  for (int i = 0; i < K; ++i) {
    if (i < valid) p[i] = from_bits<T>(y.w[i / Items<T, K>::kPerWord] >> (8 * sizeof(T) * (i % Items<T, K>::kPerWord)));
  }
}

// ---- scans -------------------------------------------------------------------------------------------------

// The affine map h -> a h + b.
struct Affine {
  float a, b;
};

__device__ __forceinline__ Affine identity_map() { return {1.f, 0.f}; }

// `later` after `earlier`: h -> later.a (earlier.a h + earlier.b) + later.b.
__device__ __forceinline__ Affine compose(Affine later, Affine earlier) {
  return {later.a * earlier.a, fmaf(later.a, earlier.b, later.b)};
}

// The shuffled map where `take`, else the identity: composed unconditionally, one select per value instead of a
// conditional composition (predicated arithmetic and moves).
__device__ __forceinline__ Affine map_or_identity(bool take, float a, float b) {
  return {take ? a : 1.f, take ? b : 0.f};
}

// Lane l gets the composition of the maps of lanes 0..l, lane 0's applied first.
__device__ __forceinline__ Affine warp_scan(Affine x, int lane) {
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    x = compose(x, map_or_identity(lane >= offset, __shfl_up_sync(kFullMask, x.a, offset),
                                   __shfl_up_sync(kFullMask, x.b, offset)));
  }
  return x;
}

// Lane l gets the composition of the maps of lanes l..31, lane 31's applied first.
__device__ __forceinline__ Affine warp_reverse_scan(Affine x, int lane) {
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    x = compose(x, map_or_identity(lane + offset < 32, __shfl_down_sync(kFullMask, x.a, offset),
                                   __shfl_down_sync(kFullMask, x.b, offset)));
  }
  return x;
}

// The state entering this lane's items: the state leaving the lane before (h_in, the state entering the segment,
// for lane 0), from the inclusive scan of the lanes' maps. (One shuffle of that state, where shuffling the lanes'
// composed maps takes two.)
__device__ __forceinline__ float state_before_lane(Affine inclusive, float h_in, int lane) {
  const float previous = __shfl_up_sync(kFullMask, fmaf(inclusive.a, h_in, inclusive.b), 1);
  return lane == 0 ? h_in : previous;
}

// The reverse scan's: the adjoint flowing into this lane's items from the lane after it (`inflow`, from the
// segment after, for lane 31).
__device__ __forceinline__ float inflow_after_lane(Affine inclusive, float inflow, int lane) {
  const float next = __shfl_down_sync(kFullMask, fmaf(inclusive.a, inflow, inclusive.b), 1);
  return lane == 31 ? inflow : next;
}

template <typename F>
__device__ __forceinline__ F warp_sum(F x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

// ---- the time step -------------------------------------------------------------------------------------------

// dt from x = delta + delta_bias: softplus(x) = log(1 + exp(x)), taken as x above 20 (as the CPU kernel does).
// float32 inputs get log1pf (about 40 more PTX instructions per timestep); 16-bit inputs get log(1 + exp(x))
// from the fast intrinsics, whose extra error over log1pf (under 2e-7 absolute) is far below the rounding of
// their 16-bit outputs. Both sides are computed (from min(x, 20): finite) and one selected: written as a branch,
// it compiles to one branch per timestep around its exp and log, and a lane's timesteps then wait on the
// special-function unit one after the other instead of together.
template <typename T, bool kSoftplus>
__device__ __forceinline__ float time_step(float x) {
  if constexpr (!kSoftplus) {
    return x;
  } else {
    const float e = __expf(fminf(x, 20.f));
    const float softplus = sizeof(T) == 4 ? log1pf(e) : __logf(1.f + e);
    return x <= 20.f ? softplus : x;
  }
}

// d softplus(x) / dx = sigmoid(x); 1 above 20, where softplus(x) is taken as x, as 1 + exp(-x) rounds to 1 there.
// (Fast-math division: no branch.)
__device__ __forceinline__ float softplus_derivative(float x) { return 1.f / (1.f + __expf(-x)); }

// The K time steps of a lane's items from delta (plus delta_bias), 0 past the row's end (`valid` items): computed
// for every item and then selected, without a branch, like time_step.
template <typename T, bool kSoftplus, int K>
__device__ __forceinline__ void time_steps(const Items<T, K>& delta, float bias, int valid, float (&dt)[K]) {
#pragma unroll
  for (int i = 0; i < K; ++i) {
    const float step = time_step<T, kSoftplus>(delta[i] + bias);
    dt[i] = i < valid ? step : 0.f;
  }
}

// dst[0..3] += v, dst 16-byte aligned: one vector atomic on sm_90, four scalar ones before.
__device__ __forceinline__ void atomic_add4(float* dst, float4 v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float4*>(dst), v);
#else
  atomicAdd(dst, v.x);
  atomicAdd(dst + 1, v.y);
  atomicAdd(dst + 2, v.z);
  atomicAdd(dst + 3, v.w);
#endif
}

// Per-lane inputs of one segment: u and delta, and dy in the backward outside states mode.
template <typename T, int K>
struct SegmentInputs {
  Items<T, K> u, delta, dy;
};

// Per-lane inputs of one state n over one segment: B, and C (or, in the backward in states mode, the states'
// gradient dstates[n]), and the row's A[n]. A is loaded with them, one step ahead: as a store to an output may
// alias it for all the compiler knows, it is read from memory at every use, and that read would otherwise wait
// on memory just before the segment's exps.
template <typename T, int K>
struct StateInputs {
  Items<T, K> B, C;
  float A;
};

// ---- forward -------------------------------------------------------------------------------------------------

// One state's recurrence over a segment, for a lane's K items: a_t = exp(dt_t A), b_t = dt_t u_t B_t (dtu = dt u),
// h_t = a_t h_{t-1} + b_t from h_in (the state entering the segment, the same in every lane); item(i, h_t) is
// called for each item in order. Returns the state leaving the segment, in every lane. Items past `valid` have
// dt = 0 and so a = 1 but are given a = 1 explicitly: A may be infinite.
template <typename T, int K, typename Item>
__device__ __forceinline__ float scan_segment(const float (&dt)[K], const float (&dtu)[K], const Items<T, K>& B,
                                              float A, int valid, float h_in, int lane, Item&& item) {
  const float A_log2 = A * kLog2e;
  float a[K], b[K];
  Affine lane_map = identity_map();
#pragma unroll
  for (int i = 0; i < K; ++i) {
    a[i] = i < valid ? exp2f(dt[i] * A_log2) : 1.f;
    b[i] = dtu[i] * B[i];
    lane_map = compose(Affine{a[i], b[i]}, lane_map);
  }
  float h = state_before_lane(warp_scan(lane_map, lane), h_in, lane);
#pragma unroll
  for (int i = 0; i < K; ++i) {
    h = fmaf(a[i], h, b[i]);
    item(i, h);
  }
  return __shfl_sync(kFullMask, h, 31);
}

// The forward's checkpoints (SelectiveScanParams::checkpoints, (b, dim, count, N) floats): the state after
// every kSegment timesteps (the backward's segment) but at the row's end. A lane whose items end on such a
// boundary, before timestep t_end, stores its last item's state of each n there: its slot of row row_index,
// (N,) floats, or nullptr where it stores none (or none are asked for).
template <int kSegment>
__device__ __forceinline__ float* checkpoint_slot(const SelectiveScanParams& p, int64_t row_index, int64_t t_end,
                                                  int64_t N) {
  const int64_t count = (p.seqlen - 1) / kSegment, k = t_end / kSegment - 1;
  if (p.checkpoints == nullptr || t_end % kSegment != 0 || k >= count) return nullptr;
  return static_cast<float*>(p.checkpoints) + (row_index * count + k) * N;
}

// Blocks per SM the forward's register budget allows: for the d_state-1 path of 16-bit types 8 (64 registers) in
// states mode and 6 (80) with C, what each fits in without spilling (sm_90, nvcc 13: with C at 64, 48 bytes of
// stack); 4 (128 registers) otherwise.
template <typename T, int kN, bool kStates>
constexpr int fwd_min_blocks() {
  return kN == 1 && sizeof(T) == 2 ? (kStates ? 8 : 6) : 4;
}

// kN: 1 for d_state 1 (N known at compile time), 0 for any d_state (p.dstate).
template <typename T, int kN, bool kStates, bool kHasD, bool kSoftplus>
__global__ void __launch_bounds__(kFwdWarps * 32, fwd_min_blocks<T, kN, kStates>())
    selective_scan_fwd_kernel(const __grid_constant__ SelectiveScanParams p) {
  extern __shared__ float4 shared_storage[];  // per warp: the state entering the next segment, one float per n
  constexpr int kItems = kFwdItems, kSegment = kFwdSegment;
  const int lane = threadIdx.x % 32;
  const Row row = locate_row(p);
  if (!row.active) return;  // this kernel has no block-wide barrier

  const int64_t L = p.seqlen;
  const int64_t N = kN > 0 ? kN : p.dstate;
  const int64_t n_seg = num_segments(L, kSegment);
  float* carry = reinterpret_cast<float*>(shared_storage) + (threadIdx.x / 32) * N;

  const RowInputs<T> in_row(p, row, kStates, kHasD);
  const T *u = in_row.u, *delta = in_row.delta, *B = in_row.B, *C = in_row.C;
  const float* A = in_row.A;
  const float D = in_row.D, bias = in_row.bias;
  const int64_t row_index = row.b * p.dim + row.d;
  // y row (L), or this row's states (N, L).
  T* out = static_cast<T*>(p.out) + row_index * (kStates ? N : 1) * L;

  for (int64_t n = lane; n < N; n += 32) carry[n] = 0.f;
  __syncwarp();

  auto first_item = [&](int64_t seg) { return seg * kSegment + lane * kItems; };
  auto load_segment = [&](int64_t seg) {
    const int64_t t0 = first_item(seg);
    const int valid = valid_items<kItems>(L, t0);
    SegmentInputs<T, kItems> in;
    in.u = load_items<kItems>(u + t0, valid);
    in.delta = load_items<kItems>(delta + t0, valid);
    return in;
  };
  auto load_state = [&](int64_t seg, int64_t n) {
    const int64_t t0 = first_item(seg);
    const int valid = valid_items<kItems>(L, t0);
    StateInputs<T, kItems> in;
    in.B = load_items<kItems>(B + n * p.B_dstate_stride + t0, valid);
    if constexpr (!kStates) in.C = load_items<kItems>(C + n * p.C_dstate_stride + t0, valid);
    in.A = A[n * p.A_dstate_stride];
    return in;
  };

  // Loads run one step ahead: the next segment's u, delta and the next (segment, n)'s B, C.
  SegmentInputs<T, kItems> next_segment = load_segment(0);
  StateInputs<T, kItems> next_state = load_state(0, 0);
  for (int64_t seg = 0; seg < n_seg; ++seg) {
    const SegmentInputs<T, kItems> in = next_segment;
    if (seg + 1 < n_seg) next_segment = load_segment(seg + 1);
    const int64_t t0 = first_item(seg);
    float* const checkpoint = checkpoint_slot<32 * bwd_items(kN == 1, sizeof(T) == 4)>(p, row_index, t0 + kItems, N);
    // valid: the lane's items inside the row (a compile-time kItems but in the last segment).
    with_valid_items<kItems>(seg + 1 < n_seg, L, t0, [&](auto valid) {
      float u_f[kItems], dt[kItems], dtu[kItems], y[kItems];
      time_steps<T, kSoftplus>(in.delta, bias, valid, dt);
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        u_f[i] = in.u[i];
        dtu[i] = dt[i] * u_f[i];
        y[i] = kHasD ? D * u_f[i] : 0.f;
      }

#pragma unroll 1
      for (int64_t n = 0; n < N; ++n) {
        const StateInputs<T, kItems> st = next_state;
        if (n + 1 < N) {
          next_state = load_state(seg, n + 1);
        } else if (seg + 1 < n_seg) {
          next_state = load_state(seg + 1, 0);
        }
        [[maybe_unused]] float h_items[kItems];  // states mode
        float lane_end = 0.f;
        const float segment_end = scan_segment(dt, dtu, st.B, st.A, valid, carry[n], lane, [&](int i, float h) {
          if constexpr (kStates) {
            h_items[i] = h;
          } else {
            y[i] = fmaf(st.C[i], h, y[i]);
          }
          if (i == kItems - 1) lane_end = h;
        });
        if constexpr (kStates) store_items(out + n * L + t0, valid, h_items);
        if (checkpoint != nullptr) checkpoint[n] = lane_end;
        __syncwarp();  // every lane has read carry[n] before lane 0 overwrites it
        if (lane == 0) carry[n] = segment_end;
      }
      if constexpr (!kStates) store_items(out + t0, valid, y);
    });
    __syncwarp();  // lane 0's carry writes are visible to the whole warp in the next segment
  }
}

// A warp's rows in the short-row kernels (d_state 1, rows of one segment): d = row.d + j * warps for j < rows,
// those inside the group (none when `row` is inactive); the lane's K items of their common B and C (C absent in
// states mode), loaded once; and load(j), row j's u, delta and (from grad_out, (b, dim, L), when not nullptr) dy
// items with its A, D and delta_bias.
template <typename T, int K, bool kStates, bool kHasD>
struct ShortRows {
  struct Step {
    SegmentInputs<T, K> in;
    float A, D, bias;
  };

  const SelectiveScanParams& p;
  Row row;
  int warps, rows, valid;
  int64_t t0;
  RowInputs<T> first;
  Items<T, K> B, C;

  __device__ __forceinline__ ShortRows(const SelectiveScanParams& params, int lane)
      : p(params), row(locate_row(params, kShortRows, 0)), warps(blockDim.x / 32), t0(int64_t{lane} * K),
        first(params, row, kStates, kHasD) {
    const int64_t group_end = (row.g + 1) * (p.dim / p.n_groups);
    rows = row.active ? static_cast<int>(std::min<int64_t>(kShortRows, (group_end - row.d + warps - 1) / warps)) : 0;
    valid = valid_items<K>(rows > 0 ? p.seqlen : 0, t0);
    B = load_items<K>(first.B + t0, valid);
    if constexpr (!kStates) C = load_items<K>(first.C + t0, valid);
  }

  // Row j's index in (b, dim) and its channel.
  __device__ __forceinline__ int64_t d(int j) const { return row.d + int64_t{j} * warps; }
  __device__ __forceinline__ int64_t index(int j) const { return row.b * p.dim + d(j); }

  __device__ __forceinline__ Step load(int j, const T* grad_out) const {
    Step r;
    r.in.u = load_items<K>(first.u + j * warps * p.u_dim_stride + t0, valid);
    r.in.delta = load_items<K>(first.delta + j * warps * p.delta_dim_stride + t0, valid);
    if (grad_out != nullptr) r.in.dy = load_items<K>(grad_out + index(j) * p.seqlen + t0, valid);
    r.A = first.A[j * warps * p.A_dim_stride];
    r.D = kHasD ? static_cast<const float*>(p.D)[d(j)] : 0.f;
    r.bias = p.delta_bias ? static_cast<const float*>(p.delta_bias)[d(j)] : 0.f;
    return r;
  }
};

// The forward for rows of one segment (L <= kFwdSegment: b2 stages 3 and 4) and d_state 1. There a warp of the
// kernel above has nothing to overlap its loads with: it loads one row, waits on memory, computes it and ends.
// Here a warp scans kShortRows rows of one (batch, group) one after the other, with the next row's u, delta, A, D
// and delta_bias loaded while one is computed, and loads the rows' common B and C once. No state is carried
// between segments, so no shared memory either.

template <typename T, bool kStates, bool kHasD, bool kSoftplus>
__global__ void __launch_bounds__(kFwdWarps * 32, fwd_min_blocks<T, 1, kStates>())
    selective_scan_short_fwd_kernel(const __grid_constant__ SelectiveScanParams p) {
  constexpr int kItems = kFwdItems;
  const int lane = threadIdx.x % 32;
  const ShortRows<T, kItems, kStates, kHasD> warp_rows(p, lane);
  const int rows = warp_rows.rows, valid = warp_rows.valid;
  if (rows == 0) return;  // this kernel has no block-wide barrier
  using Step = typename ShortRows<T, kItems, kStates, kHasD>::Step;
  const Items<T, kItems>&B = warp_rows.B, &C = warp_rows.C;
  Step next = warp_rows.load(0, nullptr);
  for (int j = 0; j < rows; ++j) {
    const Step r = next;
    if (j + 1 < rows) next = warp_rows.load(j + 1, nullptr);
    float dt[kItems], dtu[kItems], y[kItems], h_items[kItems], lane_end = 0.f;
    time_steps<T, kSoftplus>(r.in.delta, r.bias, valid, dt);
#pragma unroll
    for (int i = 0; i < kItems; ++i) dtu[i] = dt[i] * r.in.u[i];
    scan_segment(dt, dtu, B, r.A, valid, 0.f, lane, [&](int i, float h) {
      if constexpr (kStates) {
        h_items[i] = h;
      } else {
        y[i] = fmaf(C[i], h, kHasD ? r.D * r.in.u[i] : 0.f);
      }
      if (i == kItems - 1) lane_end = h;
    });
    // A row holds one of the backward's segments in 16-bit types, so no checkpoint; two in float32.
    static_assert(32 * bwd_items(true, false) == kFwdSegment, "16-bit rows of one forward segment have no checkpoint");
    if constexpr (sizeof(T) == 4) {
      float* const checkpoint =
          checkpoint_slot<32 * bwd_items(true, true)>(p, warp_rows.index(j), warp_rows.t0 + kItems, 1);
      if (checkpoint != nullptr) *checkpoint = lane_end;
    }
    // y row (L), or the row's states (1, L).
    T* out = static_cast<T*>(p.out) + warp_rows.index(j) * p.seqlen + warp_rows.t0;
    if constexpr (kStates) {
      store_items(out, valid, h_items);
    } else {
      store_items(out, valid, y);
    }
  }
}

// ---- backward ------------------------------------------------------------------------------------------------

// One state's backward over a segment, for a lane's K items: the forward recurrence again from h_start (the state
// entering the segment), then the adjoint g_t = dout_t + a_{t+1} g_{t+1} backwards from `inflow` (a_t g_t of the
// timestep after the segment). Adds the state's terms to du and ddt (ddt before the softplus derivative) and its
// dA terms to dA_part, and calls contribution(i, dB_i, dC_i) for each item, from the last to the first, with its
// terms of dB and dC (dC_i = dy_t h_t). x(i) gives item i of u, B, dout (dy C, or the states' gradient) and dy.
// Returns the adjoint flowing into the segment before, in every lane.
template <int K, typename U, typename Bf, typename Dout, typename Dy, typename Contribution>
__device__ __forceinline__ float state_backward(const float (&dt)[K], U&& u, Bf&& B, Dout&& dout, Dy&& dy, float A,
                                                int valid, float h_start, float inflow, int lane, float (&du)[K],
                                                float (&ddt)[K], double& dA_part, Contribution&& contribution) {
  // Forward recurrence inside the segment: a_h[i] = a_t h_{t-1} of item i.
  const float A_log2 = A * kLog2e;
  float a[K];
  Affine lane_map = identity_map();
#pragma unroll
  for (int i = 0; i < K; ++i) {
    a[i] = i < valid ? exp2f(dt[i] * A_log2) : 1.f;
    lane_map = compose(Affine{a[i], dt[i] * u(i) * B(i)}, lane_map);
  }
  float h = state_before_lane(warp_scan(lane_map, lane), h_start, lane);
  float a_h[K];
#pragma unroll
  for (int i = 0; i < K; ++i) {
    a_h[i] = a[i] * h;
    h = fmaf(dt[i] * u(i), B(i), a_h[i]);
  }

  // Adjoint, backwards: item i maps the inflow c (= a_{t+1} g_{t+1}) to a_t (c + dout_t), g_t = c + dout_t.
  Affine lane_reverse = identity_map();
#pragma unroll
  for (int i = K - 1; i >= 0; --i) lane_reverse = compose(Affine{a[i], a[i] * dout(i)}, lane_reverse);
  inflow = inflow_after_lane(warp_reverse_scan(lane_reverse, lane), inflow, lane);

  // Gradients, item by item as g_t comes.
#pragma unroll
  for (int i = K - 1; i >= 0; --i) {
    const float g = dout(i) + inflow;
    inflow = a[i] * g;
    const float g_dt = g * dt[i];
    ddt[i] = fmaf(g, fmaf(A, a_h[i], B(i) * u(i)), ddt[i]);
    dA_part = fma(static_cast<double>(g_dt), static_cast<double>(a_h[i]), dA_part);
    du[i] = fmaf(g_dt, B(i), du[i]);
    contribution(i, g_dt * u(i), dy(i) * fmaf(dt[i] * u(i), B(i), a_h[i]));
  }
  return __shfl_sync(kFullMask, inflow, 0);
}

// Sums the block's warps' dB and dC terms of one segment and state ([warps][2][kSegment] floats at `terms`: dB,
// then dC) in warp order, and adds them to the kSegment floats at dB_row and dC_row (16-byte aligned; dC absent in
// states mode), or, when deterministic, stores them there: every element once. Every thread of the block calls
// it, after a barrier that follows the warps' writes of `terms`.
template <int kSegment, bool kStates>
__device__ __forceinline__ void add_warp_terms(const float* terms, int warps, float* dB_row, float* dC_row,
                                               bool deterministic) {
  constexpr int kVectors = (kStates ? 1 : 2) * kSegment / 4;
  const float4* sums = reinterpret_cast<const float4*>(terms);
  for (int j = threadIdx.x; j < kVectors; j += blockDim.x) {
    float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int w = 0; w < warps; ++w) {
      const float4 v = sums[w * (2 * kSegment / 4) + j];
      s.x += v.x;
      s.y += v.y;
      s.z += v.z;
      s.w += v.w;
    }
    const int item = 4 * j;
    float* target = (item < kSegment ? dB_row : dC_row) + item % kSegment;
    if (deterministic) {
      *reinterpret_cast<float4*>(target) = s;
    } else {
      atomic_add4(target, s);
    }
  }
}

// After a segment's states: turns the lane's ddt (the gradient of dt) into the gradient of delta (times the
// softplus derivative), and returns its terms of dD (dy u) and ddelta_bias over the valid items. dy(i), u(i): item i.
template <typename T, bool kSoftplus, int K, typename Dy, typename U>
__device__ __forceinline__ float2 delta_gradients(const Items<T, K>& delta, float bias, int valid, Dy&& dy, U&& u,
                                                  float (&ddt)[K]) {
  float dD_part = 0.f, dbias_part = 0.f;
#pragma unroll
  for (int i = 0; i < K; ++i) {
    if constexpr (kSoftplus) ddt[i] *= softplus_derivative(delta[i] + bias);
    if (i < valid) {
      dD_part = fmaf(dy(i), u(i), dD_part);
      dbias_part += ddt[i];
    }
  }
  return make_float2(dD_part, dbias_part);
}

// A row's sum at `slot` of its N + 2 row sums (dA[n], then dD, then ddelta_bias): added to `output` (nullptr: an
// absent dD or ddelta_bias), or, when deterministic, stored at row_sums[slot] for row_sums_to_output_kernel, every
// slot (0 for an absent output): that kernel reads them all.
__device__ __forceinline__ void add_row_sum(bool deterministic, float* row_sums, int64_t slot, float* output,
                                            double value) {
  if (deterministic) {
    row_sums[slot] = static_cast<float>(value);
  } else if (output != nullptr) {
    atomicAdd(output, static_cast<float>(value));
  }
}

// A lane's sums over the segments of its row, in double: dD, ddelta_bias and, for d_state 1, dA (for more states,
// each (segment, n)'s dA terms are summed over the warp at once, as the lane cannot keep N sums).
struct LaneSums {
  double dD, dbias, dA;
};

template <typename T, int kN, bool kStates, bool kHasD, bool kSoftplus>
__global__ void __launch_bounds__(kBwdWarps * 32, 2)
    selective_scan_bwd_kernel(const __grid_constant__ SelectiveScanBwdParams bp) {
  const SelectiveScanParams& p = bp.fwd;
  // Shared memory: [2][warps][2][kSegment] floats, each warp's dB and dC contributions of one (segment, n),
  // double-buffered; per warp and lane its LaneSums; per warp one double per n, its row's dA summed over the
  // segments (d_state > 1); then per warp one float per n: the state carried forward in the first pass, the
  // adjoint carried backward in the second.
  //
  // dA, dD and ddelta_bias sum a row's L terms in double (a lane's terms of a segment in float32, the dA terms as
  // exact double products), so that a row whose terms nearly cancel loses little to the summation; then one float
  // atomic per row. The double sums live in shared memory: in registers they would spill.
  extern __shared__ float4 shared_storage[];
  constexpr int kItems = bwd_items(kN == 1, sizeof(T) == 4), kSegment = 32 * kItems;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const Row row = locate_row(p);

  const int64_t L = p.seqlen;
  const int64_t N = kN > 0 ? kN : p.dstate;
  const int64_t n_seg = num_segments(L, kSegment);
  const int64_t row_len = row.active ? L : 0;  // an inactive warp loads, stores and adds nothing
  float* contributions = reinterpret_cast<float*>(shared_storage);
  LaneSums* all_lane_sums = reinterpret_cast<LaneSums*>(contributions + 2 * warps * 2 * kSegment);  // [warps * 32]
  double* dA_sums = reinterpret_cast<double*>(all_lane_sums + warps * 32);                          // [warps][N]
  float* carries = reinterpret_cast<float*>(dA_sums + warps * N);                                   // [warps][N]
  LaneSums& lane_sums = all_lane_sums[threadIdx.x];
  double* dA_sum = dA_sums + warp * N;
  float* carry = carries + warp * N;

  const BwdWorkspace ws = bwd_workspace_layout(bp);
  float* workspace = static_cast<float*>(bp.workspace);
  const int64_t row_index = row.b * p.dim + row.d;
  // The state after each segment but the last, [seg][n], read if active: the forward's, or the first pass's.
  float* recomputed = bp.checkpoints ? nullptr : workspace + ws.checkpoint_offset + row_index * (n_seg - 1) * N;
  const float* checkpoints =
      bp.checkpoints ? static_cast<const float*>(bp.checkpoints) + row_index * (n_seg - 1) * N : recomputed;
  const int64_t bg = row.b * p.n_groups + row.g;
  const int64_t part = bp.deterministic ? static_cast<int64_t>(blockIdx.x) % ws.parts : 0;  // the channel tile
  float* dB_sum = workspace + ws.dB_offset + part * ws.part_stride + bg * N * ws.padded_len;
  float* dC_sum = workspace + ws.dC_offset + part * ws.part_stride + bg * N * ws.padded_len;
  float* row_sums = workspace + ws.row_sums_offset + row_index * (N + 2);  // deterministic: dA[n], dD, ddelta_bias

  const RowInputs<T> in_row(p, row, kStates, kHasD);
  const T *u = in_row.u, *delta = in_row.delta, *B = in_row.B, *C = in_row.C;
  const float* A = in_row.A;
  const float D = in_row.D, bias = in_row.bias;
  // grad_out is contiguous: dy (b, dim, L), or dstates (b, dim, N, L) in states mode.
  const T* dy = static_cast<const T*>(bp.grad_out) + row_index * L;
  const T* dstates = static_cast<const T*>(bp.grad_out) + row_index * N * L;
  T* du = static_cast<T*>(bp.du) + row_index * L;
  T* ddelta = static_cast<T*>(bp.ddelta) + row_index * L;

  auto first_item = [&](int64_t seg) { return seg * kSegment + lane * kItems; };
  auto load_segment = [&](int64_t seg, bool with_dy) {
    const int64_t t0 = first_item(seg);
    const int valid = valid_items<kItems>(row_len, t0);
    SegmentInputs<T, kItems> in;
    in.u = load_items<kItems>(u + t0, valid);
    in.delta = load_items<kItems>(delta + t0, valid);
    if (with_dy) in.dy = load_items<kItems>(dy + t0, valid);
    return in;
  };
  auto load_state = [&](int64_t seg, int64_t n, bool with_C) {
    const int64_t t0 = first_item(seg);
    const int valid = valid_items<kItems>(row_len, t0);
    StateInputs<T, kItems> in;
    in.B = load_items<kItems>(B + n * p.B_dstate_stride + t0, valid);
    if (with_C) in.C = load_items<kItems>(kStates ? dstates + n * L + t0 : C + n * p.C_dstate_stride + t0, valid);
    in.A = A[n * p.A_dstate_stride];
    return in;
  };

  // First pass, without the forward's checkpoints: recomputed[seg][n] = the state after segment seg, for
  // seg < n_seg - 1. Lane 0 alone keeps the running state in `carry`.
  if (bp.checkpoints == nullptr && row.active && n_seg > 1) {
    for (int64_t n = lane; n < N; n += 32) carry[n] = 0.f;
    __syncwarp();
    SegmentInputs<T, kItems> next_segment = load_segment(0, false);
    StateInputs<T, kItems> next_state = load_state(0, 0, false);
    for (int64_t seg = 0; seg < n_seg - 1; ++seg) {
      const SegmentInputs<T, kItems> in = next_segment;
      if (seg + 1 < n_seg - 1) next_segment = load_segment(seg + 1, false);
      const int valid = valid_items<kItems>(row_len, first_item(seg));  // kItems: only the last segment has a tail
      float dt[kItems], dtu[kItems];
      time_steps<T, kSoftplus>(in.delta, bias, valid, dt);
#pragma unroll
      for (int i = 0; i < kItems; ++i) dtu[i] = dt[i] * in.u[i];
#pragma unroll 1
      for (int64_t n = 0; n < N; ++n) {
        const StateInputs<T, kItems> st = next_state;
        if (n + 1 < N) {
          next_state = load_state(seg, n + 1, false);
        } else if (seg + 1 < n_seg - 1) {
          next_state = load_state(seg + 1, 0, false);
        }
        const float A_log2 = st.A * kLog2e;
        Affine lane_map = identity_map();
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
          lane_map = compose(Affine{exp2f(dt[i] * A_log2), dtu[i] * st.B[i]}, lane_map);
        }
        const Affine inclusive = warp_scan(lane_map, lane);
        const Affine segment{__shfl_sync(kFullMask, inclusive.a, 31), __shfl_sync(kFullMask, inclusive.b, 31)};
        if (lane == 0) {
          const float h = fmaf(segment.a, carry[n], segment.b);
          carry[n] = h;
          recomputed[seg * N + n] = h;
        }
      }
    }
    __syncwarp();  // lane 0's last carry writes happen before the reset below
  }

  // Second pass, segments from last to first. All warps of the block take part in every barrier.
  for (int64_t n = lane; n < N; n += 32) {
    carry[n] = 0.f;  // now: a_t g_t flowing into the segment before
    dA_sum[n] = 0.0;
  }
  __syncthreads();  // also orders this warp's checkpoint writes before its reads

  lane_sums = LaneSums{0.0, 0.0, 0.0};
  int buffer = 0;
  // A (segment, n)'s inputs are loaded one step ahead, with the state at its start (its checkpoint): its load
  // would otherwise wait on memory right after the warp scan.
  auto load_checkpoint = [&](int64_t seg, int64_t n) {
    return row.active && seg > 0 ? checkpoints[(seg - 1) * N + n] : 0.f;
  };
  SegmentInputs<T, kItems> next_segment = load_segment(n_seg - 1, !kStates);
  StateInputs<T, kItems> next_state = load_state(n_seg - 1, 0, true);
  float next_h_start = load_checkpoint(n_seg - 1, 0);
  for (int64_t seg = n_seg - 1; seg >= 0; --seg) {
    // u and dy stay in their input type and are converted where used: fewer live registers.
    const SegmentInputs<T, kItems> in = next_segment;
    if (seg > 0) next_segment = load_segment(seg - 1, !kStates);
    const int64_t t0 = first_item(seg);
    const int valid = valid_items<kItems>(row_len, t0);
    auto u_at = [&](int i) { return in.u[i]; };
    auto dy_at = [&](int i) {
      if constexpr (kStates) {
        return 0.f;
      } else {
        return in.dy[i];
      }
    };

    float dt[kItems], du_acc[kItems], ddt[kItems];
    time_steps<T, kSoftplus>(in.delta, bias, valid, dt);
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      du_acc[i] = kHasD ? D * dy_at(i) : 0.f;
      ddt[i] = 0.f;
    }

#pragma unroll 1
    for (int64_t n = 0; n < N; ++n) {
      const StateInputs<T, kItems> st = next_state;
      const float h_start = next_h_start;
      if (n + 1 < N) {
        next_state = load_state(seg, n + 1, true);
        next_h_start = load_checkpoint(seg, n + 1);
      } else if (seg > 0) {
        next_state = load_state(seg - 1, 0, true);
        next_h_start = load_checkpoint(seg - 1, 0);
      }
      const float A_n = st.A;
      // dout_t: dy_t C[n, t], or the states' gradient.
      auto dout_at = [&](int i) { return kStates ? st.C[i] : dy_at(i) * st.C[i]; };
      auto B_at = [&](int i) { return st.B[i]; };

      // This warp's dB, dC contributions (four items at a time) go into shared memory.
      float* mine = contributions + ((buffer * warps + warp) * 2) * kSegment + lane * kItems;
      static_assert(kItems % 4 == 0, "dB, dC go to shared memory as float4");
      double dA_part = 0.0;
      float dB_items[4], dC_items[4];
      const float into_previous = state_backward(
          dt, u_at, B_at, dout_at, dy_at, A_n, valid, h_start, carry[n], lane, du_acc, ddt, dA_part,
          [&](int i, float dB_i, float dC_i) {
            dB_items[i % 4] = dB_i;
            dC_items[i % 4] = dC_i;
            if (i % 4 == 0) {
              reinterpret_cast<float4*>(mine)[i / 4] = make_float4(dB_items[0], dB_items[1], dB_items[2], dB_items[3]);
              if constexpr (!kStates) {
                reinterpret_cast<float4*>(mine + kSegment)[i / 4] =
                    make_float4(dC_items[0], dC_items[1], dC_items[2], dC_items[3]);
              }
            }
          });
      __syncwarp();  // every lane has read carry[n] before lane 0 overwrites it (read again after a barrier)
      if (lane == 0) carry[n] = into_previous;
      if constexpr (kN == 1) {
        lane_sums.dA += dA_part;
      } else {
        const double dA_segment = warp_sum(dA_part);
        if (lane == 0) dA_sum[n] += dA_segment;
      }

      // Sum the warps' contributions and add them to the (batch, group) row of dB and dC (store them into this
      // tile's row, when deterministic: every element of it once). The buffers alternate:
      // a buffer is written again two steps later, after the next step's barrier, which every thread reaches
      // only once it has finished reading it here.
      __syncthreads();
      const int64_t at = n * ws.padded_len + seg * kSegment;
      add_warp_terms<kSegment, kStates>(contributions + buffer * warps * 2 * kSegment, warps, dB_sum + at, dC_sum + at,
                                        bp.deterministic);
      buffer ^= 1;
    }

    const float2 D_bias_parts = delta_gradients<T, kSoftplus>(in.delta, bias, valid, dy_at, u_at, ddt);
    lane_sums.dD += D_bias_parts.x;
    lane_sums.dbias += D_bias_parts.y;
    store_items(du + t0, valid, du_acc);
    store_items(ddelta + t0, valid, ddt);
  }

  // The row's sums.
  float* dA = static_cast<float*>(bp.dA) + row.d * N;
  if constexpr (kN == 1) {
    const double dA_row = warp_sum(lane_sums.dA);
    if (lane == 0 && row.active) add_row_sum(bp.deterministic, row_sums, 0, dA, dA_row);
  } else {
    __syncwarp();  // lane 0's last dA_sum writes are visible to the whole warp
    if (row.active) {
      for (int64_t n = lane; n < N; n += 32) add_row_sum(bp.deterministic, row_sums, n, dA + n, dA_sum[n]);
    }
  }
  const double dD_row = kHasD ? warp_sum(lane_sums.dD) : 0.0;
  const double dbias_row = bp.ddelta_bias ? warp_sum(lane_sums.dbias) : 0.0;
  if (lane == 0 && row.active) {
    add_row_sum(bp.deterministic, row_sums, N, kHasD ? static_cast<float*>(bp.dD) + row.d : nullptr, dD_row);
    add_row_sum(bp.deterministic, row_sums, N + 1,
                bp.ddelta_bias ? static_cast<float*>(bp.ddelta_bias) + row.d : nullptr, dbias_row);
  }
}

// The backward for rows of one segment (L <= bwd_segment(p)) and d_state 1, as the forward's short kernel does
// it: a warp takes kShortRows rows of one (batch, group) one after the other, with the next row's inputs loaded
// while one is computed, and loads the rows' common B and C once. Its dB and dC terms are summed over its rows in
// its lanes' own slots of shared memory (registers would spill), and the block adds its warps' sums with one
// barrier (the kernel above: one per row). A warp without a row (past its group) still takes part in the barrier,
// with zero terms.
template <typename T, bool kStates, bool kHasD, bool kSoftplus>
__global__ void __launch_bounds__(kBwdWarps * 32, 2)
    selective_scan_short_bwd_kernel(const __grid_constant__ SelectiveScanBwdParams bp) {
  const SelectiveScanParams& p = bp.fwd;
  extern __shared__ float4 shared_storage[];  // [warps][2][kSegment] floats: each warp's dB and dC terms
  constexpr int kItems = bwd_items(true, sizeof(T) == 4), kSegment = 32 * kItems;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  // No early return for a warp without rows: it takes part in the barrier below.
  const ShortRows<T, kItems, kStates, kHasD> warp_rows(p, lane);
  const int rows = warp_rows.rows, valid = warp_rows.valid;
  using Step = typename ShortRows<T, kItems, kStates, kHasD>::Step;
  const Items<T, kItems>&B = warp_rows.B, &C = warp_rows.C;
  // Each row's in.dy: dy, or in states mode the states' gradient ((b, dim, 1, L): the layout of dy).
  const T* grad_out = static_cast<const T*>(bp.grad_out);
  const BwdWorkspace ws = bwd_workspace_layout(bp);
  float* workspace = static_cast<float*>(bp.workspace);

  // The warp's terms, summed over its rows: this lane's items of dB, then of dC.
  float* terms = reinterpret_cast<float*>(shared_storage);
  float* mine = terms + warp * 2 * kSegment + lane * kItems;
#pragma unroll
  for (int i = 0; i < kItems; ++i) mine[i] = mine[kSegment + i] = 0.f;
  Step next = warp_rows.load(0, grad_out);  // without rows: nothing from u, delta, dy (valid 0), in-range scalars
  for (int j = 0; j < rows; ++j) {
    const Step r = next;
    if (j + 1 < rows) next = warp_rows.load(j + 1, grad_out);
    auto u_at = [&](int i) { return r.in.u[i]; };
    auto B_at = [&](int i) { return B[i]; };
    auto dy_at = [&](int i) { return kStates ? 0.f : r.in.dy[i]; };
    auto dout_at = [&](int i) { return kStates ? r.in.dy[i] : r.in.dy[i] * C[i]; };
    float dt[kItems], du[kItems], ddt[kItems];
    time_steps<T, kSoftplus>(r.in.delta, r.bias, valid, dt);
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      du[i] = kHasD ? r.D * dy_at(i) : 0.f;
      ddt[i] = 0.f;
    }
    double dA_part = 0.0;
    state_backward(dt, u_at, B_at, dout_at, dy_at, r.A, valid, 0.f, 0.f, lane, du, ddt, dA_part,
                   [&](int i, float dB_i, float dC_i) {
                     mine[i] += dB_i;
                     mine[kSegment + i] += dC_i;
                   });
    const float2 D_bias_parts = delta_gradients<T, kSoftplus>(r.in.delta, r.bias, valid, dy_at, u_at, ddt);
    const int64_t t_row = warp_rows.index(j) * p.seqlen + warp_rows.t0;
    store_items(static_cast<T*>(bp.du) + t_row, valid, du);
    store_items(static_cast<T*>(bp.ddelta) + t_row, valid, ddt);
    const double dA_row = warp_sum(dA_part);
    const double dD_row = kHasD ? warp_sum(static_cast<double>(D_bias_parts.x)) : 0.0;
    const double dbias_row = bp.ddelta_bias ? warp_sum(static_cast<double>(D_bias_parts.y)) : 0.0;
    if (lane == 0) {
      const int64_t d = warp_rows.d(j);
      float* row_sums = workspace + ws.row_sums_offset + warp_rows.index(j) * (1 + 2);  // N + 2 sums, N = 1
      add_row_sum(bp.deterministic, row_sums, 0, static_cast<float*>(bp.dA) + d, dA_row);
      add_row_sum(bp.deterministic, row_sums, 1, kHasD ? static_cast<float*>(bp.dD) + d : nullptr, dD_row);
      add_row_sum(bp.deterministic, row_sums, 2, bp.ddelta_bias ? static_cast<float*>(bp.ddelta_bias) + d : nullptr,
                  dbias_row);
    }
  }

  __syncthreads();
  const int64_t bg = warp_rows.row.b * p.n_groups + warp_rows.row.g;
  const int64_t part = bp.deterministic ? static_cast<int64_t>(blockIdx.x) % ws.parts : 0;  // the channel tile
  add_warp_terms<kSegment, kStates>(terms, warps, workspace + ws.dB_offset + part * ws.part_stride + bg * ws.padded_len,
                                    workspace + ws.dC_offset + part * ws.part_stride + bg * ws.padded_len,
                                    bp.deterministic);
}

// out[r, t] = sum over the parts k, in order, of sums[k, r, t] for t < L, converted to T: the (b, G, N, L)
// gradients from their padded float32 sums (one part, or one per channel tile when deterministic).
template <typename T>
__global__ void padded_sums_to_output_kernel(const float* __restrict__ sums, T* __restrict__ out, int64_t rows,
                                             int64_t L, int64_t padded_len, int64_t parts, int64_t part_stride) {
  const int64_t total = rows * L;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t r = i / L;
    const float* element = sums + r * padded_len + (i - r * L);
    float sum = element[0];
    for (int64_t k = 1; k < parts; ++k) sum += element[k * part_stride];
    out[i] = from_float<T>(sum);
  }
}

// Deterministic mode: dA (dim, N), dD and ddelta_bias (dim,) (each may be absent but dA) as the sums over the
// batch, in a fixed order, of the row sums (b, dim, N + 2), in double.
constexpr int kRowSumsWarps = 8;

static __global__ void __launch_bounds__(kRowSumsWarps * 32)
    row_sums_to_output_kernel(const float* __restrict__ row_sums, float* dA, float* dD, float* dbias, int64_t batch,
                              int64_t dim, int64_t N) {
  ordered_column_sums<double, kRowSumsWarps>(row_sums, batch, dim * (N + 2), [&](int64_t i, double sum) {
    const int64_t d = i / (N + 2), slot = i - d * (N + 2);
    float* out = slot < N ? dA + d * N + slot : slot == N ? (dD ? dD + d : nullptr) : (dbias ? dbias + d : nullptr);
    if (out != nullptr) *out = static_cast<float>(sum);
  });
}

// ---- launchers (instantiated per dtype) ----------------------------------------------------------------------

// Channels per block for `max_warps`, and the grid: (batch, group, tile of channels).
struct Launch {
  int warps;
  unsigned int blocks;
};

inline Launch launch_shape(const SelectiveScanParams& p, int max_warps, int rows_per_warp, const char* kernel) {
  if (p.dstate > kSelectiveScanCudaMaxDState) {  // the registration checks it first, with the user's message
    throw std::runtime_error(std::string(kernel) + ": d_state " + std::to_string(p.dstate) + " exceeds " +
                             std::to_string(kSelectiveScanCudaMaxDState));
  }
  const ChannelTiles tiling = channel_tiles(p, max_warps, rows_per_warp);
  return {tiling.warps, grid_size(p.batch * p.n_groups * tiling.tiles, kernel)};
}

// Calls f(kN, kStates, kHasD, kSoftplus) as std::integral_constant values: the kernel flags of params p.
template <typename F>
void dispatch_flags(const SelectiveScanParams& p, F&& f) {
  bool_switch(p.dstate == 1, [&](auto one_state) {
    bool_switch(p.states_mode, [&](auto states) {
      bool_switch(p.D != nullptr, [&](auto has_D) {
        bool_switch(p.delta_softplus, [&](auto softplus) {
          constexpr bool kStates = decltype(states)::value;
          f(std::integral_constant<int, decltype(one_state)::value ? 1 : 0>{}, states,
            std::integral_constant<bool, decltype(has_D)::value && !kStates>{}, softplus);
        });
      });
    });
  });
}

// Requires batch, dim and L > 0.
template <typename T>
void selective_scan_fwd_launch(const SelectiveScanParams& p, cudaStream_t stream) {
  const bool short_rows = p.dstate == 1 && p.seqlen <= kFwdSegment;
  const Launch shape = launch_shape(p, kFwdWarps, short_rows ? kShortRows : 1, "selective_scan forward");
  const size_t shared_bytes = static_cast<size_t>(shape.warps) * p.dstate * sizeof(float);
  dispatch_flags(p, [&](auto n, auto states, auto has_D, auto softplus) {
    constexpr bool kStates = decltype(states)::value, kHasD = decltype(has_D)::value;
    constexpr bool kSoftplus = decltype(softplus)::value;
    if constexpr (decltype(n)::value == 1) {
      if (short_rows) {
        selective_scan_short_fwd_kernel<T, kStates, kHasD, kSoftplus><<<shape.blocks, shape.warps * 32, 0, stream>>>(p);
        return;
      }
    }
    selective_scan_fwd_kernel<T, decltype(n)::value, kStates, kHasD, kSoftplus>
        <<<shape.blocks, shape.warps * 32, shared_bytes, stream>>>(p);
  });
  check_launch("selective_scan forward");
}

// Requires batch, dim and L > 0, and bp.workspace of bwd_workspace_layout(bp).total floats.
template <typename T>
void selective_scan_bwd_launch(const SelectiveScanBwdParams& bp, cudaStream_t stream) {
  const SelectiveScanParams& p = bp.fwd;
  const int rows_per_warp = bwd_rows_per_warp(p);
  const Launch shape = launch_shape(p, kBwdWarps, rows_per_warp, "selective_scan backward");
  const BwdWorkspace ws = bwd_workspace_layout(bp);
  float* workspace = static_cast<float*>(bp.workspace);
  if (!bp.deterministic) {  // the dB, dC sums take atomic adds; deterministic blocks store every element once
    check(cudaMemsetAsync(workspace, 0, ws.checkpoint_offset * sizeof(float), stream), "selective_scan_backward memset");
  }
  const size_t terms_bytes = static_cast<size_t>(shape.warps) * 2 * bwd_segment(p) * sizeof(float);
  const size_t row_bytes = 32 * sizeof(LaneSums) + p.dstate * (sizeof(double) + sizeof(float));  // per warp
  const size_t shared_bytes = 2 * terms_bytes + static_cast<size_t>(shape.warps) * row_bytes;
  dispatch_flags(p, [&](auto n, auto states, auto has_D, auto softplus) {
    constexpr bool kStates = decltype(states)::value, kHasD = decltype(has_D)::value;
    constexpr bool kSoftplus = decltype(softplus)::value;
    if constexpr (decltype(n)::value == 1) {
      if (rows_per_warp > 1) {
        selective_scan_short_bwd_kernel<T, kStates, kHasD, kSoftplus>
            <<<shape.blocks, shape.warps * 32, terms_bytes, stream>>>(bp);
        return;
      }
    }
    selective_scan_bwd_kernel<T, decltype(n)::value, kStates, kHasD, kSoftplus>
        <<<shape.blocks, shape.warps * 32, shared_bytes, stream>>>(bp);
  });
  check_launch("selective_scan backward");

  const int64_t rows = p.batch * p.n_groups * p.dstate;
  const int threads = 256;
  const unsigned int blocks = grid_stride_blocks(ceil_div(rows * p.seqlen, threads), 8);
  padded_sums_to_output_kernel<T><<<blocks, threads, 0, stream>>>(
      workspace + ws.dB_offset, static_cast<T*>(bp.dB), rows, p.seqlen, ws.padded_len, ws.parts, ws.part_stride);
  if (!p.states_mode) {
    padded_sums_to_output_kernel<T><<<blocks, threads, 0, stream>>>(
        workspace + ws.dC_offset, static_cast<T*>(bp.dC), rows, p.seqlen, ws.padded_len, ws.parts, ws.part_stride);
  }
  check_launch("selective_scan backward dB/dC");
  if (bp.deterministic) {
    row_sums_to_output_kernel<<<column_sums_grid(p.dim * (p.dstate + 2)), kRowSumsWarps * 32, 0, stream>>>(
        workspace + ws.row_sums_offset, static_cast<float*>(bp.dA), static_cast<float*>(bp.dD),
        static_cast<float*>(bp.ddelta_bias), p.batch, p.dim, p.dstate);
    check_launch("selective_scan backward dA/dD/ddelta_bias");
  }
}

extern template void selective_scan_fwd_launch<float>(const SelectiveScanParams&, cudaStream_t);
extern template void selective_scan_fwd_launch<__half>(const SelectiveScanParams&, cudaStream_t);
extern template void selective_scan_fwd_launch<__nv_bfloat16>(const SelectiveScanParams&, cudaStream_t);
extern template void selective_scan_bwd_launch<float>(const SelectiveScanBwdParams&, cudaStream_t);
extern template void selective_scan_bwd_launch<__half>(const SelectiveScanBwdParams&, cudaStream_t);
extern template void selective_scan_bwd_launch<__nv_bfloat16>(const SelectiveScanBwdParams&, cudaStream_t);

}  // namespace mamba_adaptor::cuda::scan
