// The emulator's scheduler, shared memory and the few CUDA runtime calls the kernels' launchers make (see emu.h).
#include "emu.h"

#include <dlfcn.h>
#include <pthread.h>
#include <sys/mman.h>
#ifdef EMU_RACECHECK
#include <sanitizer/tsan_interface.h>
extern "C" void AnnotateIgnoreWritesBegin(const char* file, int line);  // TSan's runtime
extern "C" void AnnotateIgnoreWritesEnd(const char* file, int line);
extern "C" void AnnotateBenignRaceSized(const char* file, int line, const volatile void* mem, long size,
                                        const char* description);
#endif

#include <algorithm>
#include <deque>
#include <map>
#include <mutex>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <unordered_set>
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

// ---- racecheck: the build with ThreadSanitizer (build.py's "thread"; this file alone is compiled without
// instrumentation, with EMU_RACECHECK). Every emulated thread is a TSan fiber, switched to without
// synchronisation, and only what orders threads on a GPU orders them here: a block barrier, a __syncwarp, the
// start of a launch (after what the host wrote) and its end (before what the host reads). So an access to
// shared or global memory that another thread of the launch (same block or not) writes, with no barrier
// between them and not both atomic, is reported as a data race: the emulator's racecheck, which also covers
// global memory. Shuffles do not order memory (as in the PTX memory model). What the emulator itself writes
// (the 0xff fill of shared memory) is invisible to TSan, shared memory a block used is unmapped when it ends
// (the next block's carries no history), and thread stacks, which the next block's threads reuse, are
// private (a GPU thread's registers and local memory): no race on them is reported. Fibers are costly to make
// (TSan maps a shadow stack for each), so they are kept: thread i of even blocks runs as one fiber, of odd
// blocks as another. Two adjacent blocks thus never share a fiber (a race between them is seen), while the
// accesses of blocks 0 and 2 are ordered by their fiber (a race only between those is missed).
namespace race {
#ifdef EMU_RACECHECK
constexpr bool kOn = true;
void* create_fiber() { return __tsan_create_fiber(0); }
void* current_fiber() { return __tsan_get_current_fiber(); }
void switch_to_fiber(void* fiber) { __tsan_switch_to_fiber(fiber, __tsan_switch_to_fiber_no_sync); }
void release(void* token) { __tsan_release(token); }
void acquire(void* token) { __tsan_acquire(token); }
void ignore_begin() { AnnotateIgnoreWritesBegin(__FILE__, __LINE__); }  // a mapping then clears TSan's record
void ignore_end() { AnnotateIgnoreWritesEnd(__FILE__, __LINE__); }
void private_memory(void* p, size_t bytes) {  // a thread stack: what a GPU thread keeps in registers
  AnnotateBenignRaceSized(__FILE__, __LINE__, p, static_cast<long>(bytes), "an emulated thread's stack");
}
#else
constexpr bool kOn = false;
void* create_fiber() { return nullptr; }
void* current_fiber() { return nullptr; }
void switch_to_fiber(void*) {}
void release(void*) {}
void acquire(void*) {}
void ignore_begin() {}
void ignore_end() {}
void private_memory(void*, size_t) {}
#endif
}  // namespace race

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
  void* fiber = nullptr;  // racecheck: its TSan fiber
  uint3 index{};
  int linear = 0;
  State state = State::Ready;
  WarpOp op = WarpOp::Sync;
  unsigned mask = 0;
  uint64_t payload = 0;
  int arg = 0, width = 32;
  const char* barrier_file = nullptr;  // the __syncthreads it waits at
  int barrier_line = 0;
};

struct Schedule {
  int mode = 0;  // 0: threads in index order, 1: in reverse order, 2: shuffled with `seed`
  uint64_t seed = 0;
};

struct BlockState {
  std::vector<Thread> threads;
  Thread* current = nullptr;
  void* scheduler_sp = nullptr;
  void* scheduler_fiber = nullptr;  // racecheck: the host thread's TSan context
  const std::function<void()>* body = nullptr;
  dim3 block_index, block_dim, grid_dim;
  void* dynamic_smem = nullptr;
  std::map<int, void*> static_smem;
  size_t static_bytes = 0;
  std::vector<std::pair<void*, size_t>> memory;  // what the block allocated (block_alloc), freed at its end
  char* tokens = nullptr;                        // racecheck: unused sync tokens (block_token)
  size_t tokens_left = 0;
  char* start_token = nullptr;  // racecheck: released by the host before the block runs
  char* end_token = nullptr;    // racecheck: released by every thread as it ends, acquired by the host after the launch
  std::string fault;  // set by a thread that found an error on its own stack; raised by the scheduler
};

