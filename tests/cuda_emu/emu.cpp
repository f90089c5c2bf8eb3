// The emulator's scheduler, shared memory and the few CUDA runtime calls the kernels' launchers make (see emu.h).
#include "emu.h"

#include <sys/mman.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

// ---- fibers: a stack and a saved stack pointer; emu_switch saves the callee-saved registers, the SSE and x87
// control words on the current stack, stores its pointer to *from and resumes the stack at `to`.
extern "C" void emu_switch(void** from, void* to);
asm(R"(
  .text
  .globl emu_switch
  .type emu_switch, @function
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch, .-emu_switch
)");

namespace emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 4096;  // an unmapped page below each stack: an overflow faults at once

// What an emulated device reports.
struct DeviceProfile {
  int sm_count, smem_optin;
  int compute_capability;  // 10 * major + minor; kernels launch on 80 and newer (build.py's CUDA_ARCHS)
  int driver_cuda;         // the newest CUDA the driver supports, as cudaDriverGetVersion gives it
};
// 0: an H100. 1: 99 KiB of shared memory per block, like an A6000. 2: a T4, which the kernels are not built
// for. 3: an H100 whose driver is older than the CUDA the kernels were built with.
constexpr DeviceProfile kDevices[] = {
    {132, 227 * 1024, 90, CUDART_VERSION}, {84, 99 * 1024, 86, CUDART_VERSION},
    {40, 64 * 1024, 75, CUDART_VERSION},   {132, 227 * 1024, 90, 12080}};
constexpr int kDeviceCount = sizeof(kDevices) / sizeof(kDevices[0]);
constexpr size_t kDefaultSmem = 48 * 1024;

enum class State { Ready, AtBarrier, AtWarpOp, Done };

struct Thread {
  void* sp = nullptr;
  char* mapping = nullptr;
  uint3 index{};
  int linear = 0;
  State state = State::Ready;
  WarpOp op = WarpOp::Sync;
  unsigned mask = 0;
  uint64_t payload = 0;
  int arg = 0, width = 32;
};

struct Schedule {
  int mode = 0;  // 0: threads in index order, 1: in reverse order, 2: shuffled with `seed`
  uint64_t seed = 0;
};

struct BlockState {
  std::vector<Thread> threads;
  Thread* current = nullptr;
  void* scheduler_sp = nullptr;
  const std::function<void()>* body = nullptr;
  dim3 block_index, block_dim, grid_dim;
  void* dynamic_smem = nullptr;
  std::map<int, void*> static_smem;
  size_t static_bytes = 0;
  std::string fault;  // set by a thread that found an error on its own stack; raised by the scheduler
};

thread_local BlockState* g_block = nullptr;
std::mutex g_launch_mutex;  // one grid at a time; also guards g_max_dynamic_smem
int g_device = 0;
Schedule g_schedule;
std::map<const void*, int> g_max_dynamic_smem;  // cudaFuncAttributeMaxDynamicSharedMemorySize per kernel
thread_local cudaError_t g_last_error = cudaSuccess;  // per host thread, as in CUDA
thread_local std::string g_last_error_text;

[[noreturn]] void fault(const std::string& what) { throw std::runtime_error("CUDA emulator: " + what); }

std::string thread_name(const Thread& t) {
  std::ostringstream s;
  s << "thread " << t.linear << " (warp " << t.linear / 32 << ", lane " << t.linear % 32 << ") of block "
    << g_block->block_index.x;
  return s.str();
}

void switch_to(void** save, void* target) { emu_switch(save, target); }

void thread_main() {
  BlockState& blk = *g_block;
  (*blk.body)();
  blk.current->state = State::Done;
  switch_to(&blk.current->sp, blk.scheduler_sp);
  __builtin_unreachable();
}

// A fresh stack whose first switch enters thread_main with the alignment of a called function.
void* initial_stack(char* top) {
  auto* sp = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(top) & ~uintptr_t{15});
  *--sp = 0;                                              // alignment: rsp % 16 == 8 at entry
  *--sp = reinterpret_cast<uint64_t>(&thread_main);       // emu_switch's ret
  for (int i = 0; i < 6; ++i) *--sp = 0;                  // rbp rbx r12 r13 r14 r15
  // mxcsr: exceptions masked, denormals flushed to zero (FTZ) and read as zero (DAZ), as the kernels compiled
  // with --use_fast_math treat float32 denormals; the x87 control word at its default.
  *--sp = 0x9fc0ull | (0x037full << 32);
  return sp;
}

