// Kernels with the faults the emulator must expose, run by tests/test_cuda_emulated.py so that its passing
// kernels mean something: a missing barrier, a barrier not all threads reach, a block split between two
// barriers, a shuffle naming an exited lane, too much shared memory for a launch, shared memory read before it
// is written, (in the AddressSanitizer build, where it aborts the process) a vector load off its alignment and
// (in the ThreadSanitizer build) data races in shared and global memory next to accesses that barriers or
// atomics make race-free.
#include <cstdio>
#include <exception>

namespace {

__global__ void unsynchronised_broadcast(float* out) {
  __shared__ float value[1];
  if (threadIdx.x == 0) value[0] = 1.f;
  out[threadIdx.x] = value[0];  // no __syncthreads() between the write and the reads
}

__global__ void divergent_barrier(float* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncwarp();
  }
  out[threadIdx.x] = 1.f;
}

__global__ void barriers_at_two_places(float* out) {
  if (threadIdx.x < 16) {
    out[threadIdx.x] = 1.f;
    __syncthreads();
  } else {
    __syncthreads();
    out[threadIdx.x] = 2.f;
  }
}

__global__ void shuffle_from_exited_lane(float* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_sync(0xffffffffu, static_cast<float>(threadIdx.x), 0);
}

__global__ void read_dynamic_shared(float* out) {
  extern __shared__ float buffer[];
  out[threadIdx.x] = buffer[threadIdx.x];  // never written
}

__global__ void misaligned_vector_load(float* out) {
  const float4 v = reinterpret_cast<const float4*>(out + 1)[0];  // a float4 at 4 bytes past a 16-byte boundary
  out[threadIdx.x + 8] = v.x;
}

// Blocks 0 and 1 both add to out[0] without an atomic: a race between blocks (global memory).
__global__ void racy_global_sum(float* out) {
  if (threadIdx.x == 0) out[0] += 1.f;
}

// The same pattern made race-free: each warp passes values through shared memory across __syncwarp and
// __syncthreads, and the blocks add to out[1] atomically.
__global__ void synchronised_exchange(float* out) {
  __shared__ float lane_value[64];
  __shared__ float warp_sum[2];
  lane_value[threadIdx.x] = static_cast<float>(threadIdx.x);
  __syncwarp();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    float sum = 0.f;
    for (int l = 0; l < 32; ++l) sum += lane_value[warp * 32 + l];
    warp_sum[warp] = sum;
  }
  __syncthreads();
  if (threadIdx.x == 0) atomicAdd(out + 1, warp_sum[0] + warp_sum[1]);
}

}  // namespace

// Runs fault `which` (0 to 8 above, 4 being read_dynamic_shared with a valid launch) writing `out` (64 floats);
// returns 0, 1 with the launch error or 2 with the emulator's fault in `message`.
extern "C" __attribute__((visibility("default"))) int mamba_emu_selftest(int which, float* out, char* message,
                                                                         int size) {
  try {
    switch (which) {
      case 0: unsynchronised_broadcast<<<1, 64>>>(out); break;
      case 1: divergent_barrier<<<1, 64>>>(out); break;
      case 2: shuffle_from_exited_lane<<<1, 32>>>(out); break;
      case 3: read_dynamic_shared<<<1, 32, 64 * 1024>>>(out); break;  // over 48 KiB without the attribute
      case 4: read_dynamic_shared<<<1, 32, 32 * sizeof(float)>>>(out); break;
      case 5: misaligned_vector_load<<<1, 32>>>(out); break;
      case 6: racy_global_sum<<<2, 32>>>(out); break;
      case 7: synchronised_exchange<<<2, 64>>>(out); break;
      default: barriers_at_two_places<<<1, 64>>>(out); break;
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) {
      snprintf(message, size, "%s", cudaGetErrorString(err));
      return 1;
    }
    return 0;
  } catch (const std::exception& e) {
    snprintf(message, size, "%s", e.what());
    return 2;
  }
}