thread_local BlockState* g_block = nullptr;
std::mutex g_launch_mutex;  // one grid at a time; also guards g_max_dynamic_smem
int g_device = 0;
Schedule g_schedule;
IntrinsicError g_intrinsic_error = IntrinsicError::Spread;
uint64_t g_last_blocks = 0;  // run only the last this many blocks of each launch (0: all)
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

// Fresh pages, filled with `fill` bytes. Under racecheck TSan keeps no record of them (it would count a
// mapping as a write by the thread that maps it) until they are used, and none once they are unmapped.
char* map_memory(size_t bytes, unsigned char fill) {
  race::ignore_begin();
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p != MAP_FAILED && fill != 0) std::memset(p, fill, bytes);
  race::ignore_end();
  if (p == MAP_FAILED) fault("cannot map memory");
  return static_cast<char*>(p);
}

// Memory for the current block, filled with 0xff bytes and freed when the block ends: a block's shared
// memory and its sync tokens. Under racecheck, mapped (see map_memory); else from malloc, for AddressSanitizer.
void* block_alloc(size_t bytes) {
  bytes = std::max<size_t>(bytes, 1);
  void* p;
  if (race::kOn) {
    p = map_memory(bytes, 0xff);
  } else {
    p = std::malloc(bytes);
    std::memset(p, 0xff, bytes);
  }
  g_block->memory.emplace_back(p, bytes);
  return p;
}

void free_block_memory(BlockState& blk) {
  for (auto [p, bytes] : blk.memory) race::kOn ? static_cast<void>(munmap(p, bytes)) : std::free(p);
  blk.memory.clear();
  blk.tokens_left = 0;
}

// Racecheck: an address no synchronisation has used yet (TSan keys sync objects by address, 8-byte cells).
char* block_token() {
  BlockState& blk = *g_block;
  if (blk.tokens_left == 0) {
    blk.tokens = static_cast<char*>(block_alloc(4096));
    blk.tokens_left = 4096 / 8;
  }
  --blk.tokens_left;
  return blk.tokens + 8 * blk.tokens_left;
}

// Racecheck: `threads` (waiting at one barrier or warp op that now completes) synchronise with each other:
// each releases a fresh token, then each acquires it, in its own TSan context (entered without a stack switch).
template <typename Threads>
void synchronise(Threads&& threads) {
  if (!race::kOn) return;
  BlockState& blk = *g_block;
  char* token = block_token();
  for (Thread* t : threads) race::switch_to_fiber(t->fiber), race::release(token);
  for (Thread* t : threads) race::switch_to_fiber(t->fiber), race::acquire(token);
  race::switch_to_fiber(blk.scheduler_fiber);
}

// Runs f, called by an emulated thread, in the host thread's TSan context: the emulator's own bookkeeping
// (allocations the host frees later) is no access of the kernel's.
template <typename F>
decltype(auto) as_scheduler(F&& f) {
  struct Back {
    ~Back() { race::switch_to_fiber(g_block->current->fiber); }
  } back;
  race::switch_to_fiber(g_block->scheduler_fiber);
  return f();
}

void resume(Thread& t) {
  g_block->current = &t;
  race::switch_to_fiber(t.fiber);
  emu_switch(&g_block->scheduler_sp, t.sp);
}

void yield_to_scheduler(Thread& t) {
  race::switch_to_fiber(g_block->scheduler_fiber);
  emu_switch(&t.sp, g_block->scheduler_sp);
}