// Yields to the scheduler; returns when the scheduler resumes this thread.
void block_current(State state) {
  Thread& t = *g_block->current;
  t.state = state;
  switch_to(&t.sp, g_block->scheduler_sp);
}

// The lanes of warp `w` at a warp op whose masks all contain them: complete it when every lane of the mask is
// there. Returns whether it completed; faults where a GPU would hang or give undefined results.
bool try_complete_warp(int w) {
  std::vector<Thread>& threads = g_block->threads;
  const int first = w * 32, lanes = std::min<int>(32, static_cast<int>(threads.size()) - first);
  Thread* leader = nullptr;
  for (int l = 0; l < lanes && !leader; ++l) {
    if (threads[first + l].state == State::AtWarpOp) leader = &threads[first + l];
  }
  if (!leader) return false;
  const unsigned mask = leader->mask;
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    if (l >= lanes) fault(thread_name(*leader) + ": warp op mask names lane " + std::to_string(l) + ", beyond the block");
    const Thread& t = threads[first + l];
    if (t.state == State::Done) fault(thread_name(*leader) + ": warp op mask names lane " + std::to_string(l) + ", which has exited");
    if (t.state != State::AtWarpOp) return false;  // not there yet (or at a block barrier: a deadlock if it stays)
    if (t.mask != mask || t.op != leader->op) {
      fault(thread_name(t) + " and " + thread_name(*leader) + " meet at different warp ops or masks");
    }
  }
  uint64_t results[32] = {};
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    const Thread& t = threads[first + l];
    const int width = t.width, base = l / width * width;
    int src = l;
    switch (t.op) {
      case WarpOp::Sync: break;
      case WarpOp::Shfl: src = base + ((t.arg % width) + width) % width; break;
      case WarpOp::ShflUp: src = l - base >= t.arg ? l - t.arg : l; break;
      case WarpOp::ShflDown: src = l - base + t.arg < width ? l + t.arg : l; break;
      case WarpOp::ShflXor: src = ((l ^ t.arg) - base) < width && (l ^ t.arg) >= base ? (l ^ t.arg) : l; break;
      case WarpOp::MatchAny: {
        unsigned peers = 0;
        for (int m = 0; m < 32; ++m) {
          if ((mask >> m & 1u) && threads[first + m].payload == t.payload) peers |= 1u << m;
        }
        results[l] = peers;
        continue;
      }
    }
    if (!(mask >> src & 1u)) fault(thread_name(t) + ": shuffles from lane " + std::to_string(src) + ", outside the mask");
    results[l] = threads[first + src].payload;
  }
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    threads[first + l].payload = results[l];
    threads[first + l].state = State::Ready;
  }
  return true;
}

std::string describe_deadlock() {
  std::ostringstream s;
  s << "block " << g_block->block_index.x << " cannot go on:";
  int shown = 0;
  for (const Thread& t : g_block->threads) {
    if (t.state == State::Done || shown >= 8) continue;
    s << " [" << thread_name(t) << (t.state == State::AtBarrier ? " at __syncthreads" : " at a warp op") << "]";
    ++shown;
  }
  return s.str() + " (threads wait at barriers that others never reach)";
}

