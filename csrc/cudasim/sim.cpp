// The CUDA simulator's runtime: fibers, barriers, warp exchange, launches, memory.
// See sim.h for the model and docs/cuda_sim.md for its limits.
#include "cudasim/sim.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <random>
#include <string>
#include <unordered_set>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace nnmark_sim {

thread_local ThreadState* tl_state = nullptr;

namespace {

// ---- context switch ------------------------------------------------------------
#if defined(__x86_64__)
// swap(from, to): saves the callee-saved registers on the current stack, stores its
// pointer in *from and continues on `to` (a pointer saved the same way, or a fresh
// stack made by make_stack). A few nanoseconds where swapcontext makes a syscall.
extern "C" void nnmark_sim_swap(void** from, void* to);
asm(R"(
  .text
  .globl nnmark_sim_swap
  .hidden nnmark_sim_swap
  .type nnmark_sim_swap, @function
nnmark_sim_swap:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size nnmark_sim_swap, .-nnmark_sim_swap
)");
struct Context {
  void* sp = nullptr;
};
void swap(Context& from, Context& to) { nnmark_sim_swap(&from.sp, to.sp); }
// A fresh context on [base, base + size) that starts in entry().
void make_context(Context& c, char* base, size_t size, void (*entry)()) {
  auto top = reinterpret_cast<uintptr_t>(base + size) & ~uintptr_t{15};
  auto* sp = reinterpret_cast<void**>(top - 16);  // 16-byte aligned: where `ret` finds entry
  sp[0] = reinterpret_cast<void*>(entry);
  sp[1] = nullptr;  // entry's return address: it never returns
  sp -= 6;          // the six callee-saved registers swap pops
  for (int i = 0; i < 6; ++i) sp[i] = nullptr;
  c.sp = sp;
}
#else
struct Context {
  ucontext_t uc;
};
void swap(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
void make_context(Context& c, char* base, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = base;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

// ---- fibers and blocks ---------------------------------------------------------
constexpr size_t kStack = 128 * 1024;  // per simulated thread, plus a guard page below
enum class Wait { kNone, kBlock, kWarp, kDone };

struct Fiber {
  Context ctx;
  ThreadState state;
  Wait wait = Wait::kNone;
  int warp = 0, lane = 0;
};

// Stacks of the host thread's fibers, kept for the next launch.
struct StackPool {
  std::vector<char*> stacks;
  size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  char* get(size_t i) {
    while (stacks.size() <= i) {
      void* p = mmap(nullptr, kStack + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) throw std::bad_alloc();
      mprotect(p, page, PROT_NONE);  // an overflow faults instead of corrupting the next stack
      stacks.push_back(static_cast<char*>(p) + page);
    }
    return stacks[i];
  }
  ~StackPool() {
    for (char* s : stacks) munmap(s - page, kStack + page);
  }
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<int> order;  // the order fibers run in between barriers
  size_t pos = 0;          // position in `order` of the running fiber
  int live = 0, at_barrier = 0;
  std::vector<int> warp_live, warp_waiting;
  std::vector<uint64_t> slots;  // [warp][32]: the warp exchange
  std::vector<unsigned char> dyn_smem;
  Context main;
  const std::function<void()>* body = nullptr;
  std::mt19937_64* rng = nullptr;  // shuffle order, else null
  bool deadlock = false;
};

thread_local Block* tl_block = nullptr;
thread_local Fiber* tl_fiber = nullptr;

std::atomic<int> g_order{static_cast<int>(Order::kForward)};
std::atomic<uint64_t> g_seed{0};

void resume(Block& b, Fiber& me, size_t pos) {
  Fiber& next = b.fibers[b.order[pos]];
  b.pos = pos;
  tl_fiber = &next;
  tl_state = &next.state;
  if (&next != &me) swap(me.ctx, next.ctx);
}

// Runs the next ready fiber after the current one in `order` (the current one last);
// back to the launcher when all are done or none can run (a deadlock).
void switch_away(Block& b, Fiber& me) {
  const size_t n = b.order.size();
  for (size_t k = 1; k <= n; ++k) {
    const size_t pos = (b.pos + k) % n;
    if (b.fibers[b.order[pos]].wait == Wait::kNone) return resume(b, me, pos);
  }
  if (b.live > 0) b.deadlock = true;
  swap(me.ctx, b.main);
}

// Frees the waiters of a barrier once every live thread (lane) that must reach it has.
void release(Block& b, int warp) {
  if (b.live > 0 && b.at_barrier == b.live) {
    for (Fiber& f : b.fibers)
      if (f.wait == Wait::kBlock) f.wait = Wait::kNone;
    b.at_barrier = 0;
    if (b.rng != nullptr) std::shuffle(b.order.begin(), b.order.end(), *b.rng);
  }
  if (b.warp_live[warp] > 0 && b.warp_waiting[warp] == b.warp_live[warp]) {
    for (int l = 0; l < 32; ++l) {
      const size_t t = static_cast<size_t>(warp) * 32 + l;
      if (t < b.fibers.size() && b.fibers[t].wait == Wait::kWarp) b.fibers[t].wait = Wait::kNone;
    }
    b.warp_waiting[warp] = 0;
  }
}

void wait_at(Wait what) {
  Block& b = *tl_block;
  Fiber& me = *tl_fiber;
  me.wait = what;
  if (what == Wait::kBlock) ++b.at_barrier;
  else ++b.warp_waiting[me.warp];
  release(b, me.warp);
  switch_away(b, me);
}

void fiber_main() {
  Block& b = *tl_block;
  (*b.body)();
  Fiber& me = *tl_fiber;
  me.wait = Wait::kDone;
  --b.live;
  --b.warp_live[me.warp];
  release(b, me.warp);  // an exited thread no longer holds a barrier up
  switch_away(b, me);
  std::abort();  // never resumed
}

// ---- errors and memory ---------------------------------------------------------
thread_local cudaError_t tl_last_error = cudaSuccess;
thread_local cudaError_t tl_text_error = cudaSuccess;  // the error tl_error_text tells more of
thread_local std::string tl_error_text;

cudaError_t fail(cudaError_t e, std::string text) {
  tl_last_error = tl_text_error = e;
  tl_error_text = std::move(text);
  return e;
}

std::mutex g_mem_mutex;
std::unordered_set<void*> g_live;
int g_fail_mallocs = 0;

}  // namespace

// ---- the device-side calls -----------------------------------------------------
void syncthreads() { wait_at(Wait::kBlock); }

uint64_t warp_exchange(unsigned /*mask*/, uint64_t value, int src) {
  Block& b = *tl_block;
  Fiber& me = *tl_fiber;
  uint64_t* slots = b.slots.data() + static_cast<size_t>(me.warp) * 32;
  slots[me.lane] = value;
  wait_at(Wait::kWarp);  // every lane has written its slot
  const uint64_t got = src < 0 ? value : slots[src & 31];
  wait_at(Wait::kWarp);  // every lane has read: the slots may be written again
  return got;
}

uint64_t warp_gather(unsigned mask, bool pred) {
  Block& b = *tl_block;
  Fiber& me = *tl_fiber;
  uint64_t* slots = b.slots.data() + static_cast<size_t>(me.warp) * 32;
  slots[me.lane] = pred;
  wait_at(Wait::kWarp);
  uint64_t ballot = 0;
  for (int l = 0; l < 32; ++l)
    if (((mask >> l) & 1u) && static_cast<size_t>(me.warp) * 32 + l < b.fibers.size() && slots[l]) ballot |= 1ull << l;
  wait_at(Wait::kWarp);
  return ballot;
}

void* dynamic_shared() { return tl_block->dyn_smem.data(); }

void run_grid(const LaunchConfig& cfg, const std::function<void()>& body) {
  const dim3 g = cfg.grid, d = cfg.block;
  const uint64_t threads = uint64_t{d.x} * d.y * d.z;
  if (g.x == 0 || g.y == 0 || g.z == 0 || threads == 0 || threads > 1024 || d.z > 64 || g.y > 65535 ||
      g.z > 65535 || g.x > 2147483647u) {
    fail(cudaErrorInvalidConfiguration, "invalid configuration argument (simulator: grid (" + std::to_string(g.x) +
                                            ", " + std::to_string(g.y) + ", " + std::to_string(g.z) + "), block (" +
                                            std::to_string(d.x) + ", " + std::to_string(d.y) + ", " +
                                            std::to_string(d.z) + "))");
    return;
  }
  if (cfg.smem > 48 * 1024) {
    fail(cudaErrorInvalidValue, "invalid argument (simulator: " + std::to_string(cfg.smem) +
                                    " bytes of dynamic shared memory, over 48 KiB)");
    return;
  }
  thread_local StackPool pool;
  const Order order = static_cast<Order>(g_order.load());
  std::mt19937_64 rng(g_seed.load());
  // Blocks in the schedule's order.
  const uint64_t nblocks = uint64_t{g.x} * g.y * g.z;
  std::vector<uint64_t> block_order(nblocks);
  for (uint64_t i = 0; i < nblocks; ++i) block_order[i] = order == Order::kReverse ? nblocks - 1 - i : i;
  if (order == Order::kShuffle) std::shuffle(block_order.begin(), block_order.end(), rng);

  Block b;
  const int n = static_cast<int>(threads), warps = (n + 31) / 32;
  b.fibers.resize(n);
  b.order.resize(n);
  b.slots.assign(static_cast<size_t>(warps) * 32, 0);
  b.body = &body;
  b.rng = order == Order::kShuffle ? &rng : nullptr;
  Block* const saved_block = tl_block;
  Fiber* const saved_fiber = tl_fiber;
  ThreadState* const saved_state = tl_state;
  tl_block = &b;
  for (uint64_t bi : block_order) {
    const dim3 bidx(static_cast<unsigned>(bi % g.x), static_cast<unsigned>(bi / g.x % g.y),
                    static_cast<unsigned>(bi / (uint64_t{g.x} * g.y)));
    b.live = n;
    b.at_barrier = 0;
    b.warp_live.assign(warps, 0);
    b.warp_waiting.assign(warps, 0);
    b.dyn_smem.assign(cfg.smem, 0xFF);
    for (int t = 0; t < n; ++t) {
      Fiber& f = b.fibers[t];
      f.state = {dim3(t % d.x, t / d.x % d.y, t / (d.x * d.y)), bidx, d, g};
      f.wait = Wait::kNone;
      f.warp = t / 32;
      f.lane = t % 32;
      ++b.warp_live[f.warp];
      make_context(f.ctx, pool.get(t), kStack, fiber_main);
      b.order[t] = order == Order::kReverse ? n - 1 - t : t;
    }
    if (b.rng != nullptr) std::shuffle(b.order.begin(), b.order.end(), rng);
    b.pos = 0;
    Fiber& first = b.fibers[b.order[0]];
    tl_fiber = &first;
    tl_state = &first.state;
    swap(b.main, first.ctx);  // back here when the block is done or stuck
    if (b.deadlock) {
      fail(cudaErrorLaunchFailure,
           "unspecified launch failure (simulator: block (" + std::to_string(bidx.x) + ", " + std::to_string(bidx.y) +
               ", " + std::to_string(bidx.z) +
               ") deadlocked: its threads wait at different barriers, e.g. __syncthreads in divergent code "
               "or a shuffle some lanes of the warp never reach)");
      break;  // the stuck fibers' stacks are simply reused
    }
  }
  tl_block = saved_block;
  tl_fiber = saved_fiber;
  tl_state = saved_state;
}

void set_schedule(Order order, uint64_t seed) {
  g_order.store(static_cast<int>(order));
  g_seed.store(seed);
}

void fail_next_mallocs(int n) {
  std::lock_guard<std::mutex> lock(g_mem_mutex);
  g_fail_mallocs = n;
}

int64_t live_allocations() {
  std::lock_guard<std::mutex> lock(g_mem_mutex);
  return static_cast<int64_t>(g_live.size());
}

}  // namespace nnmark_sim

using nnmark_sim::fail;

int sim_blocks_per_sm(int threads) { return std::max(1, std::min(32, 2048 / std::max(1, threads))); }

const char* cudaGetErrorString(cudaError_t e) {
  if (e != cudaSuccess && e == nnmark_sim::tl_text_error)
    return nnmark_sim::tl_error_text.c_str();
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}

cudaError_t cudaGetLastError() {
  const cudaError_t e = nnmark_sim::tl_last_error;
  nnmark_sim::tl_last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return nnmark_sim::tl_last_error; }
cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int d) {
  return d == 0 ? cudaSuccess : fail(cudaErrorInvalidDevice, "invalid device ordinal (simulator: one device, 0)");
}
cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  // Few SMs: grids stay small and grid-stride loops take several turns.
  *v = a == cudaDevAttrMultiProcessorCount ? 2 : 0;
  return cudaSuccess;
}
cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t) {
  std::lock_guard<std::mutex> lock(nnmark_sim::g_mem_mutex);
  *p = nullptr;
  if (nnmark_sim::g_fail_mallocs > 0) {
    --nnmark_sim::g_fail_mallocs;
    return fail(cudaErrorMemoryAllocation, "out of memory (simulator: a planted failure)");
  }
  void* q = std::aligned_alloc(256, std::max<size_t>(256, (bytes + 255) / 256 * 256));
  if (q == nullptr) return fail(cudaErrorMemoryAllocation, "out of memory");
  std::memset(q, 0xFF, bytes);  // what nobody wrote reads as NaN / huge counts
  nnmark_sim::g_live.insert(q);
  *p = q;
  return cudaSuccess;
}
cudaError_t cudaFreeAsync(void* p, cudaStream_t) {
  if (p == nullptr) return cudaSuccess;
  std::lock_guard<std::mutex> lock(nnmark_sim::g_mem_mutex);
  if (nnmark_sim::g_live.erase(p) == 0) return fail(cudaErrorInvalidValue, "invalid argument (simulator: free of an unknown pointer)");
  std::free(p);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind, cudaStream_t) {
  std::memcpy(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaDeviceGetDefaultMemPool(cudaMemPool_t* pool, int) {
  *pool = nullptr;
  return cudaSuccess;
}
cudaError_t cudaMemPoolSetAttribute(cudaMemPool_t, cudaMemPoolAttr, void*) { return cudaSuccess; }