void thread_main() {
  BlockState& blk = *g_block;
  race::acquire(blk.start_token);
  (*blk.body)();
  race::release(blk.end_token);
  blk.current->state = State::Done;
  yield_to_scheduler(*blk.current);
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
  yield_to_scheduler(t);
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
  std::vector<Thread*> lanes_at_op;
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    threads[first + l].payload = results[l];
    threads[first + l].state = State::Ready;
    lanes_at_op.push_back(&threads[first + l]);
  }
  if (leader->op == WarpOp::Sync) synchronise(lanes_at_op);
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
      resume(t);
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
    std::vector<Thread*> at_barrier;
    for (Thread& t : blk.threads) {
      if (t.state != State::AtBarrier) continue;
      const Thread& first = at_barrier.empty() ? t : *at_barrier.front();
      if (t.barrier_line != first.barrier_line || std::strcmp(t.barrier_file, first.barrier_file) != 0) {
        fault(thread_name(first) + " waits at the __syncthreads of " + first.barrier_file + ":" +
              std::to_string(first.barrier_line) + ", " + thread_name(t) + " at " + t.barrier_file + ":" +
              std::to_string(t.barrier_line) + " (a block must meet at one __syncthreads)");
      }
      t.state = State::Ready;
      at_barrier.push_back(&t);
    }
    synchronise(at_barrier);
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

// Thread stacks, kept from block to block.
struct Stacks {
  std::vector<char*> mappings;
  char* get(size_t i) {
    while (mappings.size() <= i) {
      char* m = map_memory(kStackBytes + kGuardBytes, 0);
      mprotect(m, kGuardBytes, PROT_NONE);
      race::private_memory(m + kGuardBytes, kStackBytes);
      mappings.push_back(m);
    }
    return mappings[i];
  }
};

// Racecheck: the TSan fibers, kept for the process: fiber(2 * i + parity) runs thread i of blocks of that parity.
struct Fibers {
  std::vector<void*> pool;
  void* get(size_t i) {
    while (pool.size() <= i) pool.push_back(race::create_fiber());
    return pool[i];
  }
};

// What a block leaves behind, whether it ended or faulted.
void end_block(BlockState& blk) {
  free_block_memory(blk);
  blk.dynamic_smem = nullptr;
  blk.static_smem.clear();
}