void run_block(BlockState& blk, std::mt19937_64& rng) {
  std::vector<int> order(blk.threads.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int>(i);
  if (g_schedule.mode == 1) std::reverse(order.begin(), order.end());
  const int warps = static_cast<int>((blk.threads.size() + 31) / 32);
  while (true) {
    if (g_schedule.mode == 2) std::shuffle(order.begin(), order.end(), rng);
    bool ran = false;
    for (int i : order) {
      Thread& t = blk.threads[i];
      if (t.state != State::Ready) continue;
      blk.current = &t;
      switch_to(&blk.scheduler_sp, t.sp);
      if (!blk.fault.empty()) fault(blk.fault);
      ran = true;
    }
    if (ran) continue;
    bool released = false;
    for (int w = 0; w < warps; ++w) released = try_complete_warp(w) || released;
    if (released) continue;
    bool all_done = true, all_at_barrier = true;
    for (const Thread& t : blk.threads) {
      all_done = all_done && t.state == State::Done;
      all_at_barrier = all_at_barrier && (t.state == State::Done || t.state == State::AtBarrier);
    }
    if (all_done) return;
    if (!all_at_barrier) fault(describe_deadlock());
    for (Thread& t : blk.threads) {
      if (t.state == State::AtBarrier) t.state = State::Ready;
    }
  }
}

size_t dynamic_smem_limit(const void* kernel, size_t static_bytes) {
  const auto it = g_max_dynamic_smem.find(kernel);
  if (it != g_max_dynamic_smem.end()) return static_cast<size_t>(it->second);
  return static_bytes < kDefaultSmem ? kDefaultSmem - static_bytes : 0;
}

void set_error(cudaError_t err, const std::string& text) {
  g_last_error = err;
  g_last_error_text = text;
}

// Under a driver older than the CUDA runtime every runtime call fails, as a real one does.
bool driver_too_old() {
  if (kDevices[g_device].driver_cuda >= CUDART_VERSION) return false;
  set_error(cudaErrorInsufficientDriver, "CUDA driver version is insufficient for CUDA runtime version");
  return true;
}

struct Stacks {
  std::vector<char*> mappings;
  char* get(size_t i) {
    while (mappings.size() <= i) {
      void* m = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (m == MAP_FAILED) fault("cannot map a thread stack");
      mprotect(m, kGuardBytes, PROT_NONE);
      mappings.push_back(static_cast<char*>(m));
    }
    return mappings[i];
  }
};

}  // namespace

uint3 thread_index() { return g_block->current->index; }
dim3 block_index() { return g_block->block_index; }
dim3 block_dim() { return g_block->block_dim; }
dim3 grid_dim() { return g_block->grid_dim; }

void sync_block() { block_current(State::AtBarrier); }

uint64_t warp_op(WarpOp op, unsigned mask, uint64_t payload, int arg, int width) {
  Thread& t = *g_block->current;
  std::string error;
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) {
    error = ": shuffle width " + std::to_string(width) + " is not a power of 2 up to 32";
  } else if (!(mask >> (t.linear % 32) & 1u)) {
    error = ": calls a warp op whose mask omits its own lane";
  }
  if (!error.empty()) {
    g_block->fault = thread_name(t) + error;
    block_current(State::Done);  // never resumed: the scheduler raises the fault
  }
  t.op = op;
  t.mask = mask;
  t.payload = payload;
  t.arg = arg;
  t.width = width;
  block_current(State::AtWarpOp);
  return t.payload;
}

void* dynamic_shared_bytes() { return g_block->dynamic_smem; }

void* static_shared_bytes(int site, size_t bytes) {
  BlockState& blk = *g_block;
  auto it = blk.static_smem.find(site);
  if (it != blk.static_smem.end()) return it->second;
  void* p = std::malloc(bytes);
  std::memset(p, 0xff, bytes);
  blk.static_smem.emplace(site, p);
  blk.static_bytes += bytes;
  return p;
}