// ---- traffic: the build that counts global memory accesses (build.py's "traffic"). The kernels are compiled
// with GCC's ThreadSanitizer instrumentation, which calls __tsan_read4(address) and the like before every memory
// access, and linked without TSan's runtime: the functions at the end of this file are those calls. An access by
// an emulated thread to memory that is neither its stack (a GPU thread's registers), nor its block's shared
// memory, nor a host thread's stack (where the launch keeps the kernel's parameters: constant memory on a GPU)
// is an access to global memory. Per launch:
// - the bytes the threads request, and the distinct 32-byte sectors they read and write (a GPU's unit of DRAM
//   traffic): each sector read from DRAM once and written back once is the least a launch can move, the rest
//   coming from the caches;
// - its warps' requests, each the accesses of a warp's lanes at one instruction (the call site of the
//   instrumentation) executed for the n-th time by each lane, as a GPU issues one memory instruction for the
//   warp's active lanes: the sectors each request touches against the fewest its distinct bytes fit in (every
//   lane reading the same word is one sector; 32 lanes reading 4 consecutive bytes each, four). More sectors
//   than that is an uncoalesced access, in total and per call site. g++ copies a vector (uint4, float2, ...)
//   field by field, where the GPU moves it with one instruction: a lane's access of 4 or 8 bytes that continues
//   its previous one, made by the next instruction (same kind and size, within one 16-byte block), joins that
//   access's request. Executions are counted from the lane's last warp-synchronous point (a shuffle, __syncwarp,
//   __syncthreads), where the lanes of a warp meet: lanes that skip an instruction (a branch around it) shift
//   their n-th executions only up to the next one. Where lanes of a warp ran a call site more than one time
//   apart between two such points, its requests there are divergent: counted apart, not as coalesced or not (a
//   difference of one is a loop's last, partial iteration).
namespace traffic {
constexpr int kSectorShift = 5;

// A call site's requests, or a launch's: sectors touched and the fewest their distinct bytes need, and the
// requests of divergent warps (not in the sectors).
struct Requests {
  uint64_t requests = 0, sectors = 0, ideal_sectors = 0, divergent = 0;
  bool write = false;
};

struct Record {
  uintptr_t kernel;  // the kernel's address relative to this library's load address; 0 for a memset
  uint64_t requested_read = 0, requested_written = 0;
  std::unordered_set<uint64_t> read_sectors, written_sectors;
  Requests requests;
  std::map<uintptr_t, Requests> sites;  // by call site, relative to this library's load address
};

// One request of a warp being gathered: the byte ranges [begin, end) its lanes accessed, and their sectors.
struct Request {
  bool write = false;
  std::vector<std::pair<uintptr_t, uintptr_t>> ranges;
  std::vector<uint64_t> sectors;
};

enum Kind { kRead = 1, kWrite = 2, kReadWrite = 3 };  // an atomic read-modify-write is one request doing both

// An emulated thread's state: its warp-synchronous points passed (`epoch`), how often it ran each call site
// since the last one, and its last global access (request, range, kind, size, call site), for the next field of
// a vector to join.
struct Lane {
  uint32_t epoch = 0;
  std::unordered_map<uintptr_t, uint32_t> executions;
  Request* request = nullptr;
  size_t range = 0;
  Kind kind = kRead;
  size_t size = 0;
  uintptr_t pc = 0;
};

// A warp's requests being gathered, by (call site, epoch, execution), and per (call site, epoch) the fewest and
// most times one of its lanes ran it.
struct Warp {
  std::map<std::tuple<uintptr_t, uint32_t, uint32_t>, Request> requests;
  std::map<std::pair<uintptr_t, uint32_t>, std::pair<uint32_t, uint32_t>> runs;
};

bool g_on = false;              // counting (mamba_emu_traffic_start / _stop)
std::deque<Record> g_records;   // one per launch while counting
Record* g_current = nullptr;    // the running launch's record (launches run one at a time)
uintptr_t g_library_base = 0;   // this library's load address
std::vector<Lane> g_lanes;  // the running block's threads
std::vector<Warp> g_warps;  // and warps

// [begin, end) of the calling host thread's stack.
std::pair<uintptr_t, uintptr_t> host_stack() {
  thread_local std::pair<uintptr_t, uintptr_t> range{0, 0};
  if (range.second == 0) {
    pthread_attr_t attr;
    void* base = nullptr;
    size_t size = 0;
    if (pthread_getattr_np(pthread_self(), &attr) == 0) {
      pthread_attr_getstack(&attr, &base, &size);
      pthread_attr_destroy(&attr);
    }
    range = {reinterpret_cast<uintptr_t>(base), reinterpret_cast<uintptr_t>(base) + size};
  }
  return range;
}

void begin_launch(const void* kernel) {
  if (!g_on) return;
  Dl_info info{};
  dladdr(kernel, &info);
  g_library_base = reinterpret_cast<uintptr_t>(info.dli_fbase);
  g_current = &g_records.emplace_back();
  g_current->kernel = reinterpret_cast<uintptr_t>(kernel) - g_library_base;
  host_stack();  // computed here, on the host thread, before any emulated thread asks
}

void begin_block(size_t threads) {
  if (g_current == nullptr) return;
  g_lanes.assign(threads, {});
  g_warps.assign((threads + 31) / 32, {});
}

// Thread `thread` leaves its epoch: its counts of runs go to its warp's.
void close_epoch(size_t thread) {
  Lane& lane = g_lanes[thread];
  for (const auto& [pc, n] : lane.executions) {
    const auto [it, fresh] = g_warps[thread / 32].runs.try_emplace({pc, lane.epoch}, n, n);
    it->second = {std::min(it->second.first, n), std::max(it->second.second, n)};
  }
  lane.executions.clear();
}

// The running thread reached a warp-synchronous point.
void sync_point() {
  if (g_current == nullptr || g_block == nullptr || g_block->current == nullptr) return;
  const size_t thread = g_block->current->linear;
  close_epoch(thread);
  Lane& lane = g_lanes[thread];
  lane = Lane{lane.epoch + 1};
}

// Bytes in the union of the ranges.
uint64_t covered_bytes(std::vector<std::pair<uintptr_t, uintptr_t>> ranges) {
  std::sort(ranges.begin(), ranges.end());
  uint64_t bytes = 0;
  uintptr_t reached = 0;
  for (const auto& [begin, end] : ranges) {
    const uintptr_t from = std::max(begin, reached);
    if (end > from) bytes += end - from;
    reached = std::max(reached, end);
  }
  return bytes;
}

void clear_block() {
  g_lanes.clear();
  g_warps.clear();
}

// Adds the block's warp requests to the launch's record.
void end_block() {
  if (g_current == nullptr) return;
  for (size_t thread = 0; thread < g_lanes.size(); ++thread) close_epoch(thread);
  for (const Warp& warp : g_warps) {
    for (const auto& [key, request] : warp.requests) {
      const auto [pc, epoch, n] = key;
      const auto [fewest, most] = warp.runs.at({pc, epoch});
      const bool divergent = most - fewest > 1;
      const uint64_t ideal = (covered_bytes(request.ranges) + (1u << kSectorShift) - 1) >> kSectorShift;
      for (Requests* r : {&g_current->requests, &g_current->sites[pc - g_library_base]}) {
        ++r->requests;
        r->write = request.write;
        if (divergent) {
          ++r->divergent;
        } else {
          r->sectors += request.sectors.size();
          r->ideal_sectors += ideal;
        }
      }
    }
  }
  clear_block();
}

void end_launch() {
  clear_block();  // after a fault, the block's requests are left uncounted
  g_current = nullptr;
}

template <typename Add>
void for_each_sector(uintptr_t a, size_t size, Add&& add) {
  for (uint64_t s = a >> kSectorShift; s <= (a + size - 1) >> kSectorShift; ++s) add(s);
}

// cudaMemsetAsync's writes: DRAM traffic on a GPU too, though no kernel's.
void count_memset(const void* p, size_t bytes) {
  if (!g_on || bytes == 0) return;
  Record& r = g_records.emplace_back();
  r.kernel = 0;
  r.requested_written = bytes;
  for_each_sector(reinterpret_cast<uintptr_t>(p), bytes, [&](uint64_t s) { r.written_sectors.insert(s); });
}

// An access of `size` bytes at `address` by the running code, made at `site` (the instrumentation's caller).
void count(const volatile void* address, size_t size, Kind kind, const void* site) {
  Record* record = g_current;
  BlockState* blk = g_block;
  if (record == nullptr || blk == nullptr || blk->current == nullptr) return;  // host code
  const uintptr_t a = reinterpret_cast<uintptr_t>(address);
  if (a - reinterpret_cast<uintptr_t>(blk->current->mapping) < kGuardBytes + kStackBytes) return;
  const auto [stack_begin, stack_end] = host_stack();
  if (a >= stack_begin && a < stack_end) return;
  for (const auto& [p, bytes] : blk->memory) {
    if (a - reinterpret_cast<uintptr_t>(p) < bytes) return;  // shared memory
  }
  if (kind & kRead) record->requested_read += size;
  if (kind & kWrite) record->requested_written += size;
  const int thread = blk->current->linear;
  Lane& lane = g_lanes[thread];
  const auto pc = reinterpret_cast<uintptr_t>(site);
  const bool joins = lane.request != nullptr && lane.pc != pc && lane.kind == kind && lane.size == size &&
                     (size == 4 || size == 8) && lane.request->ranges[lane.range].second == a &&
                     lane.request->ranges[lane.range].first / 16 == (a + size - 1) / 16;
  if (joins) {
    lane.request->ranges[lane.range].second = a + size;
  } else {
    Request& request = g_warps[thread / 32].requests[{pc, lane.epoch, lane.executions[pc]++}];
    request.write = kind & kWrite;
    request.ranges.emplace_back(a, a + size);
    lane.request = &request;
    lane.range = request.ranges.size() - 1;
    lane.kind = kind;
    lane.size = size;
  }
  lane.pc = pc;
  Request& request = *lane.request;
  for_each_sector(a, size, [&](uint64_t s) {
    if (kind & kRead) record->read_sectors.insert(s);
    if (kind & kWrite) record->written_sectors.insert(s);
    if (std::find(request.sectors.begin(), request.sectors.end(), s) == request.sectors.end()) {
      request.sectors.push_back(s);
    }
  });
}
}  // namespace traffic

}  // namespace