void launch(const void* kernel, dim3 grid, dim3 block, size_t dynamic_smem, const std::function<void()>& body) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  const DeviceProfile& device = kDevices[g_device];
  if (driver_too_old()) return;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || threads == 0 || threads > 1024 || grid.x > 0x7fffffffu ||
      grid.y > 65535 || grid.z > 65535) {
    set_error(cudaErrorInvalidConfiguration, "invalid launch: grid (" + std::to_string(grid.x) + ", " +
                                                 std::to_string(grid.y) + ", " + std::to_string(grid.z) +
                                                 "), " + std::to_string(threads) + " threads per block");
    return;
  }
  if (device.compute_capability < 80) {
    set_error(cudaErrorNoKernelImageForDevice, "no kernel image is available for execution on the device");
    return;
  }
  if (dynamic_smem > dynamic_smem_limit(kernel, 0) || dynamic_smem > static_cast<size_t>(device.smem_optin)) {
    set_error(cudaErrorInvalidValue, "launch with " + std::to_string(dynamic_smem) +
                                         " bytes of dynamic shared memory, over the kernel's limit of " +
                                         std::to_string(dynamic_smem_limit(kernel, 0)));
    return;
  }
  thread_local Stacks stacks;
  std::mt19937_64 rng(g_schedule.seed);
  BlockState blk;
  blk.body = &body;
  blk.block_dim = block;
  blk.grid_dim = grid;
  blk.threads.resize(threads);
  BlockState* const outer = g_block;
  g_block = &blk;
  try {
    for (unsigned bz = 0; bz < grid.z; ++bz) {
      for (unsigned by = 0; by < grid.y; ++by) {
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          blk.block_index = dim3(bx, by, bz);
          blk.dynamic_smem = std::malloc(dynamic_smem > 0 ? dynamic_smem : 1);
          std::memset(blk.dynamic_smem, 0xff, dynamic_smem);
          for (uint64_t i = 0; i < threads; ++i) {
            Thread& t = blk.threads[i];
            t = Thread{};
            t.linear = static_cast<int>(i);
            t.index = make_uint3(i % block.x, i / block.x % block.y, i / block.x / block.y);
            t.mapping = stacks.get(i);
            t.sp = initial_stack(t.mapping + kGuardBytes + kStackBytes);
          }
          run_block(blk, rng);
          std::free(blk.dynamic_smem);
          blk.dynamic_smem = nullptr;
          for (auto& [site, p] : blk.static_smem) std::free(p);
          blk.static_smem.clear();
          if (blk.static_bytes + dynamic_smem > static_cast<size_t>(device.smem_optin) ||
              dynamic_smem > dynamic_smem_limit(kernel, blk.static_bytes)) {
            fault("a block uses " + std::to_string(blk.static_bytes) + " bytes of static and " +
                  std::to_string(dynamic_smem) + " of dynamic shared memory: the launch fails on the device (" +
                  std::to_string(device.smem_optin) + " bytes per block at most, dynamic up to " +
                  std::to_string(dynamic_smem_limit(kernel, blk.static_bytes)) + " for this kernel)");
          }
          blk.static_bytes = 0;
        }
      }
    }
  } catch (...) {
    g_block = outer;
    throw;
  }
  g_block = outer;
}

}  // namespace emu

// ---- the CUDA runtime calls the launchers make -----------------------------------------------------------
extern "C" {

cudaError_t cudaGetDevice(int* device) {
  if (emu::driver_too_old()) return cudaErrorInsufficientDriver;
  *device = emu::g_device;
  return cudaSuccess;
}

cudaError_t cudaDriverGetVersion(int* version) {
  *version = emu::kDevices[emu::g_device].driver_cuda;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  const emu::DeviceProfile& d = emu::kDevices[device];
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = d.sm_count; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = d.smem_optin; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = d.compute_capability / 10; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = d.compute_capability % 10; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (emu::driver_too_old()) return cudaErrorInsufficientDriver;
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      value > emu::kDevices[emu::g_device].smem_optin) {
    emu::set_error(cudaErrorInvalidValue, "cudaFuncSetAttribute(" + std::to_string(static_cast<int>(attr)) + ", " +
                                              std::to_string(value) + ")");
    return cudaErrorInvalidValue;
  }
  std::lock_guard<std::mutex> lock(emu::g_launch_mutex);
  emu::g_max_dynamic_smem[func] = value;
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t) {
  if (emu::driver_too_old()) return cudaErrorInsufficientDriver;
  std::memset(ptr, value, bytes);
  return cudaSuccess;
}

cudaError_t cudaGetLastError(void) {
  const cudaError_t err = emu::g_last_error;
  emu::g_last_error = cudaSuccess;
  return err;
}

const char* cudaGetErrorString(cudaError_t err) {
  return err == cudaSuccess ? "no error" : emu::g_last_error_text.c_str();
}

// Test controls, reached through ctypes: the emulated device (an index of kDevices) and the order in which
// ready threads run.
__attribute__((visibility("default"))) void mamba_emu_set_device(int device) {
  emu::g_device = device >= 0 && device < emu::kDeviceCount ? device : 0;
}
__attribute__((visibility("default"))) void mamba_emu_set_schedule(int mode, uint64_t seed) {
  emu::g_schedule = emu::Schedule{mode, seed};
}

}  // extern "C"