IntrinsicError intrinsic_error() { return g_intrinsic_error; }
uint3 thread_index() { return g_block->current->index; }
dim3 block_index() { return g_block->block_index; }
dim3 block_dim() { return g_block->block_dim; }
dim3 grid_dim() { return g_block->grid_dim; }

void sync_block(const char* file, int line) {
  traffic::sync_point();
  g_block->current->barrier_file = file;
  g_block->current->barrier_line = line;
  block_current(State::AtBarrier);
}

uint64_t warp_op(WarpOp op, unsigned mask, uint64_t payload, int arg, int width) {
  traffic::sync_point();
  Thread& t = *g_block->current;
  std::string error;
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) {
    error = ": shuffle width " + std::to_string(width) + " is not a power of 2 up to 32";
  } else if (!(mask >> (t.linear % 32) & 1u)) {
    error = ": calls a warp op whose mask omits its own lane";
  }
  if (!error.empty()) {
    as_scheduler([&] { g_block->fault = thread_name(t) + error; });
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
  return as_scheduler([&] {
    void* p = block_alloc(bytes);
    blk.static_smem.emplace(site, p);
    blk.static_bytes += bytes;
    return p;
  });
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
  thread_local Fibers fibers;
  std::mt19937_64 rng(g_schedule.seed);
  BlockState blk;
  blk.body = &body;
  blk.block_dim = block;
  blk.grid_dim = grid;
  blk.threads.resize(threads);
  blk.scheduler_fiber = race::current_fiber();
  // Racecheck: the launch's end token, on a page of its own that is unmapped after the host acquired it.
  char* const launch_page = race::kOn ? map_memory(4096, 0) : nullptr;
  blk.end_token = launch_page;
  BlockState* const outer = g_block;
  g_block = &blk;
  traffic::begin_launch(kernel);
  const auto end_launch = [&] {
    traffic::end_launch();
    race::acquire(blk.end_token);
    if (launch_page) munmap(launch_page, 4096);
    g_block = outer;
  };
  const uint64_t n_blocks = uint64_t{grid.x} * grid.y * grid.z;
  const uint64_t first_block = g_last_blocks > 0 && g_last_blocks < n_blocks ? n_blocks - g_last_blocks : 0;
  try {
    for (unsigned bz = 0; bz < grid.z; ++bz) {
      for (unsigned by = 0; by < grid.y; ++by) {
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          if (bx + uint64_t{grid.x} * (by + uint64_t{grid.y} * bz) < first_block) continue;
          blk.block_index = dim3(bx, by, bz);
          blk.dynamic_smem = block_alloc(dynamic_smem);
          for (uint64_t i = 0; i < threads; ++i) {
            Thread& t = blk.threads[i];
            t = Thread{};
            t.linear = static_cast<int>(i);
            t.index = make_uint3(i % block.x, i / block.x % block.y, i / block.x / block.y);
            t.mapping = stacks.get(i);
            t.sp = initial_stack(t.mapping + kGuardBytes + kStackBytes);
            if (race::kOn) t.fiber = fibers.get(2 * i + ((bx + by + bz) & 1));
          }
          if (race::kOn) blk.start_token = block_token(), race::release(blk.start_token);
          traffic::begin_block(threads);
          try {
            run_block(blk, rng);
          } catch (...) {
            end_block(blk);
            throw;
          }
          traffic::end_block();
          end_block(blk);
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
    end_launch();
    throw;
  }
  end_launch();
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
  emu::traffic::count_memset(ptr, bytes);
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

// Test controls, reached through ctypes: the emulated device (an index of kDevices), the order in which
// ready threads run, the error of the approximate transcendentals and which blocks run.
__attribute__((visibility("default"))) void mamba_emu_set_device(int device) {
  emu::g_device = device >= 0 && device < emu::kDeviceCount ? device : 0;
}
__attribute__((visibility("default"))) void mamba_emu_set_schedule(int mode, uint64_t seed) {
  emu::g_schedule = emu::Schedule{mode, seed};
}
// Only the last `n` blocks of each launch run (0: all): a kernel's far end of a huge tensor, reached cheaply.
__attribute__((visibility("default"))) void mamba_emu_set_last_blocks(uint64_t n) { emu::g_last_blocks = n; }
// 0: exact, 1: spread (the default), 2: up, 3: down (emu.h's IntrinsicError).
__attribute__((visibility("default"))) void mamba_emu_set_intrinsic_error(int mode) {
  emu::g_intrinsic_error = static_cast<emu::IntrinsicError>(mode >= 0 && mode <= 3 ? mode : 1);
}

// Traffic (the "traffic" build; elsewhere only memsets are counted): start clears the records and counts every
// launch and memset until stop. Record i: the kernel's address relative to the library's load address (0: a
// memset); the bytes requested, read and written; the distinct 32-byte sectors read and written; the warps'
// requests, the sectors and fewest sectors of those not divergent, the divergent ones; the number of call sites.
// Returns 0 past the last record.
__attribute__((visibility("default"))) int mamba_emu_traffic_counted() {
#ifdef EMU_TRAFFIC
  return 1;
#else
  return 0;
#endif
}
__attribute__((visibility("default"))) void mamba_emu_traffic_start() {
  emu::traffic::g_records.clear();
  emu::traffic::g_on = true;
}
__attribute__((visibility("default"))) void mamba_emu_traffic_stop() { emu::traffic::g_on = false; }
__attribute__((visibility("default"))) int mamba_emu_traffic_record(uint64_t i, uint64_t* kernel, uint64_t* counts) {
  if (i >= emu::traffic::g_records.size()) return 0;
  const emu::traffic::Record& r = emu::traffic::g_records[i];
  *kernel = r.kernel;
  const uint64_t values[] = {r.requested_read,          r.requested_written,    r.read_sectors.size(),
                             r.written_sectors.size(),  r.requests.requests,    r.requests.sectors,
                             r.requests.ideal_sectors, r.requests.divergent, r.sites.size()};
  std::copy(std::begin(values), std::end(values), counts);
  return 1;
}
// Call site j of record i: its address relative to the library's load address; its requests, sectors, fewest
// sectors, divergent requests, and 1 for a store.
__attribute__((visibility("default"))) int mamba_emu_traffic_site(uint64_t i, uint64_t j, uint64_t* site,
                                                                  uint64_t* counts) {
  if (i >= emu::traffic::g_records.size() || j >= emu::traffic::g_records[i].sites.size()) return 0;
  const auto& [pc, r] = *std::next(emu::traffic::g_records[i].sites.begin(), static_cast<long>(j));
  *site = pc;
  const uint64_t values[] = {r.requests, r.sectors, r.ideal_sectors, r.divergent, r.write ? 1u : 0u};
  std::copy(std::begin(values), std::end(values), counts);
  return 1;
}

#ifdef EMU_TRAFFIC
// The calls GCC's -fsanitize=thread puts before each access of the instrumented units (see emu::traffic).
#define EMU_CALLER __builtin_return_address(0)
using emu::traffic::count, emu::traffic::kRead, emu::traffic::kWrite, emu::traffic::kReadWrite;
#define EMU_TRAFFIC_ACCESS(n)                                                                 \
  void __tsan_read##n(void* p) { count(p, n, kRead, EMU_CALLER); }                            \
  void __tsan_write##n(void* p) { count(p, n, kWrite, EMU_CALLER); }                          \
  void __tsan_unaligned_read##n(void* p) { count(p, n, kRead, EMU_CALLER); }                  \
  void __tsan_unaligned_write##n(void* p) { count(p, n, kWrite, EMU_CALLER); }
EMU_TRAFFIC_ACCESS(1)
EMU_TRAFFIC_ACCESS(2)
EMU_TRAFFIC_ACCESS(4)
EMU_TRAFFIC_ACCESS(8)
EMU_TRAFFIC_ACCESS(16)
#undef EMU_TRAFFIC_ACCESS
void __tsan_read_range(void* p, unsigned long size) { count(p, size, kRead, EMU_CALLER); }
void __tsan_write_range(void* p, unsigned long size) { count(p, size, kWrite, EMU_CALLER); }
void __tsan_init() {}
// Around each call of an instrumented function that was not inlined (GCC 11's
// --param=tsan-instrument-func-entry-exit=0 would leave them out; GCC 10 has no such option).
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void**, void*) {}  // host code's virtual calls
void __tsan_vptr_read(void**) {}
// The atomics (emu.h's atomicAdd): a load is a read; a fetch-add or compare-and-swap, one request that reads and
// writes.
int __tsan_atomic32_load(const volatile int* p, int) {
  count(p, 4, kRead, EMU_CALLER);
  return __atomic_load_n(p, __ATOMIC_RELAXED);
}
int __tsan_atomic32_fetch_add(volatile int* p, int v, int) {
  count(p, 4, kReadWrite, EMU_CALLER);
  return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
int __tsan_atomic32_compare_exchange_strong(volatile int* p, int* expected, int desired, int, int) {
  count(p, 4, kReadWrite, EMU_CALLER);
  return __atomic_compare_exchange_n(p, expected, desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
}
#undef EMU_CALLER
#endif

}  // extern "C"
